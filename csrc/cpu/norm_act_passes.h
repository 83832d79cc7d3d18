// The per-element passes of a per-(sample, channel) or per-channel
// normalisation followed by an activation, shared by the fused conv unit
// (norm_act_conv2d.cpp) and GroupNorm (group_norm.cpp). Loops are written for
// channel_loops.h's runs: NCHW planes and channels_last rows.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <cstdint>

#include "../common/norm_act_math.h"
#include "block_sums.h"

namespace resfast::cpu {

// mean/scale/shift of shape (C,) or (N, C), indexed by (n, c).
template <typename acc_t>
struct NormParams {
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* shift;
  int64_t sample_stride;

  NormParams(const acc_t* m, const acc_t* s, const acc_t* b, int64_t sample_stride)
      : mean(m), scale(s), shift(b), sample_stride(sample_stride) {}
  NormParams(const at::Tensor& m, const at::Tensor& s, const at::Tensor& b)
      : NormParams(m.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
                   m.dim() == 2 ? m.size(1) : 0) {}

  int64_t index(int64_t n, int64_t c) const { return n * sample_stride + c; }
};

// a = act((x - mean) * scale + shift), rounded to out_t.
template <typename in_t, typename out_t, typename acc_t, Activation A>
struct NormalizeActivate {
  const in_t* __restrict__ x;
  out_t* __restrict__ a;
  NormParams<acc_t> p;
  int64_t channels;

  void plane(int64_t n, int64_t c, int64_t offset, int64_t x_offset, int64_t length) const {
    const int64_t k = p.index(n, c);
    const acc_t m = p.mean[k], s = p.scale[k], b = p.shift[k];
    const in_t* __restrict__ xp = x + x_offset;
    out_t* __restrict__ ap = a + offset;
#pragma omp simd
    for (int64_t i = 0; i < length; ++i) {
      ap[i] = static_cast<out_t>(activate<A>(normalize<acc_t>(static_cast<acc_t>(xp[i]), m, s, b)));
    }
  }

  void row(int64_t n, int64_t offset, int64_t x_offset) const {
    const int64_t k0 = p.index(n, 0);
    const acc_t* __restrict__ m = p.mean + k0;
    const acc_t* __restrict__ s = p.scale + k0;
    const acc_t* __restrict__ b = p.shift + k0;
    const in_t* __restrict__ xr = x + x_offset;
    out_t* __restrict__ ar = a + offset;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      ar[c] = static_cast<out_t>(activate<A>(normalize<acc_t>(static_cast<acc_t>(xr[c]), m[c], s[c], b[c])));
    }
  }
};

// From grad_a, the gradient of the convolution's input: dz = grad_a * act'(z),
// grad_x = dz * scale, and the sums of dz and dz * (x - mean) (grad_x, grad_a
// and x must not overlap). kWriteGradX = false only reduces the sums
// (GroupNorm's backward when no input gradient is asked for).
template <typename in_t, typename out_t, typename acc_t, Activation A, bool kWriteGradX = true>
struct ActivationBackward {
  using sum_t = acc_t;
  const in_t* __restrict__ x;
  const out_t* __restrict__ grad_a;
  in_t* __restrict__ grad_x;
  NormParams<acc_t> p;
  int64_t channels;

  std::array<double, 2> plane(int64_t n, int64_t c, int64_t offset, int64_t x_offset, int64_t length) const {
    const int64_t k = p.index(n, c);
    const acc_t m = p.mean[k], s = p.scale[k], b = p.shift[k];
    const in_t* __restrict__ xp = x + x_offset;
    const out_t* __restrict__ gp = grad_a + offset;
    in_t* __restrict__ gx = kWriteGradX ? grad_x + offset : nullptr;
    return block_sums<2, acc_t>(0, length, [&](int64_t i, acc_t* t) {
      const acc_t centered = static_cast<acc_t>(xp[i]) - m;
      const acc_t dz = activation_backward<A>(centered * s + b, static_cast<acc_t>(gp[i]));
      if constexpr (kWriteGradX) gx[i] = static_cast<in_t>(dz * s);
      t[0] = dz;
      t[1] = dz * centered;
    });
  }

  void row(int64_t n, int64_t offset, int64_t x_offset, acc_t* __restrict__ acc) const {
    const int64_t k0 = p.index(n, 0);
    const acc_t* __restrict__ m = p.mean + k0;
    const acc_t* __restrict__ s = p.scale + k0;
    const acc_t* __restrict__ b = p.shift + k0;
    acc_t* __restrict__ sum_dz = acc;
    acc_t* __restrict__ sum_dz_x = acc + channels;
    const in_t* __restrict__ xr = x + x_offset;
    const out_t* __restrict__ gr = grad_a + offset;
    in_t* __restrict__ gx = kWriteGradX ? grad_x + offset : nullptr;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t centered = static_cast<acc_t>(xr[c]) - m[c];
      const acc_t dz = activation_backward<A>(centered * s[c] + b[c], static_cast<acc_t>(gr[c]));
      if constexpr (kWriteGradX) gx[c] = static_cast<in_t>(dz * s[c]);
      sum_dz[c] += dz;
      sum_dz_x[c] += dz * centered;
    }
  }
};

// The input gradient in one pass once the sums are known: grad_x = dz *
// scale + a + b * (x - mean), dz = grad_a * act'(z), with a, b the statistics'
// share (stats_grad.h), indexed like the parameters. grad_x may be grad_a's
// own storage (same dtype and layout): each element is read before it is
// written, so the two are not declared __restrict__.
template <typename in_t, typename out_t, typename acc_t, Activation A>
struct ActivationInputGrad {
  const in_t* __restrict__ x;
  const out_t* grad_a;
  in_t* grad_x;
  NormParams<acc_t> p;
  const acc_t* __restrict__ a;
  const acc_t* __restrict__ b;
  int64_t channels;

  void plane(int64_t n, int64_t c, int64_t offset, int64_t x_offset, int64_t length) const {
    const int64_t k = p.index(n, c);
    const acc_t m = p.mean[k], s = p.scale[k], sh = p.shift[k], ca = a[k], cb = b[k];
    const in_t* __restrict__ xp = x + x_offset;
    const out_t* gp = grad_a + offset;
    in_t* gx = grad_x + offset;
#pragma omp simd
    for (int64_t i = 0; i < length; ++i) {
      const acc_t xv = static_cast<acc_t>(xp[i]);
      const acc_t dz = activation_backward<A>((xv - m) * s + sh, static_cast<acc_t>(gp[i]));
      gx[i] = static_cast<in_t>(dz * s + centered_affine(xv, m, ca, cb));
    }
  }

  void row(int64_t n, int64_t offset, int64_t x_offset) const {
    const int64_t k0 = p.index(n, 0);
    const acc_t* __restrict__ m = p.mean + k0;
    const acc_t* __restrict__ s = p.scale + k0;
    const acc_t* __restrict__ sh = p.shift + k0;
    const acc_t* __restrict__ ca = a + k0;
    const acc_t* __restrict__ cb = b + k0;
    const in_t* __restrict__ xr = x + x_offset;
    const out_t* gr = grad_a + offset;
    in_t* gx = grad_x + offset;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t xv = static_cast<acc_t>(xr[c]);
      const acc_t dz = activation_backward<A>((xv - m[c]) * s[c] + sh[c], static_cast<acc_t>(gr[c]));
      gx[c] = static_cast<in_t>(dz * s[c] + centered_affine(xv, m[c], ca[c], cb[c]));
    }
  }
};

}  // namespace resfast::cpu
