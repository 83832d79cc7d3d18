// CPU kernels of the fused norm→activation→conv2d unit. The normalised,
// activated input exists only as a temporary for ATen's convolution: it is
// written by one fused pass and dropped when the op returns, in the forward
// and again (recomputed) in the weight backward. The input backward applies
// act'(z) and reduces the per-channel gradient sums in a single pass.
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/norm_act_math.h"
#include "channel_loops.h"
#include "dispatch.h"

namespace resfast::cpu {
namespace {

// mean/scale/shift of shape (C,) or (N, C), indexed by (n, c).
template <typename acc_t>
struct NormParams {
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* shift;
  int64_t sample_stride;

  NormParams(const at::Tensor& m, const at::Tensor& s, const at::Tensor& b)
      : mean(m.const_data_ptr<acc_t>()),
        scale(s.const_data_ptr<acc_t>()),
        shift(b.const_data_ptr<acc_t>()),
        sample_stride(m.dim() == 2 ? m.size(1) : 0) {}

  int64_t index(int64_t n, int64_t c) const { return n * sample_stride + c; }
};

struct UnitArgs {
  at::Tensor x, mean, scale, shift;
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
  return {x.contiguous(format), mean.contiguous(), scale.contiguous(), shift.contiguous(),
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
    const in_t* px = u.x.const_data_ptr<in_t>();
    out_t* pa = out.data_ptr<out_t>();
    dispatch_activation(u.activation, [&](auto act) {
      for_each_element(g, [&](int64_t n, int64_t c, int64_t i) {
        const int64_t k = p.index(n, c);
        pa[i] = static_cast<out_t>(
            activate(normalize<acc_t>(static_cast<acc_t>(px[i]), p.mean[k], p.scale[k], p.shift[k]),
                     decltype(act)::value));
      });
    });
  });
  return out;
}

at::Tensor norm_act_conv2d(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                           const at::Tensor& shift, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, c10::IntArrayRef stride,
                           c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                           c10::string_view activation) {
  const UnitArgs u =
      check_unit_args(x, mean, scale, shift, weight, stride, padding, dilation, groups, activation);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias: expected shape (",
                      weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == weight.scalar_type(), "bias: expected dtype ",
                     weight.scalar_type(), ", got ", bias->scalar_type());
  }
  const at::Tensor a = normalize_activate(u, weight.scalar_type());
  at::Tensor y = at::convolution(a, weight, bias, stride, padding, dilation, /*transposed=*/false,
                                 /*output_padding=*/{0, 0}, groups)
                     .contiguous(u.format);
  if (residual.has_value()) {
    TORCH_CHECK_VALUE(residual->sizes() == y.sizes(), "residual: expected shape ", y.sizes(),
                      ", got ", residual->sizes());
    TORCH_CHECK_TYPE(residual->scalar_type() == y.scalar_type(), "residual: expected dtype ",
                     y.scalar_type(), ", got ", residual->scalar_type());
    y.add_(*residual);
  }
  return y;
}

void check_grad_out(const at::Tensor& grad_out, const UnitArgs& u, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == u.x.size(0) &&
                        grad_out.size(1) == weight.size(0),
                    "grad_out: expected shape (", u.x.size(0), ", ", weight.size(0),
                    ", H_out, W_out), got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == weight.scalar_type(), "grad_out: expected dtype ",
                   weight.scalar_type(), ", got ", grad_out.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_conv2d_backward_input(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& weight, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, c10::string_view activation) {
  const UnitArgs u =
      check_unit_args(x, mean, scale, shift, weight, stride, padding, dilation, groups, activation);
  check_grad_out(grad_out, u, weight);
  // The input's values do not enter the input gradient; ATen only reads its
  // shape, dtype and layout, so an uninitialised tensor stands in for act(z).
  const at::Tensor input_like =
      at::empty(u.x.sizes(), u.x.options().dtype(weight.scalar_type()).memory_format(u.format));
  const at::Tensor grad_a =
      std::get<0>(at::convolution_backward(grad_out.contiguous(u.format), input_like, weight,
                                           std::nullopt, stride, padding, dilation, false, {0, 0},
                                           groups, {true, false, false}))
          .contiguous(u.format);

  at::Tensor grad_x = at::empty_like(u.x);
  const Geometry g = geometry(u.x);
  std::vector<double> sums;
  dispatch_in_out(u.x.scalar_type(), weight.scalar_type(), [&](auto in_tag, auto out_tag) {
    using in_t = typename decltype(in_tag)::type;
    using out_t = typename decltype(out_tag)::type;
    using acc_t = at::opmath_type<in_t>;
    const NormParams<acc_t> p(u.mean, u.scale, u.shift);
    const in_t* px = u.x.const_data_ptr<in_t>();
    const out_t* pga = grad_a.const_data_ptr<out_t>();
    in_t* pgx = grad_x.data_ptr<in_t>();
    dispatch_activation(u.activation, [&](auto act) {
      sums = sum_per_sample_channel<2>(g, [&](int64_t n, int64_t c, int64_t i) {
        const int64_t k = p.index(n, c);
        const acc_t centered = static_cast<acc_t>(px[i]) - p.mean[k];
        const acc_t z = centered * p.scale[k] + p.shift[k];
        const acc_t dz = static_cast<acc_t>(pga[i]) * activation_grad(z, decltype(act)::value);
        pgx[i] = static_cast<in_t>(dz * p.scale[k]);
        return std::array<double, 2>{static_cast<double>(dz), static_cast<double>(dz * centered)};
      });
    });
  });

  at::Tensor grad_scale = at::empty(u.scale.sizes(), u.scale.options());
  at::Tensor grad_shift = at::empty(u.scale.sizes(), u.scale.options());
  AT_DISPATCH_FLOATING_TYPES(u.scale.scalar_type(), "norm_act_conv2d_backward_input", [&] {
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
  return {grad_x, grad_scale, grad_shift};
}

at::Tensor norm_act_conv2d_backward_weight(const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& mean, const at::Tensor& scale,
                                           const at::Tensor& shift, const at::Tensor& weight,
                                           c10::IntArrayRef stride, c10::IntArrayRef padding,
                                           c10::IntArrayRef dilation, int64_t groups,
                                           c10::string_view activation) {
  const UnitArgs u =
      check_unit_args(x, mean, scale, shift, weight, stride, padding, dilation, groups, activation);
  check_grad_out(grad_out, u, weight);
  const at::Tensor a = normalize_activate(u, weight.scalar_type());
  return std::get<1>(at::convolution_backward(grad_out.contiguous(u.format), a, weight, std::nullopt,
                                              stride, padding, dilation, false, {0, 0}, groups,
                                              {false, true, false}))
      .contiguous(kernel_format(weight));
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("norm_act_conv2d", &norm_act_conv2d);
  m.impl("norm_act_conv2d_backward_input", &norm_act_conv2d_backward_input);
  m.impl("norm_act_conv2d_backward_weight", &norm_act_conv2d_backward_weight);
}

}  // namespace resfast::cpu
