// The CPU kernels built with the default vector width (setup.py sets the compiler flags).
#include "chunk_kernels.cpp"
