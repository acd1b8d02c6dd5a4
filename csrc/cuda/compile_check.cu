// Instantiates every kernel variant that csrc/cuda/epilogue.cu launches, through the same launchers,
// without torch: tools/cuda_compile_check.py compiles this file for each GPU architecture and reads
// the registers, spills and shared memory that ptxas reports.
#include "epilogue_kernels.cuh"

namespace osft {
namespace cuda {

void instantiate_all_kernels(cudaStream_t stream) {
  for (bool aligned : {true, false}) {
    launch_block_stats(StatsArgs{}, aligned, stream);
    launch_logit_grad(GradArgs<float>{}, aligned, stream);
    launch_logit_grad(GradArgs<__half>{}, aligned, stream);
    launch_logit_grad(GradArgs<__nv_bfloat16>{}, aligned, stream);
  }
}

}  // namespace cuda
}  // namespace osft
