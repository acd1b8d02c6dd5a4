// The CPU kernels built with the avx512 vector width (setup.py sets the compiler flags).
#include "chunk_kernels.cpp"
