// Per-row softmax math of the chunked driver's epilogue, shared by the CPU and CUDA sources.
//
// Every function is a template over the value type T: a scalar (float, double; host or device) or a
// CPU SIMD vector (at::vec::Vectorized<float>), so the CUDA kernels run the same formulas that the CPU
// build is tested with. Elementary functions come from Math<T>, specialized here for float and double
// and by the CPU source for its vector types before use.
//
// Layouts (they mirror osft_kernels/row_stats.py and osft_kernels/driver.py, and are checked against
// them at import): statistics [n, NUM_STATS], block partials [n, blocks, NUM_PARTIALS].
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define OSFT_HD __host__ __device__ __forceinline__
#else
#define OSFT_HD inline
#endif

namespace osft {

// statistics columns
constexpr int LSE = 0, TARGET_LOGIT = 1, MEAN_LOGIT = 2, ENTROPY = 3, MAX_LOGIT = 4, SQUARE_LSE = 5;
constexpr int NUM_STATS = 6;
// block partials: running max m, sum e^(z-m), sum e^(z-m) (z-m), sum z, sum e^(2(z-m))
constexpr int PARTIAL_MAX = 0, PARTIAL_SUM = 1, PARTIAL_ENTROPY = 2, PARTIAL_LOGIT_SUM = 3, PARTIAL_SQUARE_SUM = 4;
constexpr int NUM_PARTIALS = 5;
constexpr int VOCAB_BLOCK = 2048;
// a block max of -inf (a fully masked block) is clamped here so that z - max stays finite
constexpr float FINITE_MIN = -3.0e38f;
// log-probabilities are clamped here before they multiply p: e^LOG_ZERO is 0 even in float64, so a
// -inf logit (a masked vocabulary entry) contributes 0 * LOG_ZERO = 0 instead of 0 * -inf = NaN
constexpr float LOG_ZERO = -1.0e4f;

template <typename T>
struct Math;

template <>
struct Math<float> {
  static OSFT_HD float exp(float x) { return ::expf(x); }
  static OSFT_HD float tanh(float x) { return ::tanhf(x); }
  static OSFT_HD float max(float a, float b) { return a > b ? a : b; }
};

template <>
struct Math<double> {
  static OSFT_HD double exp(double x) { return ::exp(x); }
  static OSFT_HD double tanh(double x) { return ::tanh(x); }
  static OSFT_HD double max(double a, double b) { return a > b ? a : b; }
};

// The logit as every statistic sees it: z = softcap * tanh((raw + bias) / softcap) / temperature.
// `raw_plus_bias` already holds the bias; `softcap` <= 0 means none.
template <typename T, typename S>
OSFT_HD T transformed_logit(T raw_plus_bias, S softcap, S inv_temp) {
  T s = raw_plus_bias;
  if (softcap > S(0)) {
    s = T(softcap) * Math<T>::tanh(s / T(softcap));
  }
  return s * T(inv_temp);
}

// d tanh-softcap / d raw at a transformed logit z: 1 - (z * temperature / softcap)^2 (1 without softcap).
template <typename T, typename S>
OSFT_HD T softcap_slope(T z, S softcap, S inv_temp) {
  if (!(softcap > S(0))) {
    return T(1);
  }
  T t = z * T(S(1) / (inv_temp * softcap));
  return T(1) - t * t;
}

// The terms of one block's partials for one logit, given the block max m: e = e^(z - m) and the
// entropy term e * max(z - m, LOG_ZERO).
template <typename T>
OSFT_HD T shifted_exp(T z, T m) {
  return Math<T>::exp(z - m);
}

template <typename T>
OSFT_HD T entropy_term(T z, T m, T e) {
  return e * Math<T>::max(z - m, T(LOG_ZERO));
}

// Per-row coefficients of the logit gradient: the gradients on the statistics divided by temperature.
template <typename S>
struct GradCoef {
  S lse, target, mean_over_vocab, entropy;
  S row_lse, row_entropy;
};

// The gradient on a pre-softcap logit, for a column that is not the target:
// dz = p (c_lse - c_entropy (log p + entropy)) + c_mean / V, times the softcap slope.
// The target column adds c_target before the slope (target_grad).
template <typename T, typename S>
OSFT_HD T logit_grad_value(T z, const GradCoef<S>& c, bool entropy) {
  T log_p = z - T(c.row_lse);
  T p = Math<T>::exp(log_p);
  T g;
  if (entropy) {
    g = p * (T(c.lse) - T(c.entropy) * (Math<T>::max(log_p, T(LOG_ZERO)) + T(c.row_entropy)));
  } else {
    g = p * T(c.lse);
  }
  return g + T(c.mean_over_vocab);
}

}  // namespace osft
