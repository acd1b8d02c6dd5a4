// Host side of the CUDA epilogue: torch ops osft_kernels_cuda::{block_stats, logit_grad, build_info}.
//
// They mirror launch_block_stats and launch_logit_grad of osft_kernels/backends/triton_chunked.py
// (softcap 0 means none), check every tensor, and launch the kernels of epilogue_kernels.cuh on the
// current stream of the logits' device. Registered for every backend (CompositeExplicitAutograd) so
// that tensors on the wrong device get these checks' messages rather than a dispatcher error.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>

#include "epilogue_kernels.cuh"

namespace osft {
namespace cuda {
namespace {

constexpr int64_t MAX_GRID = std::numeric_limits<int32_t>::max();

void check_device(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.is_cuda(), "osft_kernels_cuda: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == logits.device(), "osft_kernels_cuda: ", name, " is on ", t.device(),
              " but the logits are on ", logits.device());
}

// A [size] vector of `dtype` with unit stride, on the logits' device.
void check_vector(const at::Tensor& t, at::ScalarType dtype, int64_t size, const at::Tensor& logits,
                  const char* name) {
  check_device(t, logits, name);
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == size && (size <= 1 || t.stride(0) == 1),
              "osft_kernels_cuda: ", name, " must be a contiguous [", size, "] tensor of ", dtype, ", got ",
              t.sizes(), " of ", t.scalar_type(), " with strides ", t.strides());
}

// [rows, cols] of `dtype` with unit column stride and rows that do not overlap.
void check_matrix(const at::Tensor& t, at::ScalarType dtype, int64_t rows, int64_t cols, const at::Tensor& logits,
                  const char* name) {
  check_device(t, logits, name);
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 2 && t.size(0) == rows && t.size(1) == cols,
              "osft_kernels_cuda: ", name, " must be [", rows, ", ", cols, "] of ", dtype, ", got ", t.sizes(),
              " of ", t.scalar_type());
  TORCH_CHECK((cols <= 1 || t.stride(1) == 1) && (rows <= 1 || t.stride(0) >= cols), "osft_kernels_cuda: ", name,
              " must have unit column stride and non-overlapping rows, got strides ", t.strides());
}

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), "osft_kernels_cuda: logits must be a CUDA tensor, got one on ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "osft_kernels_cuda: logits must be [rows, width], got ", logits.sizes());
  check_matrix(logits, at::kFloat, logits.size(0), logits.size(1), logits, "logits");
}

void check_columns(const at::Tensor& logits, const std::optional<at::Tensor>& bias, double softcap, int64_t v0) {
  TORCH_CHECK(v0 >= 0 && v0 % VOCAB_BLOCK == 0, "osft_kernels_cuda: v0 must be a multiple of ", VOCAB_BLOCK,
              ", got ", v0);
  TORCH_CHECK(softcap >= 0, "osft_kernels_cuda: softcap must be positive, or 0 for none, got ", softcap);
  if (bias.has_value()) {
    check_device(*bias, logits, "bias");
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) >= v0 + logits.size(1) &&
                    (bias->size(0) <= 1 || bias->stride(0) == 1),
                "osft_kernels_cuda: bias must be a contiguous float32 [V] tensor covering columns ", v0, ":",
                v0 + logits.size(1), ", got ", bias->sizes(), " of ", bias->scalar_type());
  }
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whether the logits rows (and the bias) start at multiples of 4 floats: float4 loads.
bool logits_aligned(const at::Tensor& logits, const std::optional<at::Tensor>& bias) {
  return aligned(logits.data_ptr(), 16) && (logits.size(0) <= 1 || logits.stride(0) % 4 == 0) &&
         (!bias.has_value() || aligned(bias->data_ptr(), 16));
}

RowTransform row_transform(const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                           const at::Tensor& inv_temp, double softcap, int64_t v0) {
  return {bias.has_value() ? bias->data_ptr<float>() : nullptr, targets.data_ptr<int64_t>(),
          inv_temp.data_ptr<float>(), static_cast<float>(softcap), v0};
}

Logits logits_view(const at::Tensor& logits) {
  return {logits.data_ptr<float>(), logits.size(0), logits.size(1), logits.stride(0)};
}

// partials [rows, ceil(width / VOCAB_BLOCK), NUM_PARTIALS] of the blocks of the logits [rows, width] of
// columns v0:v0+width, and target_logit [rows] of the rows whose target lies there.
void block_stats(const at::Tensor& logits, const at::Tensor& partials, const at::Tensor& target_logit,
                 const at::Tensor& targets, const at::Tensor& inv_temp, const std::optional<at::Tensor>& bias,
                 double softcap, int64_t v0, bool entropy, bool mean, bool square) {
  check_logits(logits);
  const int64_t rows = logits.size(0), width = logits.size(1);
  const int64_t blocks = (width + VOCAB_BLOCK - 1) / VOCAB_BLOCK;
  check_columns(logits, bias, softcap, v0);
  check_device(partials, logits, "partials");
  TORCH_CHECK(partials.scalar_type() == at::kFloat && partials.dim() == 3 && partials.size(0) == rows &&
                  partials.size(1) == blocks && partials.size(2) == NUM_PARTIALS && partials.stride(2) == 1 &&
                  (blocks <= 1 || partials.stride(1) == NUM_PARTIALS) &&
                  (rows <= 1 || partials.stride(0) >= blocks * NUM_PARTIALS),
              "osft_kernels_cuda: partials must be float32 [", rows, ", ", blocks, ", ", NUM_PARTIALS,
              "] with contiguous rows, got ", partials.sizes(), " of ", partials.scalar_type(), " with strides ",
              partials.strides());
  check_vector(target_logit, at::kFloat, rows, logits, "target_logit");
  check_vector(targets, at::kLong, rows, logits, "targets");
  check_vector(inv_temp, at::kFloat, rows, logits, "inv_temp");
  TORCH_CHECK(rows * blocks <= MAX_GRID, "osft_kernels_cuda: ", rows, " rows x ", blocks,
              " blocks exceed the grid limit; use a smaller memory_budget");
  if (rows == 0 || width == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  const StatsArgs args{logits_view(logits), row_transform(bias, targets, inv_temp, softcap, v0),
                       partials.data_ptr<float>(), partials.stride(0), target_logit.data_ptr<float>(), blocks,
                       entropy, mean, square};
  launch_block_stats(args, logits_aligned(logits, bias), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The gradient may share the logits' memory only as logits.view(grad.dtype)[:, :width], the layout
// whose in-place write logit_grad_kernel proves safe.
void check_grad_alias(const at::Tensor& logits, const at::Tensor& grad) {
  const auto begin = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()); };
  const auto end = [&](const at::Tensor& t) {
    return begin(t) + ((t.size(0) - 1) * t.stride(0) + t.size(1)) * t.element_size();
  };
  if (end(grad) <= begin(logits) || end(logits) <= begin(grad)) {
    return;
  }
  TORCH_CHECK(begin(grad) == begin(logits) && grad.stride(0) * grad.element_size() == logits.stride(0) * 4,
              "osft_kernels_cuda: grad overlaps the logits other than as logits.view(grad.dtype)[:, :width] "
              "(same start and row stride in bytes)");
}

template <typename G>
void launch_grad(const at::Tensor& logits, const at::Tensor& grad, const RowTransform& transform,
                 const at::Tensor& stats, const at::Tensor& coef, int64_t vocab_size, bool entropy, bool mean,
                 bool logits_vector) {
  const GradArgs<G> args{logits_view(logits), transform, reinterpret_cast<G*>(grad.data_ptr()), grad.stride(0),
                         stats.data_ptr<float>(), coef.data_ptr<float>(),
                         1.0f / static_cast<float>(vocab_size), entropy, mean};
  const bool vector = logits_vector && aligned(grad.data_ptr(), 4 * sizeof(G)) &&
                      (grad.size(0) <= 1 || grad.stride(0) % 4 == 0);
  launch_logit_grad(args, vector, at::cuda::getCurrentCUDAStream());
}

// grad [rows, width] (float32, float16 or bfloat16) from the logits [rows, width] of columns v0:v0+width,
// the rows' statistics and coef [rows, NUM_STATS] (the gradients on them divided by temperature).
void logit_grad(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& targets,
                const at::Tensor& inv_temp, const at::Tensor& stats, const at::Tensor& coef,
                const std::optional<at::Tensor>& bias, double softcap, int64_t v0, int64_t vocab_size, bool entropy,
                bool mean) {
  check_logits(logits);
  const int64_t rows = logits.size(0), width = logits.size(1);
  check_columns(logits, bias, softcap, v0);
  const auto dtype = grad.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "osft_kernels_cuda: grad must be float32, float16 or bfloat16, got ", dtype);
  check_matrix(grad, dtype, rows, width, logits, "grad");
  check_vector(targets, at::kLong, rows, logits, "targets");
  check_vector(inv_temp, at::kFloat, rows, logits, "inv_temp");
  check_matrix(stats, at::kFloat, rows, NUM_STATS, logits, "stats");
  check_matrix(coef, at::kFloat, rows, NUM_STATS, logits, "coef");
  TORCH_CHECK(rows <= 1 || (stats.stride(0) == NUM_STATS && coef.stride(0) == NUM_STATS),
              "osft_kernels_cuda: stats and coef must be contiguous");
  TORCH_CHECK(vocab_size >= v0 + width, "osft_kernels_cuda: vocab_size ", vocab_size, " is below the chunk's end ",
              v0 + width);
  TORCH_CHECK(rows <= MAX_GRID, "osft_kernels_cuda: ", rows, " rows exceed the grid limit");
  if (rows == 0 || width == 0) {
    return;
  }
  check_grad_alias(logits, grad);
  const c10::cuda::CUDAGuard guard(logits.device());
  const RowTransform transform = row_transform(bias, targets, inv_temp, softcap, v0);
  const bool vector = logits_aligned(logits, bias);
  if (dtype == at::kFloat) {
    launch_grad<float>(logits, grad, transform, stats, coef, vocab_size, entropy, mean, vector);
  } else if (dtype == at::kHalf) {
    launch_grad<__half>(logits, grad, transform, stats, coef, vocab_size, entropy, mean, vector);
  } else {
    launch_grad<__nv_bfloat16>(logits, grad, transform, stats, coef, vocab_size, entropy, mean, vector);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// "vocab_block num_stats num_partials", checked against the Python constants when the library loads.
std::string build_info() {
  return std::to_string(VOCAB_BLOCK) + " " + std::to_string(NUM_STATS) + " " + std::to_string(NUM_PARTIALS);
}

}  // namespace
}  // namespace cuda
}  // namespace osft

TORCH_LIBRARY(osft_kernels_cuda, m) {
  m.def("block_stats(Tensor logits, Tensor(a!) partials, Tensor(b!) target_logit, Tensor targets, Tensor inv_temp, "
        "Tensor? bias, float softcap, int v0, bool entropy, bool mean, bool square) -> ()");
  m.def("logit_grad(Tensor(a!) logits, Tensor(a!) grad, Tensor targets, Tensor inv_temp, Tensor stats, Tensor coef, "
        "Tensor? bias, float softcap, int v0, int vocab_size, bool entropy, bool mean) -> ()");
  m.def("build_info() -> str", &osft::cuda::build_info);
}

TORCH_LIBRARY_IMPL(osft_kernels_cuda, CompositeExplicitAutograd, m) {
  m.impl("block_stats", &osft::cuda::block_stats);
  m.impl("logit_grad", &osft::cuda::logit_grad);
}
