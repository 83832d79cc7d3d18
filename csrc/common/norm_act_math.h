// Per-element math shared by the CPU and CUDA kernels, so the CPU test suite
// exercises the exact expressions the GPU kernels run.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RESFAST_HD __host__ __device__ __forceinline__
#else
#define RESFAST_HD inline
#endif

namespace resfast {

// Codes of the `activation` string argument of the ops (see ops.cpp).
enum class Activation : int { Identity = 0, ReLU = 1, SiLU = 2 };

template <typename acc_t>
RESFAST_HD acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + ::exp(-z));
}

// The activation is a template argument, resolved at compile time, so the
// kernels' inner loops stay free of branches and vectorise.
template <Activation A, typename acc_t>
RESFAST_HD acc_t activate(acc_t z) {
  if constexpr (A == Activation::ReLU) {
    // Written so that NaN passes through, as torch.relu lets it.
    return z < acc_t(0) ? acc_t(0) : z;
  } else if constexpr (A == Activation::SiLU) {
    return z * sigmoid(z);
  } else {
    return z;
  }
}

// grad * act'(z). ReLU'(0) is 0 and ReLU'(NaN) is 1, as torch's
// threshold_backward (grad where not z <= 0) defines them.
template <Activation A, typename acc_t>
RESFAST_HD acc_t activation_backward(acc_t z, acc_t grad) {
  if constexpr (A == Activation::ReLU) {
    return z <= acc_t(0) ? acc_t(0) : grad;
  } else if constexpr (A == Activation::SiLU) {
    const acc_t s = sigmoid(z);
    return grad * s * (acc_t(1) + z * (acc_t(1) - s));
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

// Gradient of (mean, biased variance) over m values with respect to one value x.
template <typename acc_t>
RESFAST_HD acc_t channel_stats_grad(acc_t x, acc_t mean, acc_t grad_mean, acc_t grad_var, acc_t inv_m) {
  return (grad_mean + acc_t(2) * grad_var * (x - mean)) * inv_m;
}

}  // namespace resfast
