// CPU kernels of the fused norm→activation→conv unit (2-D or 3-D). The normalised,
// activated input exists only as a temporary for ATen's convolution: it is
// written by one fused pass and dropped when the op returns, in the forward
// and again (recomputed) in the backward, which then applies act'(z) and
// reduces the per-channel gradient sums in a single pass.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/norm_act_math.h"
#include "channel_loops.h"
#include "channel_stats.h"
#include "conv1x1.h"
#include "conv_epilogue.h"
#include "dispatch.h"
#include "layout_copy.h"
#include "norm_act_passes.h"
#include "stats_grad.h"

namespace resfast::cpu {
namespace {

struct UnitArgs {
  at::Tensor x;  // read in place when kernel_readable (a channel slice), else a copy
  at::Tensor mean, scale, shift;
  Activation activation;
  at::MemoryFormat format;
};

UnitArgs check_unit_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                         const at::Tensor& shift, const at::Tensor& weight, c10::IntArrayRef stride,
                         c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                         c10::string_view activation) {
  check_activation_input(x, "x");
  check_norm_params(x, mean, scale, shift);
  check_conv_args(x, weight, stride, padding, dilation, groups);
  check_compute_dtype(x, weight);
  const at::MemoryFormat format = kernel_format(x);
  return {kernel_input(x), mean.contiguous(), scale.contiguous(), shift.contiguous(),
          parse_activation(activation), format};
}

// act((x - mean) * scale + shift) in `dtype`, laid out like x.
at::Tensor normalize_activate(const UnitArgs& u, at::ScalarType dtype) {
  at::Tensor out = at::empty(u.x.sizes(), u.x.options().dtype(dtype).memory_format(u.format));
  const Geometry g = geometry(u.x);
  dispatch_in_out(u.x.scalar_type(), dtype, [&](auto in_tag, auto out_tag) {
    using in_t = typename decltype(in_tag)::type;
    using out_t = typename decltype(out_tag)::type;
    using acc_t = at::opmath_type<in_t>;
    const NormParams<acc_t> p(u.mean, u.scale, u.shift);
    dispatch_activation(u.activation, [&](auto act) {
      for_each_run(g, NormalizeActivate<in_t, out_t, acc_t, decltype(act)::value>{
                          u.x.const_data_ptr<in_t>(), out.data_ptr<out_t>(), p, g.c});
    });
  });
  return out;
}

// batch_invstd: (C,) with per-channel parameters (BatchNorm), or (N, G) with
// per-(sample, channel) ones, G dividing C (GroupNorm).
void check_batch_invstd(const UnitArgs& u, const std::optional<at::Tensor>& batch_invstd) {
  if (!batch_invstd.has_value()) return;
  if (u.mean.dim() == 1) {
    TORCH_CHECK_VALUE(batch_invstd->sizes() == u.mean.sizes(), "batch_invstd: expected shape ", u.mean.sizes(),
                      " like the per-channel mean, got ", batch_invstd->sizes());
  } else {
    TORCH_CHECK_VALUE(batch_invstd->dim() == 2 && batch_invstd->size(0) == u.mean.size(0) &&
                          batch_invstd->size(1) > 0 && u.mean.size(1) % batch_invstd->size(1) == 0,
                      "batch_invstd: expected shape (", u.mean.size(0),
                      ", G) with G groups dividing the per-sample mean's ", u.mean.size(1), " channels, got ",
                      batch_invstd->sizes());
  }
  TORCH_CHECK_TYPE(batch_invstd->scalar_type() == u.mean.scalar_type(), "batch_invstd: expected dtype ",
                   u.mean.scalar_type(), ", got ", batch_invstd->scalar_type());
}

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& weight) {
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias: expected shape (", weight.size(0),
                    ",), got ", bias->sizes());
  TORCH_CHECK_TYPE(bias->scalar_type() == weight.scalar_type(), "bias: expected dtype ", weight.scalar_type(),
                   ", got ", bias->scalar_type());
  check_same_device(weight, *bias, "bias");
}

void check_residual(const at::Tensor& residual, const at::Tensor& y) {
  TORCH_CHECK_VALUE(residual.sizes() == y.sizes(), "residual: expected shape ", y.sizes(), ", got ",
                    residual.sizes());
  TORCH_CHECK_TYPE(residual.scalar_type() == y.scalar_type(), "residual: expected dtype ", y.scalar_type(),
                   ", got ", residual.scalar_type());
  check_same_device(y, residual, "residual");
}

// conv(act(normalised x), weight, bias), in ATen's choice of layout; 1x1
// convolutions in chunks (conv1x1.h), the others on a full temporary.
at::Tensor convolve(const UnitArgs& u, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  if (conv1x1_applies(u.x, weight, stride, padding, groups)) {
    return conv1x1_forward(u.x, u.mean, u.scale, u.shift, u.activation, weight, bias);
  }
  const at::Tensor a = normalize_activate(u, weight.scalar_type());
  return at::convolution(a, weight, bias, stride, padding, dilation, /*transposed=*/false,
                         /*output_padding=*/std::vector<int64_t>(stride.size(), 0), groups);
}

at::Tensor norm_act_conv2d(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                           const at::Tensor& shift, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, c10::IntArrayRef stride,
                           c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                           c10::string_view activation, const std::optional<at::Tensor>& batch_invstd) {
  const UnitArgs u =
      check_unit_args(x, mean, scale, shift, weight, stride, padding, dilation, groups, activation);
  check_batch_invstd(u, batch_invstd);
  check_bias(bias, weight);
  at::Tensor y = convolve(u, weight, bias, stride, padding, dilation, groups).contiguous(u.format);
  if (residual.has_value()) {
    check_residual(*residual, y);
    y.add_(*residual);
  }
  return y;
}

// norm_act_conv2d storing into out[:, out_offset:out_offset + OC] (see ops.cpp).
std::tuple<at::Tensor, at::Tensor> norm_act_conv2d_into(
    const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::string_view activation, at::Tensor& out, int64_t out_offset, bool compute_stats) {
  const UnitArgs u =
      check_unit_args(x, mean, scale, shift, weight, stride, padding, dilation, groups, activation);
  check_bias(bias, weight);
  const at::Tensor conv = convolve(u, weight, bias, stride, padding, dilation, groups);
  const int64_t oc = conv.size(1);
  TORCH_CHECK_VALUE(out.dim() == conv.dim() && out.size(0) == conv.size(0) &&
                        out.sizes().slice(2) == conv.sizes().slice(2),
                    "out: expected shape (", conv.size(0), ", C_out, ", conv.sizes().slice(2), "), got ",
                    out.sizes());
  TORCH_CHECK_VALUE(out_offset >= 0 && out_offset + oc <= out.size(1), "out_offset: expected 0 <= out_offset <= ",
                    out.size(1) - oc, " for ", oc, " output channels in a buffer of ", out.size(1), ", got ",
                    out_offset);
  TORCH_CHECK_TYPE(out.scalar_type() == conv.scalar_type(), "out: expected dtype ", conv.scalar_type(), ", got ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == x.device(), "out: expected a tensor on ", x.device(), ", got one on ",
                    out.device());
  const at::MemoryFormat format = kernel_format(out);
  TORCH_CHECK_VALUE(out.is_contiguous(format), "out: expected an ",
                    out.dim() == 4 ? "NCHW- or channels_last" : "NCDHW- or channels_last_3d",
                    "-contiguous buffer, got strides ", out.strides());
  const at::Tensor y = conv.contiguous(format);
  at::Tensor res;
  if (residual.has_value()) {
    check_residual(*residual, y);
    res = residual->contiguous(format);
  }
  const SliceGeometry g{y.size(0), oc, spatial_numel(y), out.size(1), out_offset, is_channels_last(format)};
  const auto acc_opts = y.options().dtype(accumulation_type(y.scalar_type()));
  at::Tensor out_mean = at::empty({compute_stats ? oc : 0}, acc_opts);
  at::Tensor out_var = at::empty({compute_stats ? oc : 0}, acc_opts);
  TORCH_CHECK_VALUE(!compute_stats || g.n * g.hw > 0, "compute_stats: needs at least one output value per channel");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "norm_act_conv2d_into", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto moments = store_slice<scalar_t, acc_t>(g, y.const_data_ptr<scalar_t>(),
                                                      res.defined() ? res.const_data_ptr<scalar_t>() : nullptr,
                                                      out.data_ptr<scalar_t>(), compute_stats);
    acc_t* pm = compute_stats ? out_mean.data_ptr<acc_t>() : nullptr;
    acc_t* pv = compute_stats ? out_var.data_ptr<acc_t>() : nullptr;
    for (size_t c = 0; c < moments.size(); ++c) {
      pm[c] = static_cast<acc_t>(moments[c].mean);
      pv[c] = static_cast<acc_t>(moments[c].m2 / moments[c].n);
    }
  });
  return {out_mean, out_var};
}

// norm_act_conv2d with the output's per-channel (mean, var). The generic
// kernel (csrc/norm_act_conv2d_stats.cpp) fills a fresh y through _into, whose
// epilogue copies ATen's convolution output into it; here that output is y,
// and one read pass takes its moments.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_conv2d_stats(
    const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    c10::string_view activation, const std::optional<at::Tensor>& batch_invstd) {
  at::Tensor y = norm_act_conv2d(x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups,
                                 activation, batch_invstd);
  TORCH_CHECK_VALUE(y.size(0) * spatial_numel(y) > 0,
                    "norm_act_conv2d_stats: needs at least one output value per channel, got output shape ", y.sizes());
  auto [y_mean, y_var] = channel_stats(y);
  return {y, y_mean, y_var};
}

// The layout the backward convolution runs in. oneDNN's 3-D convolution
// backward runs up to twice as fast on channels_last_3d as on NCDHW (AMD EPYC,
// float32, 32->32 3x3x3 at 48^3, forward and backward: 362 -> 187 ms), so a
// 3-D unit given NCDHW input converts its recomputed temporary and the output
// gradient, and converts the input gradient back (in tiles, layout_copy.h):
// the unit's backward there went from 234 to 155 ms. The forward convolution
// gained nothing measurable; float64 runs ATen's own kernels either way.
at::MemoryFormat backward_format(const UnitArgs& u, const at::Tensor& weight) {
  const auto t = weight.scalar_type();
  if (u.x.dim() == 5 && (t == at::kFloat || t == at::kBFloat16)) return at::MemoryFormat::ChannelsLast3d;
  return u.format;
}

void check_grad_out(const at::Tensor& grad_out, const UnitArgs& u, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(grad_out.dim() == u.x.dim() && grad_out.size(0) == u.x.size(0) &&
                        grad_out.size(1) == weight.size(0),
                    "grad_out: expected shape (", u.x.size(0), ", ", weight.size(0),
                    u.x.dim() == 4 ? ", H_out, W_out" : ", D_out, H_out, W_out", "), got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == weight.scalar_type(), "grad_out: expected dtype ",
                   weight.scalar_type(), ", got ", grad_out.scalar_type());
}

// mean and scale are x's own statistics: BatchNorm's per channel, mean(x)
// and gamma * invstd(x), or GroupNorm's per (sample, group), mean[n, c] =
// mean(x[n, g]) and scale[n, c] = gamma[c] * invstd[n, g]. So x also reaches
// the loss through them: d/dmean = -sum(scale * dz) and d/dvar =
// -invstd^2 / 2 * sum(scale * dz * (x - mean)), summed over the statistic's
// channels, and each value's share is a + b * (x - mean), with a = d/dmean / M
// and b = 2 d/dvar / M, indexed like the parameters (per channel, or per
// (sample, channel)).
template <typename acc_t>
std::pair<std::vector<acc_t>, std::vector<acc_t>> stats_grad_coefficients(const UnitArgs& u, const Geometry& g,
                                                                          const at::Tensor& batch_invstd,
                                                                          const at::Tensor& grad_scale,
                                                                          const at::Tensor& grad_shift) {
  const at::Tensor invstd = batch_invstd.contiguous();
  const acc_t* scale = u.scale.const_data_ptr<acc_t>();
  const acc_t* inv = invstd.const_data_ptr<acc_t>();
  const acc_t* gsc = grad_scale.const_data_ptr<acc_t>();
  const acc_t* gsh = grad_shift.const_data_ptr<acc_t>();
  // Per (n, c) of the parameters' shape: (C,) is one "sample" of C groups of 1.
  const bool per_sample = u.scale.dim() == 2;
  const int64_t samples = per_sample ? g.n : 1, groups = invstd.size(-1), per_group = g.c / groups;
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(per_sample ? per_group * g.hw : g.n * g.hw);
  std::vector<acc_t> a(samples * g.c), b(samples * g.c);
  for (int64_t n = 0; n < samples; ++n) {
    for (int64_t grp = 0; grp < groups; ++grp) {
      acc_t grad_mean = 0, grad_var = 0;
      for (int64_t c = grp * per_group; c < (grp + 1) * per_group; ++c) {
        grad_mean -= scale[n * g.c + c] * gsh[n * g.c + c];
        grad_var += scale[n * g.c + c] * gsc[n * g.c + c];
      }
      const acc_t r = inv[n * groups + grp];
      grad_var *= acc_t(-0.5) * r * r;
      std::fill_n(a.begin() + n * g.c + grp * per_group, per_group, grad_mean * inv_count);
      std::fill_n(b.begin() + n * g.c + grp * per_group, per_group, acc_t(2) * grad_var * inv_count);
    }
  }
  return {std::move(a), std::move(b)};
}

// grad_x += a + b * (x - mean): the statistics' share added to an input
// gradient already holding dz * scale.
void add_stats_grad(const UnitArgs& u, const at::Tensor& batch_invstd, const at::Tensor& grad_scale,
                    const at::Tensor& grad_shift, at::Tensor& grad_x) {
  const Geometry g = geometry(u.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.x.scalar_type(), "stats_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto [a, b] = stats_grad_coefficients<acc_t>(u, g, batch_invstd, grad_scale, grad_shift);
    for_each_run(g, CenteredAffineGrad<scalar_t, acc_t, /*kAccumulate=*/true>{
                        u.x.const_data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), u.mean.const_data_ptr<acc_t>(),
                        a.data(), b.data(), g.c, u.scale.dim() == 2 ? g.c : 0});
  });
}

// The scale and shift gradients, (C,) or (N, C) like the parameters, from the
// [N][C][2] sums of dz and dz * (x - mean).
std::pair<at::Tensor, at::Tensor> param_grads(const UnitArgs& u, const Geometry& g, const std::vector<double>& sums) {
  at::Tensor grad_scale = at::empty(u.scale.sizes(), u.scale.options());
  at::Tensor grad_shift = at::empty(u.scale.sizes(), u.scale.options());
  AT_DISPATCH_FLOATING_TYPES(u.scale.scalar_type(), "norm_act_conv2d_backward", [&] {
    scalar_t* gsc = grad_scale.data_ptr<scalar_t>();
    scalar_t* gsh = grad_shift.data_ptr<scalar_t>();
    const bool per_sample = u.scale.dim() == 2;
    for (int64_t c = 0; c < g.c; ++c) {
      double total_dz = 0, total_dz_x = 0;
      for (int64_t n = 0; n < g.n; ++n) {
        const double dz = sums[(n * g.c + c) * 2], dz_x = sums[(n * g.c + c) * 2 + 1];
        if (per_sample) {
          gsh[n * g.c + c] = static_cast<scalar_t>(dz);
          gsc[n * g.c + c] = static_cast<scalar_t>(dz_x);
        }
        total_dz += dz;
        total_dz_x += dz_x;
      }
      if (!per_sample) {
        gsh[c] = static_cast<scalar_t>(total_dz);
        gsc[c] = static_cast<scalar_t>(total_dz_x);
      }
    }
  });
  return {grad_scale, grad_shift};
}

// The input and parameter gradients from grad_a, the gradient of the
// convolution's input (dense in x's kernel format). Without batch
// statistics one pass writes dz * scale and reduces the sums; with them a
// first pass reduces the sums only and a second writes the whole input
// gradient, into grad_a's own storage when the dtypes match: one stream and
// one full-size allocation fewer than writing dz * scale and adding the
// statistics' share in a pass of its own.
std::tuple<at::Tensor, at::Tensor, at::Tensor> activation_input_grads(const UnitArgs& u, const at::Tensor& grad_a,
                                                                      const std::optional<at::Tensor>& batch_invstd) {
  const Geometry g = geometry(u.x);
  const bool in_place = batch_invstd.has_value() && grad_a.scalar_type() == u.x.scalar_type();
  at::Tensor grad_x = in_place ? grad_a : at::empty(u.x.sizes(), u.x.options().memory_format(u.format));
  std::vector<double> sums;  // [N][C][2]: sums of dz and dz * (x - mean)
  at::Tensor grad_scale, grad_shift;
  dispatch_in_out(u.x.scalar_type(), grad_a.scalar_type(), [&](auto in_tag, auto out_tag) {
    using in_t = typename decltype(in_tag)::type;
    using out_t = typename decltype(out_tag)::type;
    using acc_t = at::opmath_type<in_t>;
    const NormParams<acc_t> p(u.mean, u.scale, u.shift);
    dispatch_activation(u.activation, [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      const in_t* x = u.x.const_data_ptr<in_t>();
      const out_t* ga = grad_a.const_data_ptr<out_t>();
      if (!batch_invstd.has_value()) {
        sums = sum_per_sample_channel<2>(
            g, ActivationBackward<in_t, out_t, acc_t, A>{x, ga, grad_x.data_ptr<in_t>(), p, g.c});
        std::tie(grad_scale, grad_shift) = param_grads(u, g, sums);
        return;
      }
      sums = sum_per_sample_channel<2>(g, ActivationBackward<in_t, out_t, acc_t, A, /*kWriteGradX=*/false>{
                                              x, ga, nullptr, p, g.c});
      std::tie(grad_scale, grad_shift) = param_grads(u, g, sums);
      const auto [a, b] = stats_grad_coefficients<acc_t>(u, g, *batch_invstd, grad_scale, grad_shift);
      for_each_run(g, ActivationInputGrad<in_t, out_t, acc_t, A>{x, ga, grad_x.data_ptr<in_t>(), p, a.data(),
                                                                 b.data(), g.c});
    });
  });
  return {grad_x, grad_scale, grad_shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_act_conv2d_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& weight, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, int64_t groups, c10::string_view activation,
    const std::optional<at::Tensor>& batch_invstd, std::array<bool, 2> output_mask) {
  const UnitArgs u =
      check_unit_args(x, mean, scale, shift, weight, stride, padding, dilation, groups, activation);
  check_grad_out(grad_out, u, weight);
  check_batch_invstd(u, batch_invstd);
  const auto [want_input, want_weight] = output_mask;
  if (conv1x1_applies(u.x, weight, stride, padding, groups)) {
    Conv1x1Grads grads = conv1x1_backward(grad_out, u.x, u.mean, u.scale, u.shift, u.activation, weight, output_mask);
    if (!want_input) return {at::Tensor(), at::Tensor(), at::Tensor(), grads.grad_weight};
    auto [grad_scale, grad_shift] = param_grads(u, geometry(u.x), grads.sums);
    if (batch_invstd.has_value()) add_stats_grad(u, *batch_invstd, grad_scale, grad_shift, grads.grad_x);
    return {grads.grad_x, grad_scale, grad_shift, grads.grad_weight};
  }
  // The weight gradient needs act(z), recomputed here; the input gradient only
  // reads the input's shape, dtype and layout, so without the weight gradient
  // an uninitialised tensor stands in for it. One ATen call computes both.
  const at::MemoryFormat format = backward_format(u, weight);
  const at::Tensor a = want_weight
                           ? to_format(normalize_activate(u, weight.scalar_type()), format)
                           : at::empty(u.x.sizes(), u.x.options().dtype(weight.scalar_type()).memory_format(format));
  auto [grad_a, grad_w, unused_bias] =
      at::convolution_backward(to_format(grad_out, format), a, weight, std::nullopt, stride, padding, dilation, false,
                               std::vector<int64_t>(stride.size(), 0), groups, {want_input, want_weight, false});
  at::Tensor grad_weight = want_weight ? grad_w.contiguous(kernel_format(weight)) : at::Tensor();
  if (!want_input) return {at::Tensor(), at::Tensor(), at::Tensor(), grad_weight};
  auto [grad_x, grad_scale, grad_shift] = activation_input_grads(u, to_format(grad_a, u.format), batch_invstd);
  return {grad_x, grad_scale, grad_shift, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("norm_act_conv2d", &norm_act_conv2d);
  m.impl("norm_act_conv2d_backward", &norm_act_conv2d_backward);
  m.impl("norm_act_conv2d_into", &norm_act_conv2d_into);
  m.impl("norm_act_conv2d_stats", &norm_act_conv2d_stats);
}

}  // namespace resfast::cpu
