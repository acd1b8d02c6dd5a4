// The chunked driver's epilogue on CUDA: two memory-bound kernels over a float32 logits chunk.
//
// The chunk [rows, width] (row stride `stride` floats) is the raw product hidden @ weight[v0:v0+width]^T
// from cuBLAS; both kernels apply bias, softcap and 1 / temperature as they read it, with the
// functions of row_math.h, so each logit goes through the CPU-tested formulas.
//
// Both work on one row per CTA of THREADS threads, in tiles of VOCAB_BLOCK columns, VALUES per thread:
// * block_stats_kernel: one CTA per (row, block). The tile's logits stay in registers, so the block
//   max is exact (no online rescaling): a CTA max, then each thread's sums of e^(z - m) and the
//   other terms, then a CTA sum. Writes the block's NUM_PARTIALS partials and, where the row's
//   target lies in the block, its target logit.
// * logit_grad_kernel: one CTA per row, walking its tiles left to right, writing the logit gradient
//   in the gradient dtype G, possibly over the row's own logits.
//
// Deterministic and batch invariant: no atomics, and every reduction runs in a fixed order that
// depends only on the block's width (a thread's values in order, a butterfly over a warp's lanes,
// the warps in order). A thread reads 4 consecutive columns at a time (float4) where the host found
// every row aligned for it; otherwise consecutive threads read consecutive columns. Only row_math.h
// and CUDA headers are included, so the file compiles on its own (csrc/cuda/compile_check.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/row_math.h"

namespace osft {
namespace cuda {

// A CTA works on one row in tiles of VOCAB_BLOCK columns, VALUES per thread.
constexpr int THREADS = 256;
constexpr int WARP = 32;
constexpr int WARPS = THREADS / WARP;
constexpr int VALUES = VOCAB_BLOCK / THREADS;  // 8
constexpr unsigned FULL_MASK = 0xffffffffu;
static_assert(VALUES * THREADS == VOCAB_BLOCK && VALUES % 4 == 0, "a tile is one block of whole float4 groups");

// The per-row inputs that turn the raw product into logits.
struct RowTransform {
  const float* bias;        // [V] or null; column c of the chunk reads bias[v0 + c]
  const int64_t* targets;   // [rows], absolute vocabulary ids
  const float* inv_temp;    // [rows]
  float softcap;            // <= 0: none
  int64_t v0;
};

// The raw product: [rows, width], row stride `stride`.
struct Logits {
  const float* data;
  int64_t rows, width, stride;
};

struct StatsArgs {
  Logits logits;
  RowTransform transform;
  float* partials;          // [rows, blocks, NUM_PARTIALS], row stride partials_stride
  int64_t partials_stride;
  float* target_logit;      // [rows]: written for the rows whose target lies in the chunk
  int64_t blocks;           // ceil(width / VOCAB_BLOCK)
  bool entropy, mean, square;
};

template <typename G>
struct GradArgs {
  Logits logits;
  RowTransform transform;
  G* grad;                  // [rows, width], row stride grad_stride; may alias the logits (see logit_grad_kernel)
  int64_t grad_stride;
  const float* stats;       // [rows, NUM_STATS]
  const float* coef;        // [rows, NUM_STATS]: gradients on the statistics divided by temperature
  float inv_vocab;          // 1 / V
  bool entropy, mean;
};

// Column of value k of `thread` in the tile starting at column `base`: float4 groups of consecutive
// columns (VEC), or consecutive threads on consecutive columns.
template <bool VEC>
__device__ __forceinline__ int64_t tile_column(int64_t base, int thread, int k) {
  return VEC ? base + (static_cast<int64_t>(k / 4) * THREADS + thread) * 4 + k % 4
             : base + static_cast<int64_t>(k) * THREADS + thread;
}

// x[k] = src[column k] for the columns below `end`, `fill` elsewhere.
template <bool VEC>
__device__ __forceinline__ void load_tile(const float* src, int64_t base, int64_t end, int thread, float fill,
                                          float (&x)[VALUES]) {
#pragma unroll
  for (int k = 0; k < VALUES; k += VEC ? 4 : 1) {
    const int64_t c = tile_column<VEC>(base, thread, k);
    if (VEC && c + 4 <= end) {
      const float4 v = *reinterpret_cast<const float4*>(src + c);
      x[k] = v.x;
      x[k + 1] = v.y;
      x[k + 2] = v.z;
      x[k + 3] = v.w;
    } else {
#pragma unroll
      for (int i = 0; i < (VEC ? 4 : 1); ++i) {
        x[k + i] = c + i < end ? src[c + i] : fill;
      }
    }
  }
}

// The tile's logits from the raw product (row `raw`): z = softcap(raw + bias) * inv_temp for the
// columns below `end`, -inf elsewhere (no e^(z - m), no entropy term).
template <bool VEC>
__device__ __forceinline__ void load_logits(const float* raw, const RowTransform& t, float inv_temp, int64_t base,
                                            int64_t end, int thread, float (&z)[VALUES]) {
  load_tile<VEC>(raw, base, end, thread, 0.0f, z);
  if (t.bias != nullptr) {
    float b[VALUES];
    load_tile<VEC>(t.bias + t.v0, base, end, thread, 0.0f, b);
#pragma unroll
    for (int k = 0; k < VALUES; ++k) z[k] += b[k];
  }
#pragma unroll
  for (int k = 0; k < VALUES; ++k) {
    z[k] = tile_column<VEC>(base, thread, k) < end ? transformed_logit(z[k], t.softcap, inv_temp) : -INFINITY;
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = WARP / 2; offset > 0; offset /= 2) x = Math<float>::max(x, __shfl_xor_sync(FULL_MASK, x, offset));
  return x;
}

// A butterfly: every lane ends with the same bits (each step adds the same two values on both lanes).
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = WARP / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(FULL_MASK, x, offset);
  return x;
}

// Grid: rows * blocks CTAs of THREADS threads, one per (row, block), the blocks of a row consecutive.
template <bool VEC>
__global__ void __launch_bounds__(THREADS) block_stats_kernel(StatsArgs a) {
  __shared__ float warp_max_of[WARPS];
  __shared__ float warp_sums_of[4][WARPS];
  const int thread = threadIdx.x, lane = thread % WARP, warp = thread / WARP;
  const int64_t row = blockIdx.x / a.blocks;
  const int64_t block = blockIdx.x % a.blocks;
  const int64_t base = block * VOCAB_BLOCK;
  const int64_t end = base + VOCAB_BLOCK < a.logits.width ? base + VOCAB_BLOCK : a.logits.width;
  const RowTransform& t = a.transform;
  float z[VALUES];
  load_logits<VEC>(a.logits.data + row * a.logits.stride, t, t.inv_temp[row], base, end, thread, z);

  const int64_t target = t.targets[row] - t.v0;
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < VALUES; ++k) {
    m = Math<float>::max(m, z[k]);
    const int64_t column = tile_column<VEC>(base, thread, k);
    if (column == target && column < end) {
      a.target_logit[row] = z[k];  // one thread of one CTA writes a row's target logit
    }
  }
  m = warp_max(m);
  if (lane == 0) warp_max_of[warp] = m;
  __syncthreads();
  m = warp_max_of[0];
#pragma unroll
  for (int w = 1; w < WARPS; ++w) m = Math<float>::max(m, warp_max_of[w]);
  m = Math<float>::max(m, FINITE_MIN);

  float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // e^(z - m), entropy terms, z, e^(2 (z - m))
#pragma unroll
  for (int k = 0; k < VALUES; ++k) {
    const float e = shifted_exp(z[k], m);
    sums[0] += e;
    if (a.entropy) sums[1] += entropy_term(z[k], m, e);
    if (a.mean && tile_column<VEC>(base, thread, k) < end) sums[2] += z[k];
    if (a.square) sums[3] += e * e;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    sums[i] = warp_sum(sums[i]);
    if (lane == 0) warp_sums_of[i][warp] = sums[i];
  }
  __syncthreads();
  if (thread == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      sums[i] = warp_sums_of[i][0];
#pragma unroll
      for (int w = 1; w < WARPS; ++w) sums[i] += warp_sums_of[i][w];
    }
    float* out = a.partials + row * a.partials_stride + block * NUM_PARTIALS;
    out[PARTIAL_MAX] = m;
    out[PARTIAL_SUM] = sums[0];
    out[PARTIAL_ENTROPY] = a.entropy ? sums[1] : 0.0f;
    out[PARTIAL_LOGIT_SUM] = a.mean ? sums[2] : 0.0f;
    out[PARTIAL_SQUARE_SUM] = a.square ? sums[3] : 0.0f;
  }
}

template <typename G>
__device__ __forceinline__ G to_grad(float x);
template <>
__device__ __forceinline__ float to_grad<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half to_grad<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 to_grad<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename G>
struct alignas(4 * sizeof(G)) Pack4 {
  G v[4];
};

// dst[column k] = g[k] for the columns below `end`, in the tile layout of load_tile.
template <bool VEC, typename G>
__device__ __forceinline__ void store_tile(G* dst, int64_t base, int64_t end, int thread, const float (&g)[VALUES]) {
#pragma unroll
  for (int k = 0; k < VALUES; k += VEC ? 4 : 1) {
    const int64_t c = tile_column<VEC>(base, thread, k);
    if (VEC && c + 4 <= end) {
      Pack4<G> p;
#pragma unroll
      for (int i = 0; i < 4; ++i) p.v[i] = to_grad<G>(g[k + i]);
      *reinterpret_cast<Pack4<G>*>(dst + c) = p;
    } else {
#pragma unroll
      for (int i = 0; i < (VEC ? 4 : 1); ++i) {
        if (c + i < end) dst[c + i] = to_grad<G>(g[k + i]);
      }
    }
  }
}

// Grid: one CTA of THREADS threads per row.
//
// The gradient may be written over the logits it is computed from: G = float in place, or a
// half-precision row over the first bytes of its own float32 row (grad_stride = 2 * stride). Then
// the value of column j lands on bytes [j * sizeof(G), (j + 1) * sizeof(G)) of the row, inside the
// float32 logit of column j * sizeof(G) / 4 <= j, so writing a tile's columns [c0, c0 + VOCAB_BLOCK)
// overwrites only logits of columns below c0 + VOCAB_BLOCK: ones that this CTA has read in this tile
// or an earlier one, and that no later tile reads. Other threads of the CTA read them, so every
// thread waits at a __syncthreads() between the tile's loads and its stores: all reads of the tile
// (and of the earlier ones, each before an earlier barrier) happen before any of its writes. Rows
// are written only by their own CTA, within their own bytes.
template <typename G, bool VEC>
__global__ void __launch_bounds__(THREADS) logit_grad_kernel(GradArgs<G> a) {
  const int64_t row = blockIdx.x;
  const int thread = threadIdx.x;
  const RowTransform& t = a.transform;
  const float inv_temp = t.inv_temp[row];
  const int64_t target = t.targets[row] - t.v0;
  const float* coef = a.coef + row * NUM_STATS;
  const float* stats = a.stats + row * NUM_STATS;
  const GradCoef<float> c{coef[LSE], coef[TARGET_LOGIT], a.mean ? coef[MEAN_LOGIT] * a.inv_vocab : 0.0f,
                          coef[ENTROPY], stats[LSE], stats[ENTROPY]};
  const bool capped = t.softcap > 0.0f;
  const float* raw = a.logits.data + row * a.logits.stride;
  G* grad = a.grad + row * a.grad_stride;
  const int64_t width = a.logits.width;
  for (int64_t base = 0; base < width; base += VOCAB_BLOCK) {
    const int64_t end = base + VOCAB_BLOCK < width ? base + VOCAB_BLOCK : width;
    float z[VALUES];
    load_logits<VEC>(raw, t, inv_temp, base, end, thread, z);
#pragma unroll
    for (int j = 0; j < VALUES; ++j) {
      const float slope = capped ? softcap_slope(z[j], t.softcap, inv_temp) : 1.0f;
      float g = logit_grad_value(z[j], c, a.entropy) * slope;
      if (tile_column<VEC>(base, thread, j) == target) g += c.target * slope;  // stored if < end
      z[j] = g;
    }
    __syncthreads();  // every read of this tile before any write over it (see above)
    store_tile<VEC>(grad, base, end, thread, z);
  }
}

// Launchers: the only place where kernel variants are chosen (compile_check.cu instantiates them all).
// `aligned`: every row of the logits and of the gradient, and the bias, start at a multiple of 4 values
// (16 bytes of float32, 8 of a half-precision gradient).

inline void launch_block_stats(const StatsArgs& a, bool aligned, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.logits.rows * a.blocks));
  if (aligned) {
    block_stats_kernel<true><<<grid, THREADS, 0, stream>>>(a);
  } else {
    block_stats_kernel<false><<<grid, THREADS, 0, stream>>>(a);
  }
}

template <typename G>
void launch_logit_grad(const GradArgs<G>& a, bool aligned, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.logits.rows));
  if (aligned) {
    logit_grad_kernel<G, true><<<grid, THREADS, 0, stream>>>(a);
  } else {
    logit_grad_kernel<G, false><<<grid, THREADS, 0, stream>>>(a);
  }
}

}  // namespace cuda
}  // namespace osft
