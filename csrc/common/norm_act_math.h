// Per-element math shared by the CPU and CUDA kernels, so the CPU test suite
// exercises the exact expressions the GPU kernels run.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RESFAST_HD __host__ __device__ __forceinline__
#else
// Always inlined: a call left inside a `#pragma omp simd` loop stops it vectorising.
#define RESFAST_HD inline __attribute__((always_inline))
#endif

namespace resfast {

// Codes of the `activation` string argument of the ops (see ops.cpp).
enum class Activation : int { Identity = 0, ReLU = 1, SiLU = 2, ReLU6 = 3 };

#if !defined(__CUDA_ARCH__)
// exp_vectorizable's clamp bounds, -87 and 89 (norm_act_math.cpp). Their
// values are hidden from the compiler on purpose: with constant bounds GCC
// folds exp of each bound and blends those results in after the polynomial
// (four compares and three blends per vector), which made SiLU 25% slower
// with AVX-512 and 2.4x slower with AVX2 than the two min/max it emits now.
extern const float kExpClampLow;
extern const float kExpClampHigh;
#endif

// exp(x) for float32 in plain arithmetic (Cephes' expf: x = n ln2 + r,
// |r| <= ln2 / 2, a degree-6 polynomial in r, 2^n built in the exponent
// bits), within 2 ulp on [-87, 88.37].
// Unlike std::exp it vectorises inside `#pragma omp simd` loops (given
// -fno-trapping-math, see setup.py): a scalar libm call there made the CPU
// SiLU passes ~10x slower than torch's.
RESFAST_HD float exp_vectorizable(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  // Clamped so that 2^n is a normal float or, from x = 88.38 (n = 128), +inf,
  // as expf overflows (a little later, at 88.72): SiLU(-100) is then -0 and
  // SiLU(-inf) NaN, as torch's; on (-88.72, -88.38] SiLU is -0 where torch's
  // is at most 3e-37 in magnitude. exp(-87) ~ 1.6e-38 is 0 for every use
  // here (sigmoid, SiLU). Written as max/min: NaN becomes the low bound, and
  // every caller's result is NaN through its own NaN input.
  x = x > kExpClampLow ? x : kExpClampLow;
  x = x < kExpClampHigh ? x : kExpClampHigh;
  // n = round(x / ln2) by adding 1.5 * 2^23: the sum's low mantissa bits are
  // n, with no float-int conversions (28% faster than a floor with AVX-512).
  constexpr float kRound = 12582912.0f;
  const float shifted = x * 1.44269504088896341f + kRound;
  const float fn = shifted - kRound;
  const int n = __builtin_bit_cast(int, shifted) - __builtin_bit_cast(int, kRound);
  const float r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * __builtin_bit_cast(float, (n + 127) << 23);
#endif
}

RESFAST_HD double exp_vectorizable(double x) { return ::exp(x); }

template <typename acc_t>
RESFAST_HD acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + exp_vectorizable(-z));
}

// The activation is a template argument, resolved at compile time, so the
// kernels' inner loops stay free of branches and vectorise.
template <Activation A, typename acc_t>
RESFAST_HD acc_t activate(acc_t z) {
  if constexpr (A == Activation::ReLU) {
    // Written so that NaN passes through, as torch.relu lets it.
    return z < acc_t(0) ? acc_t(0) : z;
  } else if constexpr (A == Activation::SiLU) {
    // As torch writes it; one division and no multiply after it.
    return z / (acc_t(1) + exp_vectorizable(-z));
  } else if constexpr (A == Activation::ReLU6) {
    // torch's hardtanh(z, 0, 6): NaN passes through.
    return z < acc_t(0) ? acc_t(0) : (z > acc_t(6) ? acc_t(6) : z);
  } else {
    return z;
  }
}

// grad * act'(z). ReLU'(0) is 0 and ReLU'(NaN) is 1, as torch's
// threshold_backward (grad where not z <= 0) defines them; ReLU6' is 0 at 0
// and 6 and 1 at NaN, as hardtanh_backward's.
template <Activation A, typename acc_t>
RESFAST_HD acc_t activation_backward(acc_t z, acc_t grad) {
  if constexpr (A == Activation::ReLU) {
    return z <= acc_t(0) ? acc_t(0) : grad;
  } else if constexpr (A == Activation::SiLU) {
    const acc_t s = sigmoid(z);
    return grad * s * (acc_t(1) + z * (acc_t(1) - s));
  } else if constexpr (A == Activation::ReLU6) {
    return (z <= acc_t(0) || z >= acc_t(6)) ? acc_t(0) : grad;
  } else {
    return grad;
  }
}

// The normalisation is written as (x - mean) * scale + shift rather than
// x * scale + (shift - mean * scale): subtracting the mean first is exact for
// inputs close to it, so large-mean inputs keep their precision.
template <typename acc_t>
RESFAST_HD acc_t normalize(acc_t x, acc_t mean, acc_t scale, acc_t shift) {
  return (x - mean) * scale + shift;
}

// Running (count, mean, sum of squared deviations) of a set of values.
template <typename acc_t>
struct Moments {
  acc_t n;
  acc_t mean;
  acc_t m2;
};

// Moments of values given as sums of (x - pivot) and (x - pivot)^2: shifting by
// a sample of the same channel keeps the sums small whatever the mean is.
template <typename acc_t>
RESFAST_HD Moments<acc_t> moments_from_shifted_sums(acc_t n, acc_t pivot, acc_t sum, acc_t sum_sq) {
  if (n <= acc_t(0)) return {acc_t(0), acc_t(0), acc_t(0)};
  const acc_t d = sum / n;
  acc_t m2 = sum_sq - d * sum;
  if (m2 < acc_t(0)) m2 = acc_t(0);
  return {n, pivot + d, m2};
}

// Chan et al.'s parallel combination of two sets' moments.
template <typename acc_t>
RESFAST_HD Moments<acc_t> merge_moments(Moments<acc_t> a, Moments<acc_t> b) {
  const acc_t n = a.n + b.n;
  if (n <= acc_t(0)) return {acc_t(0), acc_t(0), acc_t(0)};
  const acc_t delta = b.mean - a.mean;
  const acc_t wb = b.n / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

// a + b * (x - mean), centred so that large-mean inputs stay exact: with
// a = grad_mean / m and b = 2 grad_var / m, the gradient of a (mean, biased
// variance) over m values with respect to one value x.
template <typename acc_t>
RESFAST_HD acc_t centered_affine(acc_t x, acc_t mean, acc_t a, acc_t b) {
  return a + b * (x - mean);
}

// Gradient of (mean, biased variance) over m values with respect to one value x.
template <typename acc_t>
RESFAST_HD acc_t channel_stats_grad(acc_t x, acc_t mean, acc_t grad_mean, acc_t grad_var, acc_t inv_m) {
  return centered_affine(x, mean, grad_mean * inv_m, acc_t(2) * grad_var * inv_m);
}

}  // namespace resfast
