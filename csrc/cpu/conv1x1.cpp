#include "conv1x1.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>

#include "channel_loops.h"
#include "dispatch.h"
#include "norm_act_passes.h"

namespace resfast::cpu {
namespace {

// A chunk's activations, positions x channels: 128 KiB in float32, which
// leaves room in a 512 KiB L2 for the GEMM's other operand tiles.
constexpr int64_t kChunkValues = 32768;
// Positions per chunk at least (fewer when a sample has fewer): narrower
// GEMMs lose more to their overheads than the smaller buffer saves.
constexpr int64_t kMinChunk = 128;
// Positions per sample below which a whole-batch convolution on a full
// temporary wins (measured on an AMD EPYC: 2048->512 at 2x2 ran 2.5x slower in
// per-sample GEMMs); such temporaries are small anyway.
constexpr int64_t kMinPositions = 64;
// Rows summed in the accumulation dtype before the sums go to double (as
// channel_loops.h's sum_per_sample_channel).
constexpr int64_t kRowsPerSum = 256;

// Each sample's positions in chunks of `size` (the last one shorter).
struct Chunks {
  int64_t hw, size, per_sample;

  Chunks(int64_t hw, int64_t channels)
      : hw(hw), size(std::min(hw, (std::clamp<int64_t>(kChunkValues / std::max<int64_t>(channels, 1), kMinChunk, 4096) + 15) /
                                      16 * 16)),
        per_sample((hw + size - 1) / size) {}

  int64_t begin(int64_t chunk) const { return (chunk % per_sample) * size; }
  int64_t end(int64_t chunk) const { return std::min(begin(chunk) + size, hw); }
};

// This is a kernel: the GEMMs it calls on its operands (the weight may
// require grad) skip autograd, in every thread of the parallel region (the
// dispatcher's thread-local state is not inherited by OpenMP's workers).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// The convolution's weight as an (OC, C) matrix.
at::Tensor weight_matrix(const at::Tensor& weight) { return weight.reshape({weight.size(0), weight.size(1)}); }

// act((x - mean) * scale + shift) of positions [p0, p1) of sample n into a
// dense buffer: rows of C values (channels_last) or planes of p1 - p0 (NCHW).
template <typename scalar_t, Activation A>
void activate_chunk(const Geometry& g, const scalar_t* x, const NormParams<scalar_t>& p, int64_t n, int64_t p0,
                    int64_t p1, scalar_t* a) {
  const NormalizeActivate<scalar_t, scalar_t, scalar_t, A> kernel{x, a, p, g.c};
  run_with_best_isa([&] {
    if (g.channels_last) {
      for (int64_t q = p0; q < p1; ++q) kernel.row(n, (q - p0) * g.c, g.x_row(n, q));
    } else {
      for (int64_t c = 0; c < g.c; ++c) kernel.plane(n, c, c * (p1 - p0), g.x_plane(n, c) + p0, p1 - p0);
    }
  });
}

// The chunk's activations as the GEMM operand: (positions, C) or (C, positions).
at::Tensor chunk_matrix(const at::Tensor& buffer, const Geometry& g, int64_t len) {
  const at::Tensor flat = buffer.narrow(0, 0, len * g.c);
  return g.channels_last ? flat.view({len, g.c}) : flat.view({g.c, len});
}

// A dense tensor laid out like x, (N, K, H, W) or (N, K, D, H, W), seen per
// chunk: (positions, K) rows (channels_last) or a (K, positions) block of
// sample n (NCHW).
at::Tensor chunk_of(const at::Tensor& t, const Geometry& g, int64_t n, int64_t p0, int64_t len) {
  const int64_t k = t.size(1);
  if (g.channels_last) return t.movedim(1, -1).reshape({g.n * g.hw, k}).narrow(0, n * g.hw + p0, len);
  return t.select(0, n).view({k, g.hw}).narrow(1, p0, len);
}

template <typename scalar_t, Activation A>
void forward_chunks(const at::Tensor& x, const Geometry& g, const NormParams<scalar_t>& p, const at::Tensor& w2d,
                    const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const Chunks chunks(g.hw, g.c);
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  at::parallel_for(0, g.n * chunks.per_sample, 1, [&](int64_t begin, int64_t end) {
    const BelowAutograd below_autograd;
    at::Tensor buffer = at::empty({chunks.size * g.c}, w2d.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks.per_sample, p0 = chunks.begin(t), len = chunks.end(t) - p0;
      activate_chunk<scalar_t, A>(g, px, p, n, p0, p0 + len, buffer.data_ptr<scalar_t>());
      const at::Tensor a = chunk_matrix(buffer, g, len);
      at::Tensor out = chunk_of(y, g, n, p0, len);
      if (g.channels_last) {
        bias.has_value() ? at::addmm_out(out, *bias, a, w2d.t()) : at::mm_out(out, a, w2d.t());
      } else {
        bias.has_value() ? at::addmm_out(out, bias->view({-1, 1}), w2d, a) : at::mm_out(out, w2d, a);
      }
    }
  });
}

template <typename scalar_t, Activation A>
void backward_chunks(const at::Tensor& grad_out, const at::Tensor& x, const Geometry& g,
                     const NormParams<scalar_t>& p, const at::Tensor& w2d, std::array<bool, 2> mask,
                     Conv1x1Grads& out) {
  const auto [want_input, want_weight] = mask;
  const Chunks chunks(g.hw, g.c);
  const int64_t tasks = g.n * chunks.per_sample;
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  // Per chunk, [C][2] sums; added per sample in chunk order (deterministic).
  std::vector<double> partial(want_input ? tasks * g.c * 2 : 0);
  // Per thread, the weight gradient of its chunks; added in thread order.
  std::vector<at::Tensor> grad_w(want_weight ? at::get_num_threads() : 0);
  scalar_t* pgx = want_input ? out.grad_x.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const BelowAutograd below_autograd;
    at::Tensor a_buffer = want_weight ? at::empty({chunks.size * g.c}, w2d.options()) : at::Tensor();
    at::Tensor ga_buffer = want_input ? at::empty({chunks.size * g.c}, w2d.options()) : at::Tensor();
    at::Tensor& gw = want_weight ? grad_w[at::get_thread_num()] : a_buffer;
    if (want_weight && !gw.defined()) gw = at::zeros_like(w2d);
    std::vector<scalar_t> acc(2 * g.c);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks.per_sample, p0 = chunks.begin(t), len = chunks.end(t) - p0;
      const at::Tensor gy = chunk_of(grad_out, g, n, p0, len);  // (len, OC) or (OC, len)
      if (want_weight) {
        activate_chunk<scalar_t, A>(g, px, p, n, p0, p0 + len, a_buffer.data_ptr<scalar_t>());
        const at::Tensor a = chunk_matrix(a_buffer, g, len);
        g.channels_last ? gw.addmm_(gy.t(), a) : gw.addmm_(gy, a.t());
      }
      if (!want_input) continue;
      at::Tensor ga = chunk_matrix(ga_buffer, g, len);
      g.channels_last ? at::mm_out(ga, gy, w2d) : at::mm_out(ga, w2d.t(), gy);
      const scalar_t* pga = ga_buffer.const_data_ptr<scalar_t>();
      double* sums = partial.data() + t * g.c * 2;
      run_with_best_isa([&] {
        if (g.channels_last) {
          // grad_x's rows of this chunk are contiguous: the kernel's offsets index both.
          const ActivationBackward<scalar_t, scalar_t, scalar_t, A> kernel{px, pga, pgx + (n * g.hw + p0) * g.c, p,
                                                                           g.c};
          for (int64_t r0 = 0; r0 < len; r0 += kRowsPerSum) {
            std::fill(acc.begin(), acc.end(), scalar_t(0));
            for (int64_t r = r0; r < std::min(r0 + kRowsPerSum, len); ++r) {
              kernel.row(n, r * g.c, g.x_row(n, p0 + r), acc.data());
            }
            for (int64_t c = 0; c < g.c; ++c) {
              sums[c * 2] += acc[c];
              sums[c * 2 + 1] += acc[g.c + c];
            }
          }
        } else {
          for (int64_t c = 0; c < g.c; ++c) {
            const ActivationBackward<scalar_t, scalar_t, scalar_t, A> kernel{
                px, pga + c * len, pgx + (n * g.c + c) * g.hw + p0, p, g.c};
            const std::array<double, 2> s = kernel.plane(n, c, 0, g.x_plane(n, c) + p0, len);
            sums[c * 2] = s[0];
            sums[c * 2 + 1] = s[1];
          }
        }
      });
    }
  });
  if (want_input) {
    out.sums.assign(g.n * g.c * 2, 0.0);
    for (int64_t t = 0; t < tasks; ++t) {
      double* dst = out.sums.data() + (t / chunks.per_sample) * g.c * 2;
      const double* src = partial.data() + t * g.c * 2;
      for (int64_t k = 0; k < g.c * 2; ++k) dst[k] += src[k];
    }
  }
  if (want_weight) {
    at::Tensor total;
    for (const at::Tensor& gw : grad_w) {
      if (gw.defined()) total = total.defined() ? total.add_(gw) : gw;
    }
    out.grad_weight = total.defined() ? total : at::zeros_like(w2d);
  }
}

}  // namespace

bool conv1x1_applies(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                     c10::IntArrayRef padding, int64_t groups) {
  const auto t = x.scalar_type();
  for (int64_t d = 0; d < x.dim() - 2; ++d) {
    if (weight.size(2 + d) != 1 || stride[d] != 1 || padding[d] != 0) return false;
  }
  return groups == 1 && weight.scalar_type() == t && (t == at::kFloat || t == at::kDouble) && x.size(0) > 0 &&
         spatial_numel(x) >= kMinPositions;
}

at::Tensor conv1x1_forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                           const at::Tensor& shift, Activation activation, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  const Geometry g = geometry(x);
  std::vector<int64_t> shape = x.sizes().vec();
  shape[1] = weight.size(0);
  at::Tensor y = at::empty(shape, x.options().memory_format(kernel_format(x)));
  const at::Tensor w2d = weight_matrix(weight);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv1x1_forward", [&] {
    const NormParams<scalar_t> p(mean, scale, shift);
    dispatch_activation(activation, [&](auto act) {
      forward_chunks<scalar_t, decltype(act)::value>(x, g, p, w2d, bias, y);
    });
  });
  return y;
}

Conv1x1Grads conv1x1_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                              const at::Tensor& scale, const at::Tensor& shift, Activation activation,
                              const at::Tensor& weight, std::array<bool, 2> output_mask) {
  const Geometry g = geometry(x);
  const at::Tensor w2d = weight_matrix(weight);
  const at::Tensor gy = grad_out.contiguous(kernel_format(x));
  Conv1x1Grads out;
  if (output_mask[0]) out.grad_x = at::empty(x.sizes(), x.options().memory_format(kernel_format(x)));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv1x1_backward", [&] {
    const NormParams<scalar_t> p(mean, scale, shift);
    dispatch_activation(activation, [&](auto act) {
      backward_chunks<scalar_t, decltype(act)::value>(gy, x, g, p, w2d, output_mask, out);
    });
  });
  if (out.grad_weight.defined()) out.grad_weight = out.grad_weight.view(weight.sizes()).contiguous(kernel_format(weight));
  return out;
}

}  // namespace resfast::cpu
