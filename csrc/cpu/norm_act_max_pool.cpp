// norm_act_max_pool2d on the CPU for NCHW float/double input and a
// non-decreasing activation: each window's extreme read straight from x and
// normalised, in one pass. ATen's NCHW max pool walks each window with index
// bookkeeping: 25 ms for 8x64x112x112 on the 2-core AMD EPYC host, 1.4 ms in
// channels_last, so channels_last input and everything else runs the ATen
// composite (csrc/norm_act_max_pool.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/Pool.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../norm_act_max_pool.h"
#include "dispatch.h"

namespace resfast::cpu {
namespace {

struct Geometry {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw, height, width, out_height, out_width;
};

Geometry geometry(const at::Tensor& x, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                  c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode) {
  Geometry g{kernel_size[0], kernel_size[1], stride.empty() ? kernel_size[0] : stride[0],
             stride.empty() ? kernel_size[1] : stride[1], padding[0], padding[1], dilation[0], dilation[1],
             x.size(2), x.size(3), 0, 0};
  g.out_height = at::native::pooling_output_shape<int64_t>(g.height, g.kh, g.ph, g.sh, g.dh, ceil_mode);
  g.out_width = at::native::pooling_output_shape<int64_t>(g.width, g.kw, g.pw, g.sw, g.dw, ceil_mode);
  TORCH_CHECK_VALUE(g.height <= INT32_MAX, "x: expected a height below 2^31, got ", g.height);
  at::native::pool2d_shape_check(x, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, x.size(1), g.height, g.width,
                                 g.out_height, g.out_width, x.suggest_memory_format());
  return g;
}

// Per-thread scratch of pool_row: the column extremes of one output row's
// window rows, padded on both sides to every window's reach (so the column
// pass needs no bounds checks), their rows, and the row's results.
template <typename scalar_t>
struct RowScratch {
  explicit RowScratch(const Geometry& g)
      : width(g.pw + std::max(g.width, (g.out_width - 1) * g.sw + (g.kw - 1) * g.dw + 1 - g.pw)),
        phase_width((width + g.sw - 1) / g.sw),
        col(width),
        col_row(width, std::numeric_limits<int32_t>::max()),  // padding: after every real row
        phases(g.sw > 1 ? g.sw * phase_width : 0),
        phase_rows(g.sw > 1 ? g.sw * phase_width : 0),
        values(g.out_width),
        best_row(g.out_width),
        best_col(g.out_width) {}
  int64_t width, phase_width;
  std::vector<scalar_t> col;
  std::vector<int32_t> col_row;
  // With a stride s > 1, col split by position modulo s, so that each
  // window tap reads a contiguous run (no gathers, which baseline x86-64 lacks).
  std::vector<scalar_t> phases;
  std::vector<int32_t> phase_rows;
  std::vector<scalar_t> values;
  std::vector<int32_t> best_row, best_col;
};

// One output row of the pool: each window's maximum (minimum with Min) into
// scratch.values and, with Where, its position in the plane into where,
// chosen as ATen's max pool chooses: the first extreme in row-major scan
// order. A NaN wins, as in ATen; with several NaNs in a window, ATen picks
// the last in scan order, this the last column's last. Separable: the window's rows are reduced column by
// column (contiguous), then each window's columns; both loops vectorise.
template <bool Min, bool Where, typename scalar_t>
void pool_row(const scalar_t* plane, const Geometry& g, int64_t oh, RowScratch<scalar_t>& scratch, int64_t* where) {
  // Bitwise, not short-circuit: branch-free selects, which vectorise (random
  // data mispredicts every other branch).
  const auto better = [](scalar_t v, scalar_t best) { return (Min ? v < best : v > best) | (v != v); };
  const int64_t width = g.width;
  scalar_t* col = scratch.col.data();
  int32_t* col_row = scratch.col_row.data();
  // Padding loses to every value, and to an equal one by its row.
  const scalar_t pad = Min ? std::numeric_limits<scalar_t>::infinity() : -std::numeric_limits<scalar_t>::infinity();
  std::fill(col, col + g.pw, pad);
  std::fill(col + g.pw + width, col + scratch.width, pad);
  scalar_t* inner = col + g.pw;
  int32_t* inner_row = col_row + g.pw;
  bool first = true;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t h = oh * g.sh - g.ph + i * g.dh;
    if (h < 0 || h >= g.height) continue;
    const scalar_t* row = plane + h * width;
    if (first) {
      std::copy(row, row + width, inner);
      if constexpr (Where) std::fill(inner_row, inner_row + width, static_cast<int32_t>(h));
      first = false;
      continue;
    }
    const int32_t row_index = static_cast<int32_t>(h);
#pragma omp simd
    for (int64_t w = 0; w < width; ++w) {
      const scalar_t v = row[w], current = inner[w];
      const int32_t take = -static_cast<int32_t>(better(v, current));
      inner[w] = take ? v : current;
      if constexpr (Where) {
        const int32_t best = inner_row[w];
        inner_row[w] = (row_index & take) | (best & ~take);
      }
    }
  }
  const int64_t out_width = g.out_width, sw = g.sw;
  const scalar_t* phase = col;
  const int32_t* phase_row = col_row;
  if (sw > 1) {
    scalar_t* split = scratch.phases.data();
    int32_t* split_row = scratch.phase_rows.data();
    for (int64_t r = 0; r < sw; ++r) {
      const int64_t count = (scratch.width - r + sw - 1) / sw;
      scalar_t* dst = split + r * scratch.phase_width;
      for (int64_t k = 0; k < count; ++k) dst[k] = col[k * sw + r];
      if constexpr (Where) {
        int32_t* dst_row = split_row + r * scratch.phase_width;
        for (int64_t k = 0; k < count; ++k) dst_row[k] = col_row[k * sw + r];
      }
    }
    phase = split;
    phase_row = split_row;
  }
  scalar_t* values = scratch.values.data();
  int32_t *best_row = scratch.best_row.data(), *best_col = scratch.best_col.data();
  for (int64_t j = 0; j < g.kw; ++j) {
    // Tap j of window ow is col[ow * sw + j * dw]: phase (j * dw) % sw, position ow + (j * dw) / sw.
    const int64_t offset = j * g.dw;
    const scalar_t* v_at = phase + (offset % sw) * scratch.phase_width + offset / sw;
    const int32_t* row_at = phase_row + (offset % sw) * scratch.phase_width + offset / sw;
    if (j == 0) {
      std::copy(v_at, v_at + out_width, values);
      if constexpr (Where) {
        std::copy(row_at, row_at + out_width, best_row);
        std::fill(best_col, best_col + out_width, 0);
      }
      continue;
    }
    // Selects by an all-ones mask and loads into locals: GCC vectorises these
    // (conditional assignments it took for control flow).
    const int32_t col_index = static_cast<int32_t>(j);
#pragma omp simd
    for (int64_t ow = 0; ow < out_width; ++ow) {
      const scalar_t v = v_at[ow], current = values[ow];
      const int32_t take = -static_cast<int32_t>(better(v, current));
      values[ow] = take ? v : current;
      if constexpr (Where) {
        const int32_t row = best_row[ow], column = best_col[ow];
        best_row[ow] = (row_at[ow] & take) | (row & ~take);
        best_col[ow] = (col_index & take) | (column & ~take);
      }
    }
    if constexpr (Where) {
      // Columns come in order: an equal value wins only from an earlier row.
#pragma omp simd
      for (int64_t ow = 0; ow < out_width; ++ow) {
        const int32_t row = best_row[ow], column = best_col[ow];
        const int32_t take = -static_cast<int32_t>(v_at[ow] == values[ow]) & -static_cast<int32_t>(row_at[ow] < row);
        best_row[ow] = (row_at[ow] & take) | (row & ~take);
        best_col[ow] = (col_index & take) | (column & ~take);
      }
    }
  }
  if constexpr (Where) {
    for (int64_t ow = 0; ow < out_width; ++ow) {
      where[ow] = int64_t(best_row[ow]) * width + ow * sw + best_col[ow] * g.dw - g.pw;
    }
  }
}

// f(plane index, channel, whether the channel's scale is negative, scratch)
// over the N * C planes, in parallel.
template <typename scalar_t, typename F>
void for_each_plane(int64_t n, int64_t c, const std::vector<double>& scale, const Geometry& g, const F& f) {
  at::parallel_for(0, n * c, 1, [&](int64_t begin, int64_t end) {
    RowScratch<scalar_t> scratch(g);
    for (int64_t p = begin; p < end; ++p) f(p, p % c, scale[p % c] < 0, scratch);
  });
}

bool runs_here(const at::Tensor& x, c10::string_view activation) {
  return (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
         x.is_contiguous(at::MemoryFormat::Contiguous) && x.suggest_memory_format() == at::MemoryFormat::Contiguous &&
         pools_first(parse_activation(activation));
}

std::vector<double> as_doubles(const at::Tensor& v) {
  const at::Tensor d = v.to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

at::Tensor norm_act_max_pool2d(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                               const at::Tensor& shift, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                               c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode,
                               c10::string_view activation, const std::optional<at::Tensor>& batch_invstd) {
  check_pool_args(x, mean, scale, shift, kernel_size, stride, padding, dilation, ceil_mode, activation, batch_invstd);
  if (!runs_here(x, activation)) {
    return norm_act_max_pool2d_aten(x, mean, scale, shift, kernel_size, stride, padding, dilation, ceil_mode,
                                    activation, batch_invstd);
  }
  const Geometry g = geometry(x, kernel_size, stride, padding, dilation, ceil_mode);
  const int64_t n = x.size(0), c = x.size(1);
  at::Tensor out = at::empty({n, c, g.out_height, g.out_width}, x.options());
  const std::vector<double> scale_d = as_doubles(scale);
  // The vectors are read by pointer: any strides (an expanded view) made plain.
  const at::Tensor mean_c = mean.contiguous(), scale_c = scale.contiguous(), shift_c = shift.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_act_max_pool2d", [&] {
    const scalar_t *in = x.const_data_ptr<scalar_t>(), *m = mean_c.const_data_ptr<scalar_t>(),
                   *s = scale_c.const_data_ptr<scalar_t>(), *b = shift_c.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    dispatch_activation(parse_activation(activation), [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      for_each_plane<scalar_t>(n, c, scale_d, g, [&](int64_t p, int64_t ch, bool negative, auto& scratch) {
        const scalar_t* plane = in + p * g.height * g.width;
        const scalar_t* values = scratch.values.data();
        for (int64_t oh = 0; oh < g.out_height; ++oh) {
          scalar_t* dst = o + (p * g.out_height + oh) * g.out_width;
          if (negative) {
            pool_row<true, false>(plane, g, oh, scratch, nullptr);
          } else {
            pool_row<false, false>(plane, g, oh, scratch, nullptr);
          }
          for (int64_t ow = 0; ow < g.out_width; ++ow) dst[ow] = activate<A>(normalize(values[ow], m[ch], s[ch], b[ch]));
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_max_pool2d_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, bool ceil_mode, c10::string_view activation,
    const std::optional<at::Tensor>& batch_invstd) {
  check_pool_args(x, mean, scale, shift, kernel_size, stride, padding, dilation, ceil_mode, activation, batch_invstd);
  if (!runs_here(x, activation)) {
    return norm_act_max_pool2d_backward_aten(grad_out, x, mean, scale, shift, kernel_size, stride, padding, dilation,
                                             ceil_mode, activation, batch_invstd);
  }
  const Geometry g = geometry(x, kernel_size, stride, padding, dilation, ceil_mode);
  const int64_t n = x.size(0), c = x.size(1), planes = n * c;
  const int64_t positions = g.out_height * g.out_width;
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef({n, c, g.out_height, g.out_width}),
                    "grad_out: expected shape ", at::IntArrayRef({n, c, g.out_height, g.out_width}), ", got ",
                    grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "grad_out: expected dtype ", x.scalar_type(),
                   ", got ", grad_out.scalar_type());
  const at::Tensor grad = grad_out.contiguous();
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor grad_scale = at::empty({c}, mean.options()), grad_shift = at::empty({c}, mean.options());
  const std::vector<double> scale_d = as_doubles(scale);
  // The vectors are read by pointer: any strides (an expanded view) made plain.
  const at::Tensor mean_c = mean.contiguous(), scale_c = scale.contiguous(), shift_c = shift.contiguous();
  // Per output: the gradient of act's input, and where in x it goes (uninitialised: every element is written).
  const at::Tensor source_t = at::empty({planes * positions}, x.options().dtype(at::kLong));
  const at::Tensor dz_t = at::empty({planes * positions}, x.options());
  int64_t* source = source_t.mutable_data_ptr<int64_t>();
  std::vector<double> plane_sum(planes), plane_centred_sum(planes);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_act_max_pool2d_backward", [&] {
    scalar_t* dz = dz_t.mutable_data_ptr<scalar_t>();
    const scalar_t *in = x.const_data_ptr<scalar_t>(), *m = mean_c.const_data_ptr<scalar_t>(),
                   *s = scale_c.const_data_ptr<scalar_t>(), *b = shift_c.const_data_ptr<scalar_t>(),
                   *go = grad.const_data_ptr<scalar_t>();
    dispatch_activation(parse_activation(activation), [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      for_each_plane<scalar_t>(n, c, scale_d, g, [&](int64_t p, int64_t ch, bool negative, auto& scratch) {
        const scalar_t* plane = in + p * g.height * g.width;
        const scalar_t* values = scratch.values.data();
        double sum = 0, centred_sum = 0;
        for (int64_t oh = 0; oh < g.out_height; ++oh) {
          const int64_t o0 = p * positions + oh * g.out_width;
          if (negative) {
            pool_row<true, true>(plane, g, oh, scratch, source + o0);
          } else {
            pool_row<false, true>(plane, g, oh, scratch, source + o0);
          }
          for (int64_t ow = 0; ow < g.out_width; ++ow) {
            const scalar_t centred = values[ow] - m[ch];
            const scalar_t d = activation_backward<A>(centred * s[ch] + b[ch], go[o0 + ow]);
            dz[o0 + ow] = d;
            sum += d;
            centred_sum += static_cast<double>(d) * centred;
          }
        }
        plane_sum[p] = sum;
        plane_centred_sum[p] = centred_sum;
      });
    });
    // Per channel, over the batch: grad_shift = sum(dz), grad_scale = sum(dz * (x - mean)).
    scalar_t *gs = grad_shift.mutable_data_ptr<scalar_t>(), *gc = grad_scale.mutable_data_ptr<scalar_t>();
    std::vector<double> slope(c, 0.0), offset(c, 0.0);
    const double count = static_cast<double>(n * g.height * g.width);
    const std::vector<double> invstd = batch_invstd.has_value() ? as_doubles(*batch_invstd) : std::vector<double>();
    for (int64_t ch = 0; ch < c; ++ch) {
      double sum = 0, centred_sum = 0;
      for (int64_t i = 0; i < n; ++i) {
        sum += plane_sum[i * c + ch];
        centred_sum += plane_centred_sum[i * c + ch];
      }
      gs[ch] = static_cast<scalar_t>(sum);
      gc[ch] = static_cast<scalar_t>(centred_sum);
      if (!invstd.empty()) {
        // The share through x's own statistics, as x * slope + offset (see norm_act_conv2d_backward).
        const double r = invstd[ch];
        slope[ch] = -scale_d[ch] * r * r * centred_sum / count;
        offset[ch] = -slope[ch] * static_cast<double>(m[ch]) - scale_d[ch] * sum / count;
      }
    }
    scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t ch = p % c, size = g.height * g.width;
        const scalar_t a = static_cast<scalar_t>(slope[ch]), off = static_cast<scalar_t>(offset[ch]);
        const scalar_t* xp = in + p * size;
        scalar_t* gp = gx + p * size;
        if (invstd.empty()) {
          std::fill(gp, gp + size, scalar_t(0));
        } else {
          for (int64_t i = 0; i < size; ++i) gp[i] = xp[i] * a + off;
        }
        for (int64_t o = p * positions; o < (p + 1) * positions; ++o) gp[source[o]] += s[ch] * dz[o];
      }
    });
  });
  return {grad_x, grad_scale, grad_shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("norm_act_max_pool2d", &norm_act_max_pool2d);
  m.impl("norm_act_max_pool2d_backward", &norm_act_max_pool2d_backward);
}

}  // namespace resfast::cpu
