// The chunked driver's epilogue on CPU, and its fusion with bfloat16 GEMMs in cache-resident tiles.
//
// A token chunk [r, D] against the vocabulary columns v0:v1 of weight [V, D] is cut into tiles of
// ROW_TILE rows by VOCAB_BLOCK columns. Two ways to get a tile's logits:
//
// * buffer_*: the CPU BLAS has already written the chunk's float32 (float64) logits to a buffer (a
//   multithreaded GEMM of the whole chunk runs faster than per-tile ones there); the epilogue makes one
//   parallel pass over it: transform, block statistics, or the logit gradient in place.
// * fused_*: bfloat16 operands, where oneDNN's brgemm micro-kernel runs them (AMX or AVX512-BF16):
//   each tile's logits are one product into a per-thread float32 tile that the epilogue reduces, or
//   turns into its gradient, while it is in cache; the gradient tile (in bfloat16) feeds d_hidden at
//   once and is kept, transposed, for the weight and bias gradients.
//
// Parallel with at::parallel_for, race-free and in a fixed order: every task owns disjoint outputs
// (a tile's partials or gradient; a row tile's d_hidden partial over one group of GROUP_BLOCKS
// vocabulary blocks, the partials summed in group order afterwards; a 64-column slice of d_weight and
// d_bias), and inside a task the work runs in index order with fixed tile shapes. Results therefore do
// not depend on the thread count or on the other rows of the batch (the driver pads fused chunks to
// whole row tiles), and a chunk of a single row tile still spreads over the threads.
//
// The fused ops take the weight packed for the columns v0:v1 only, and write the weight and bias
// gradients of those columns into [v1 - v0, D] and [v1 - v0] slices.
//
// Registered as torch ops osft_kernels_cpu::{transform_logits, buffer_stats, buffer_grad, fused_stats,
// fused_grads, build_info}.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../common/row_math.h"

namespace osft {

template <typename S>
struct Math<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static V exp(const V& x) { return x.exp(); }
  static V tanh(const V& x) { return x.tanh(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
};

namespace {

// rows of a tile: oneDNN's bfloat16 brgemm runs fastest at 64 rows, and a chunk of a few hundred rows
// still splits evenly over the threads
constexpr int64_t ROW_TILE = 64;
// vocabulary blocks whose d_hidden products one task sums; a fixed count, so that the summation order
// does not depend on the number of threads
constexpr int64_t GROUP_BLOCKS = 8;

#if defined(CPU_CAPABILITY_AVX512)
constexpr const char* CAPABILITY = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
constexpr const char* CAPABILITY = "avx2";
#else
constexpr const char* CAPABILITY = "default";
#endif

// z[0:w] = transformed(raw + bias[0:w]) in place.
template <typename S>
void transform_row(S* z, int64_t w, const S* bias, S softcap, S inv_temp) {
  using V = at::vec::Vectorized<S>;
  if (bias == nullptr && !(softcap > 0) && inv_temp == S(1)) {
    return;
  }
  int64_t j = 0;
  for (; j + V::size() <= w; j += V::size()) {
    V x = V::loadu(z + j);
    if (bias != nullptr) {
      x = x + V::loadu(bias + j);
    }
    transformed_logit(x, softcap, inv_temp).store(z + j);
  }
  for (; j < w; ++j) {
    z[j] = transformed_logit(z[j] + (bias != nullptr ? bias[j] : S(0)), softcap, inv_temp);
  }
}

template <typename S>
S lane_sum(const at::vec::Vectorized<S>& v) {
  using V = at::vec::Vectorized<S>;
  S lanes[V::size()];
  v.store(lanes);
  S total = 0;
  for (int k = 0; k < V::size(); ++k) {
    total += lanes[k];
  }
  return total;
}

// One block's partials of a row of transformed logits z[0:w].
template <typename S>
void block_partials(const S* z, int64_t w, bool entropy, bool mean, bool square, S* out) {
  using V = at::vec::Vectorized<S>;
  const int64_t full = w / V::size() * V::size();
  V vmax(-std::numeric_limits<S>::infinity());
  for (int64_t j = 0; j < full; j += V::size()) {
    vmax = Math<V>::max(vmax, V::loadu(z + j));
  }
  S lanes[V::size()];
  vmax.store(lanes);
  S m = -std::numeric_limits<S>::infinity();
  for (int k = 0; k < V::size(); ++k) m = std::max(m, lanes[k]);
  for (int64_t j = full; j < w; ++j) m = std::max(m, z[j]);
  m = std::max(m, S(FINITE_MIN));

  const V vm(m);
  V vsum(0), vent(0), vz(0), vsq(0);
  for (int64_t j = 0; j < full; j += V::size()) {
    V x = V::loadu(z + j);
    V e = shifted_exp(x, vm);
    vsum = vsum + e;
    if (entropy) vent = vent + entropy_term(x, vm, e);
    if (mean) vz = vz + x;
    if (square) vsq = vsq + e * e;
  }
  S sum = lane_sum(vsum), ent = lane_sum(vent), zsum = lane_sum(vz), sq = lane_sum(vsq);
  for (int64_t j = full; j < w; ++j) {
    S e = shifted_exp(z[j], m);
    sum += e;
    if (entropy) ent += entropy_term(z[j], m, e);
    if (mean) zsum += z[j];
    if (square) sq += e * e;
  }
  out[PARTIAL_MAX] = m;
  out[PARTIAL_SUM] = sum;
  out[PARTIAL_ENTROPY] = entropy ? ent : S(0);
  out[PARTIAL_LOGIT_SUM] = mean ? zsum : S(0);
  out[PARTIAL_SQUARE_SUM] = square ? sq : S(0);
}

// dz of a row of transformed logits z[0:w] (columns c0:c0+w) into out[0:w], which may be z;
// `target` is the row's target column (absolute).
template <typename S>
void grad_row(const S* z, S* out, int64_t w, int64_t c0, int64_t target, const GradCoef<S>& c, S softcap,
              S inv_temp, bool entropy) {
  using V = at::vec::Vectorized<S>;
  const bool capped = softcap > 0;
  const int64_t local = target - c0;
  const bool hit = local >= 0 && local < w;
  const S target_z = hit ? z[local] : S(0);
  int64_t j = 0;
  for (; j + V::size() <= w; j += V::size()) {
    V x = V::loadu(z + j);
    V g = logit_grad_value(x, c, entropy);
    if (capped) g = g * softcap_slope(x, softcap, inv_temp);
    g.store(out + j);
  }
  for (; j < w; ++j) {
    S g = logit_grad_value(z[j], c, entropy);
    out[j] = capped ? g * softcap_slope(z[j], softcap, inv_temp) : g;
  }
  if (hit) {  // the target column in one expression, so that p_y c_lse + c_target cancels exactly when p_y = 1
    out[local] = (logit_grad_value(target_z, c, entropy) + c.target) * softcap_slope(target_z, softcap, inv_temp);
  }
}

struct ChunkShape {
  int64_t rows, dim, v0, v1, row_tiles, blocks, groups;
  ChunkShape(int64_t rows_, int64_t dim_, int64_t v0_, int64_t v1_)
      : rows(rows_), dim(dim_), v0(v0_), v1(v1_), row_tiles((rows_ + ROW_TILE - 1) / ROW_TILE),
        blocks((v1_ - v0_ + VOCAB_BLOCK - 1) / VOCAB_BLOCK), groups((blocks + GROUP_BLOCKS - 1) / GROUP_BLOCKS) {}
  int64_t width() const { return v1 - v0; }
  int64_t block_start(int64_t b) const { return v0 + b * VOCAB_BLOCK; }
  int64_t block_end(int64_t b) const { return std::min(v1, v0 + (b + 1) * VOCAB_BLOCK); }
  int64_t tile_end(int64_t t) const { return std::min(rows, (t + 1) * ROW_TILE); }
};

// Logits already in a float32/float64 buffer: no products; dz is written over the logits.
template <typename S>
struct GivenLogits {
  static constexpr bool fused = false;
  static constexpr int64_t group_blocks = 1;
  struct Scratch {};
  S* dz_row(S* z, S*) const { return z; }
  void emit_row(Scratch&, int64_t, const S*, int64_t) const {}
};

// The three products of bfloat16 operands with float32 accumulation and output, through ATen's
// batch-reduce GEMM (oneDNN's brgemm micro-kernel: AMX or AVX512-BF16) on operands that
// osft_kernels.backends.cpu packs in its VNNI layout ([K / 2, N, 2]). dz is rounded to bfloat16 for
// the two gradient products, as on the GPU.
struct Bf16Products {
  static constexpr bool fused = true;
  static constexpr int64_t group_blocks = GROUP_BLOCKS;
  // a dz tile in bfloat16, [ROW_TILE, VOCAB_BLOCK]: the left operand of the d_hidden product; a block
  // of odd width w is paired with a zero column
  struct Scratch {
    std::vector<at::BFloat16> tile = std::vector<at::BFloat16>(ROW_TILE * VOCAB_BLOCK);
  };
  const at::BFloat16* hidden;       // [rows, D]
  const at::BFloat16* hidden_vnni;  // [rows / 2, D, 2], for the weight gradient
  // the columns v0:v1 packed, the block at column c0 starting at (c0 - v0) * D: [D / 2, w, 2] for the
  // logits, [ceil(w / 2), D, 2] for d_hidden
  const at::BFloat16* weight_cols;
  const at::BFloat16* weight_rows;
  at::BFloat16* dz_t;               // [v1 - v0, rows]: dz transposed, for the weight and bias gradients
  int64_t dim, rows, v0;

  // tile [r1 - r0, c1 - c0] (row stride ld) = hidden[r0:r1] @ weight[c0:c1]^T
  void logits(int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* tile, int64_t ld) const {
    const int64_t w = c1 - c0;
    at::native::cpublas::brgemm(r1 - r0, w, dim, dim, w, ld, false, hidden + r0 * dim,
                                weight_cols + (c0 - v0) * dim, tile, true);
  }
  // row i of a dz tile goes through a float32 row buffer into the bfloat16 tile
  float* dz_row(float*, float* row_buffer) const { return row_buffer; }
  void emit_row(Scratch& scratch, int64_t i, const float* dz, int64_t w) const {
    at::BFloat16* row = scratch.tile.data() + i * VOCAB_BLOCK;
    at::vec::convert(dz, row, w);
    if (w % 2) row[w] = at::BFloat16(0.0f);
  }
  // acc [ROW_TILE, D] (+)= dz tile [r1 - r0, c1 - c0] @ weight[c0:c1]
  void add_row_grads(float* acc, int64_t r0, int64_t r1, int64_t c0, int64_t c1, const Scratch& scratch,
                     bool add) const {
    const int64_t k = (c1 - c0 + 1) / 2 * 2;
    at::native::cpublas::brgemm(r1 - r0, dim, k, VOCAB_BLOCK, dim, dim, add, scratch.tile.data(),
                                weight_rows + (c0 - v0) * dim, acc, true);
  }
  void keep_dz(const Scratch& scratch, int64_t r0, int64_t r1, int64_t c0, int64_t c1) const {
    for (int64_t j = 0; j < c1 - c0; ++j) {
      at::BFloat16* column = dz_t + (c0 - v0 + j) * rows;
      for (int64_t i = r0; i < r1; ++i) column[i] = scratch.tile[(i - r0) * VOCAB_BLOCK + j];
    }
  }
  // the slices' rows c0 - v0 : c1 - v0: d_weight [v1 - v0, D] += dz[:, c0:c1]^T @ hidden, d_bias [v1 - v0]
  // += the column sums of dz[:, c0:c1]
  void add_column_grads(int64_t c0, int64_t c1, float* d_weight, float* d_bias) const {
    const at::BFloat16* block = dz_t + (c0 - v0) * rows;
    if (d_weight != nullptr) {
      at::native::cpublas::brgemm(c1 - c0, dim, rows, rows, dim, dim, true, block, hidden_vnni,
                                  d_weight + (c0 - v0) * dim, true);
    }
    if (d_bias != nullptr) {
      for (int64_t j = 0; j < c1 - c0; ++j) {
        float total = 0;
        for (int64_t i = 0; i < rows; ++i) total += static_cast<float>(block[j * rows + i]);
        d_bias[c0 - v0 + j] += total;
      }
    }
  }
  static void release() { at::native::cpublas::brgemm_release(true); }
};

// Per-row inputs of the epilogue, in the compute dtype S.
template <typename S>
struct RowInputs {
  const S* bias;  // [V] or null
  const int64_t* targets;
  const S* inv_temp;
  S softcap;  // <= 0: none
};

// Block partials and target logits of the chunk's tiles. Fused: each tile is a product, transformed,
// and kept in `logits` [rows, v1 - v0] when that is given; otherwise `logits` holds the transformed
// logits already.
template <typename S, typename Products>
void stats_tiles(const Products& products, const RowInputs<S>& in, const ChunkShape& shape, bool entropy, bool mean,
                 bool square, S* partials, int64_t partial_row, S* target_logit, S* logits) {
  at::parallel_for(0, shape.row_tiles * shape.blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<S> buffer(logits == nullptr ? ROW_TILE * VOCAB_BLOCK : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / shape.blocks, b = task % shape.blocks;
      const int64_t r0 = t * ROW_TILE, r1 = shape.tile_end(t);
      const int64_t c0 = shape.block_start(b), c1 = shape.block_end(b), w = c1 - c0;
      S* tile = logits != nullptr ? logits + r0 * shape.width() + (c0 - shape.v0) : buffer.data();
      const int64_t ld = logits != nullptr ? shape.width() : VOCAB_BLOCK;
      if constexpr (Products::fused) products.logits(r0, r1, c0, c1, tile, ld);
      for (int64_t i = r0; i < r1; ++i) {
        S* z = tile + (i - r0) * ld;
        if constexpr (Products::fused) {
          transform_row(z, w, in.bias != nullptr ? in.bias + c0 : nullptr, in.softcap, in.inv_temp[i]);
        }
        const int64_t local = in.targets[i] - c0;
        if (local >= 0 && local < w) target_logit[i] = z[local];
        block_partials(z, w, entropy, mean, square, partials + i * partial_row + b * NUM_PARTIALS);
      }
    }
    if constexpr (Products::fused) products.release();
  });
}

// d_hidden [real_rows, D] += the group partials [row_tiles * groups, ROW_TILE, D] of its rows, in group order.
void add_group_partials(float* d_hidden, const float* partials, int64_t real_rows, int64_t dim, int64_t groups) {
  using V = at::vec::Vectorized<float>;
  at::parallel_for(0, real_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* out = d_hidden + i * dim;
      const float* first = partials + ((i / ROW_TILE) * groups * ROW_TILE + i % ROW_TILE) * dim;
      for (int64_t g = 0; g < groups; ++g) {
        const float* part = first + g * ROW_TILE * dim;
        int64_t j = 0;
        for (; j + V::size() <= dim; j += V::size()) (V::loadu(out + j) + V::loadu(part + j)).store(out + j);
        for (; j < dim; ++j) out[j] += part[j];
      }
    }
  });
}

// The logit gradient of the chunk's tiles for coefficients `coef` [real_rows, NUM_STATS]; rows from
// real_rows on are padding (dz = 0). Given logits: written over them, one task per tile. Fused: one
// task per row tile and group of blocks; each tile's logits are a product (or read from `logits`,
// transformed), its dz feeds the group's d_hidden partial, then the columns' gradients are formed
// over all rows, a 64-column slice per task.
template <typename S, typename Products>
void grad_tiles(const Products& products, const RowInputs<S>& in, const ChunkShape& shape, const S* stats,
                const S* coef, bool entropy, bool mean, int64_t vocab_size, int64_t real_rows, S* logits,
                float* d_hidden, float* d_weight, float* d_bias) {
  const S inv_vocab = S(1) / static_cast<S>(vocab_size);
  const bool columns = d_weight != nullptr || d_bias != nullptr;
  const int64_t per_task = Products::group_blocks;
  const int64_t groups = (shape.blocks + per_task - 1) / per_task;
  std::vector<float> partials(d_hidden != nullptr ? shape.row_tiles * groups * ROW_TILE * shape.dim : 0);
  at::parallel_for(0, shape.row_tiles * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<S> buffer(logits == nullptr ? ROW_TILE * VOCAB_BLOCK : 0), row_buffer(VOCAB_BLOCK);
    typename Products::Scratch scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / groups, first = task % groups * per_task;
      const int64_t r0 = t * ROW_TILE, r1 = shape.tile_end(t);
      for (int64_t b = first; b < std::min(shape.blocks, first + per_task); ++b) {
        const int64_t c0 = shape.block_start(b), c1 = shape.block_end(b), w = c1 - c0;
        S* tile = logits != nullptr ? logits + r0 * shape.width() + (c0 - shape.v0) : buffer.data();
        const int64_t ld = logits != nullptr ? shape.width() : VOCAB_BLOCK;
        if constexpr (Products::fused) {
          if (logits == nullptr) products.logits(r0, r1, c0, c1, tile, ld);
        }
        for (int64_t i = r0; i < r1; ++i) {
          S* z = tile + (i - r0) * ld;
          S* out = products.dz_row(z, row_buffer.data());
          if (i >= real_rows) {
            std::fill(out, out + w, S(0));
          } else {
            if (logits == nullptr) {
              transform_row(z, w, in.bias != nullptr ? in.bias + c0 : nullptr, in.softcap, in.inv_temp[i]);
            }
            const S* s = stats + i * NUM_STATS;
            const S* k = coef + i * NUM_STATS;
            GradCoef<S> c{k[LSE], k[TARGET_LOGIT], mean ? k[MEAN_LOGIT] * inv_vocab : S(0), k[ENTROPY], s[LSE],
                          s[ENTROPY]};
            grad_row(z, out, w, c0, in.targets[i], c, in.softcap, in.inv_temp[i], entropy);
          }
          products.emit_row(scratch, i - r0, out, w);
        }
        if constexpr (Products::fused) {
          if (d_hidden != nullptr) {
            products.add_row_grads(partials.data() + task * ROW_TILE * shape.dim, r0, r1, c0, c1, scratch,
                                   b > first);
          }
          if (columns) products.keep_dz(scratch, r0, r1, c0, c1);
        }
      }
    }
    if constexpr (Products::fused) products.release();
  });
  if constexpr (Products::fused) {
    if (d_hidden != nullptr) add_group_partials(d_hidden, partials.data(), real_rows, shape.dim, groups);
    if (!columns) return;
    at::parallel_for(0, (shape.width() + ROW_TILE - 1) / ROW_TILE, 1, [&](int64_t begin, int64_t end) {
      for (int64_t slice = begin; slice < end; ++slice) {
        const int64_t c0 = shape.v0 + slice * ROW_TILE;
        products.add_column_grads(c0, std::min(shape.v1, c0 + ROW_TILE), d_weight, d_bias);
      }
      products.release();
    });
  }
}

void expect(const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == shape && t.is_contiguous(),
              "osft_kernels_cpu: ", name, " must be a contiguous CPU tensor ", shape, " of ", dtype, ", got ",
              t.sizes(), " ", t.scalar_type(), t.is_contiguous() ? "" : " (not contiguous)");
}

at::ScalarType compute_dtype(const at::Tensor& logits) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(logits.dim() == 2 && (dtype == at::kFloat || dtype == at::kDouble),
              "osft_kernels_cpu: logits must be [r, w] of float32 or float64, got ", logits.sizes(), " ", dtype);
  return dtype;
}

void check_columns(int64_t v0, int64_t v1, int64_t vocab_size) {
  TORCH_CHECK(0 <= v0 && v0 <= v1 && v1 <= vocab_size && v0 % VOCAB_BLOCK == 0,
              "osft_kernels_cpu: columns v0:v1 must lie in [0, V] with v0 a multiple of ", VOCAB_BLOCK, ", got ", v0,
              ":", v1, " with V = ", vocab_size);
}

// The per-row inputs, checked against `rows` rows, the vocabulary size and the compute dtype.
template <typename S>
RowInputs<S> row_inputs(const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& inv_temp,
                        double softcap, int64_t rows, int64_t vocab_size) {
  const auto dtype = c10::CppTypeToScalarType<S>::value;
  if (bias.has_value()) expect(*bias, dtype, {vocab_size}, "bias");
  expect(targets, at::kLong, {rows}, "targets");
  expect(inv_temp, dtype, {rows}, "inv_temp");
  return {bias.has_value() ? bias->data_ptr<S>() : nullptr, targets.data_ptr<int64_t>(), inv_temp.data_ptr<S>(),
          static_cast<S>(softcap)};
}

void check_partials(const at::Tensor& partials, const at::Tensor& target_logit, const ChunkShape& shape,
                    at::ScalarType dtype) {
  TORCH_CHECK(partials.scalar_type() == dtype && partials.dim() == 3 && partials.size(0) == shape.rows &&
                  partials.size(1) == shape.blocks && partials.size(2) == NUM_PARTIALS &&
                  partials.stride(2) == 1 && partials.stride(1) == NUM_PARTIALS,
              "osft_kernels_cpu: partials must be [r, blocks, ", NUM_PARTIALS, "] of ", dtype,
              " with contiguous rows, got ", partials.sizes(), " ", partials.scalar_type());
  expect(target_logit, dtype, {shape.rows}, "target_logit");
}

void check_stats(const at::Tensor& stats, const at::Tensor& coef, int64_t real_rows, int64_t rows,
                 at::ScalarType dtype) {
  TORCH_CHECK(0 <= real_rows && real_rows <= rows, "osft_kernels_cpu: real_rows must lie in [0, r]");
  expect(stats, dtype, {real_rows, NUM_STATS}, "stats");
  expect(coef, dtype, {real_rows, NUM_STATS}, "coef");
}

// logits [r, w] of columns v0:v0+w, in place: softcap(logits + bias) / temperature.
void transform_logits(const at::Tensor& logits, const std::optional<at::Tensor>& bias, const at::Tensor& inv_temp,
                      double softcap, int64_t v0) {
  const auto dtype = compute_dtype(logits);
  const int64_t rows = logits.size(0), w = logits.size(1);
  expect(logits, dtype, {rows, w}, "logits");
  expect(inv_temp, dtype, {rows}, "inv_temp");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && v0 >= 0 && v0 + w <= bias->size(0),
                "osft_kernels_cpu: bias [V] must cover the logits' columns");
    expect(*bias, dtype, {bias->size(0)}, "bias");
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "transform_logits", [&] {
    scalar_t* z = logits.data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() + v0 : nullptr;
    const scalar_t* t = inv_temp.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) transform_row(z + i * w, w, b, static_cast<scalar_t>(softcap), t[i]);
    });
  });
}

// Block partials and target logits of transformed logits [r, w] (columns v0:v0+w of a vocabulary of V).
void buffer_stats(const at::Tensor& logits, const at::Tensor& targets, int64_t v0, int64_t vocab_size, bool entropy,
                  bool mean, bool square, const at::Tensor& partials, const at::Tensor& target_logit) {
  const auto dtype = compute_dtype(logits);
  const ChunkShape shape(logits.size(0), 0, v0, v0 + logits.size(1));
  check_columns(shape.v0, shape.v1, vocab_size);
  expect(logits, dtype, logits.sizes(), "logits");
  check_partials(partials, target_logit, shape, dtype);
  expect(targets, at::kLong, {shape.rows}, "targets");
  AT_DISPATCH_FLOATING_TYPES(dtype, "buffer_stats", [&] {
    const RowInputs<scalar_t> in{nullptr, targets.data_ptr<int64_t>(), nullptr, scalar_t(0)};
    stats_tiles<scalar_t>(GivenLogits<scalar_t>{}, in, shape, entropy, mean, square, partials.data_ptr<scalar_t>(),
                          partials.stride(0), target_logit.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>());
  });
}

// The logit gradient over transformed logits [r, w], in place, for coef [r, NUM_STATS].
void buffer_grad(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& inv_temp, double softcap,
                 int64_t v0, int64_t vocab_size, const at::Tensor& stats, const at::Tensor& coef, bool entropy,
                 bool mean) {
  const auto dtype = compute_dtype(logits);
  const ChunkShape shape(logits.size(0), 0, v0, v0 + logits.size(1));
  check_columns(shape.v0, shape.v1, vocab_size);
  expect(logits, dtype, logits.sizes(), "logits");
  check_stats(stats, coef, shape.rows, shape.rows, dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "buffer_grad", [&] {
    grad_tiles<scalar_t>(GivenLogits<scalar_t>{},
                         row_inputs<scalar_t>(std::nullopt, targets, inv_temp, softcap, shape.rows, vocab_size),
                         shape, stats.data_ptr<scalar_t>(), coef.data_ptr<scalar_t>(), entropy, mean, vocab_size,
                         shape.rows, logits.data_ptr<scalar_t>(), nullptr, nullptr, nullptr);
  });
}

const at::BFloat16* bf16_data(const at::Tensor& t) { return reinterpret_cast<const at::BFloat16*>(t.data_ptr()); }

const at::BFloat16* packed(const std::optional<at::Tensor>& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.has_value() && t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->is_contiguous() &&
                  t->numel() >= numel,
              "osft_kernels_cpu: ", name, " must be bfloat16 packed in the VNNI layout, at least ", numel,
              " entries");
  return bf16_data(*t);
}

// The bfloat16 operands hidden [r, D] (r and D even) and weight [V, D]; the chunk's shape.
ChunkShape check_bf16_operands(const at::Tensor& hidden, const at::Tensor& weight, int64_t v0, int64_t v1) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && weight.size(1) == hidden.size(1),
              "osft_kernels_cpu: hidden [r, D] and weight [V, D] expected, got ", hidden.sizes(), " and ",
              weight.sizes());
  expect(hidden, at::kBFloat16, hidden.sizes(), "hidden");
  expect(weight, at::kBFloat16, weight.sizes(), "weight");
  TORCH_CHECK(hidden.size(0) % 2 == 0 && hidden.size(1) % 2 == 0,
              "osft_kernels_cpu: bfloat16 products need an even number of rows and an even D (VNNI pairs)");
  check_columns(v0, v1, weight.size(0));
  return ChunkShape(hidden.size(0), hidden.size(1), v0, v1);
}

// fused_stats: the block partials and target logits of hidden [r, D] against weight[v0:v1] ([V, D], for
// its shape; its columns v0:v1 come packed in `weight_cols`) in bfloat16 products, keeping the
// transformed logits in `logits` [r, v1 - v0] when it is given.
void fused_stats(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& weight_cols,
                 const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& inv_temp,
                 double softcap, int64_t v0, int64_t v1, bool entropy, bool mean, bool square,
                 const at::Tensor& partials, const at::Tensor& target_logit, const std::optional<at::Tensor>& logits) {
  const ChunkShape shape = check_bf16_operands(hidden, weight, v0, v1);
  const auto in = row_inputs<float>(bias, targets, inv_temp, softcap, shape.rows, weight.size(0));
  check_partials(partials, target_logit, shape, at::kFloat);
  if (logits.has_value()) expect(*logits, at::kFloat, {shape.rows, shape.width()}, "logits");
  const Bf16Products products{bf16_data(hidden), nullptr,
                              packed(weight_cols, shape.width() * shape.dim, "weight_cols"), nullptr, nullptr,
                              shape.dim, shape.rows, v0};
  stats_tiles<float>(products, in, shape, entropy, mean, square, partials.data_ptr<float>(), partials.stride(0),
                     target_logit.data_ptr<float>(), logits.has_value() ? logits->data_ptr<float>() : nullptr);
}

// fused_grads: accumulate the gradients of hidden [real_rows of r] into d_hidden, and of the columns
// v0:v1 of weight and bias into d_weight [v1 - v0, D] and d_bias [v1 - v0], for coefficients `coef`
// [real_rows, NUM_STATS], from the logits kept by fused_stats or recomputed (weight_cols); the columns
// come packed in `weight_cols` and `weight_rows`.
void fused_grads(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const at::Tensor& targets, const at::Tensor& inv_temp, double softcap, int64_t v0, int64_t v1,
                 const at::Tensor& stats, const at::Tensor& coef, bool entropy, bool mean, int64_t real_rows,
                 const std::optional<at::Tensor>& logits, const std::optional<at::Tensor>& weight_cols,
                 const std::optional<at::Tensor>& d_hidden, const std::optional<at::Tensor>& weight_rows,
                 const std::optional<at::Tensor>& d_weight, const std::optional<at::Tensor>& d_bias,
                 const std::optional<at::Tensor>& hidden_vnni, const std::optional<at::Tensor>& dz_t) {
  const ChunkShape shape = check_bf16_operands(hidden, weight, v0, v1);
  const auto in = row_inputs<float>(bias, targets, inv_temp, softcap, shape.rows, weight.size(0));
  check_stats(stats, coef, real_rows, shape.rows, at::kFloat);
  if (logits.has_value()) expect(*logits, at::kFloat, {shape.rows, shape.width()}, "logits");
  if (d_hidden.has_value()) expect(*d_hidden, at::kFloat, {real_rows, shape.dim}, "d_hidden");
  if (d_weight.has_value()) expect(*d_weight, at::kFloat, {shape.width(), shape.dim}, "d_weight");
  if (d_bias.has_value()) expect(*d_bias, at::kFloat, {shape.width()}, "d_bias");
  const bool columns = d_weight.has_value() || d_bias.has_value();
  const Bf16Products products{
      bf16_data(hidden),
      d_weight.has_value() ? packed(hidden_vnni, hidden.numel(), "hidden_vnni") : nullptr,
      logits.has_value() ? nullptr : packed(weight_cols, shape.width() * shape.dim, "weight_cols"),
      d_hidden.has_value() ? packed(weight_rows, (shape.width() + 1) / 2 * 2 * shape.dim, "weight_rows") : nullptr,
      columns ? const_cast<at::BFloat16*>(packed(dz_t, shape.rows * shape.width(), "dz_t")) : nullptr, shape.dim,
      shape.rows, v0};
  auto data = [](const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; };
  grad_tiles<float>(products, in, shape, stats.data_ptr<float>(), coef.data_ptr<float>(), entropy, mean,
                    weight.size(0), real_rows, data(logits), data(d_hidden), data(d_weight), data(d_bias));
}

// "capability row_tile vocab_block num_stats num_partials", checked against the Python constants at import
std::string build_info() {
  return std::string(CAPABILITY) + " " + std::to_string(ROW_TILE) + " " + std::to_string(VOCAB_BLOCK) + " " +
         std::to_string(NUM_STATS) + " " + std::to_string(NUM_PARTIALS);
}

}  // namespace
}  // namespace osft

TORCH_LIBRARY(osft_kernels_cpu, m) {
  m.def("transform_logits(Tensor(a!) logits, Tensor? bias, Tensor inv_temp, float softcap, int v0) -> ()");
  m.def("buffer_stats(Tensor logits, Tensor targets, int v0, int vocab_size, bool entropy, bool mean, bool square, "
        "Tensor(a!) partials, Tensor(b!) target_logit) -> ()");
  m.def("buffer_grad(Tensor(a!) logits, Tensor targets, Tensor inv_temp, float softcap, int v0, int vocab_size, "
        "Tensor stats, Tensor coef, bool entropy, bool mean) -> ()");
  m.def("fused_stats(Tensor hidden, Tensor weight, Tensor weight_cols, Tensor? bias, Tensor targets, "
        "Tensor inv_temp, float softcap, int v0, int v1, bool entropy, bool mean, bool square, Tensor(a!) partials, "
        "Tensor(b!) target_logit, Tensor(c!)? logits) -> ()");
  m.def("fused_grads(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor inv_temp, float softcap, "
        "int v0, int v1, Tensor stats, Tensor coef, bool entropy, bool mean, int real_rows, Tensor? logits, "
        "Tensor? weight_cols, Tensor(a!)? d_hidden, Tensor? weight_rows, Tensor(b!)? d_weight, Tensor(c!)? d_bias, "
        "Tensor? hidden_vnni, Tensor(d!)? dz_t) -> ()");
  m.def("build_info() -> str", &osft::build_info);
}

TORCH_LIBRARY_IMPL(osft_kernels_cpu, CPU, m) {
  m.impl("transform_logits", &osft::transform_logits);
  m.impl("buffer_stats", &osft::buffer_stats);
  m.impl("buffer_grad", &osft::buffer_grad);
  m.impl("fused_stats", &osft::fused_stats);
  m.impl("fused_grads", &osft::fused_grads);
}
