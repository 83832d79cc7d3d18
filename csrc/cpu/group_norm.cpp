// CPU kernels of GroupNorm (+ activation) and of its differentiable
// statistics. Statistics are per-(sample, channel) shifted sums reduced by
// channel_loops.h (planes for NCHW, rows of channels for channels_last, both
// parallel within a group), folded into groups in double; the normalisation
// is then a per-(sample, channel) affine pass (norm_act_passes.h), and the
// backward recomputes act's input from x instead of reading y.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/norm_act_math.h"
#include "block_sums.h"
#include "channel_loops.h"
#include "dispatch.h"
#include "norm_act_passes.h"
#include "stats_grad.h"

namespace resfast::cpu {
namespace {

// Sums of (x - pivot[n, c]) and its square per (sample, channel). Every
// channel of a group shares the group's pivot, one of its values, so the sums
// stay small whatever the mean is (moments_from_shifted_sums) and still add up
// across the group's channels.
template <typename scalar_t>
struct GroupShiftedSums {
  using sum_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ x;
  const sum_t* __restrict__ pivot;
  int64_t channels;

  std::array<double, 2> plane(int64_t n, int64_t c, int64_t, int64_t x_offset, int64_t length) const {
    const sum_t shift = pivot[n * channels + c];
    return block_sums<2, sum_t>(x_offset, x_offset + length, [&](int64_t i, sum_t* t) {
      const sum_t d = static_cast<sum_t>(x[i]) - shift;
      t[0] = d;
      t[1] = d * d;
    });
  }

  void row(int64_t n, int64_t, int64_t x_offset, sum_t* __restrict__ acc) const {
    const scalar_t* __restrict__ xr = x + x_offset;
    const sum_t* __restrict__ pv = pivot + n * channels;
    sum_t* __restrict__ sum = acc;
    sum_t* __restrict__ sum_sq = acc + channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const sum_t d = static_cast<sum_t>(xr[c]) - pv[c];
      sum[c] += d;
      sum_sq[c] += d * d;
    }
  }
};

struct GroupGeometry {
  Geometry g;
  int64_t groups, per_group;  // G and C / G
  int64_t count() const { return per_group * g.hw; }
  int64_t group_of(int64_t c) const { return c / per_group; }
  int64_t first_channel(int64_t grp) const { return grp * per_group; }
};

// Groups of at most this many bytes are worked on while they stay in L2.
constexpr int64_t kCachedGroupBytes = 512 * 1024;

// Whether the NCHW kernels take one (sample, group) at a time: its planes
// are reduced, then normalised (or given their input gradient) while still
// in cache, so x is read from memory once per op instead of twice, as torch's
// own GroupNorm kernel does. It needs groups that fit in cache and at least
// one group per thread; channels_last groups are strided across each sample's
// pixels, so they keep the two passes over whole tensors. Both ways give
// bitwise the same results: the same plane sums, added in the same order.
bool by_group(const GroupGeometry& gg, int64_t element_size) {
  return !gg.g.channels_last && gg.count() * element_size <= kCachedGroupBytes &&
         gg.g.n * gg.groups >= at::get_num_threads();
}

// task(n, grp) for every (sample, group), in parallel, in the best ISA copy.
template <typename Task>
void for_each_group(const GroupGeometry& gg, const Task& task) {
  at::parallel_for(0, gg.g.n * gg.groups, 1, [&](int64_t begin, int64_t end) {
    run_with_best_isa([&] {
      for (int64_t i = begin; i < end; ++i) task(i / gg.groups, i % gg.groups);
    });
  });
}

// kernel.plane over the channels of group (n, grp) of a dense NCHW tensor.
template <typename PlaneFn>
void for_each_group_plane(const GroupGeometry& gg, int64_t n, int64_t grp, const PlaneFn& plane) {
  const int64_t c0 = gg.first_channel(grp);
  for (int64_t c = c0; c < c0 + gg.per_group; ++c) plane(c, (n * gg.g.c + c) * gg.g.hw);
}

// A summing kernel's two plane sums for each channel of group (n, grp),
// stored in sums ([N][C][2]) where sum_per_sample_channel puts them.
template <typename Kernel>
void sum_group_planes(const GroupGeometry& gg, int64_t n, int64_t grp, const Kernel& kernel,
                      std::vector<double>& sums) {
  for_each_group_plane(gg, n, grp, [&](int64_t c, int64_t offset) {
    const std::array<double, 2> s = kernel.plane(n, c, offset, offset, gg.g.hw);
    std::copy(s.begin(), s.end(), sums.begin() + (n * gg.g.c + c) * 2);
  });
}

GroupGeometry check_groups(const at::Tensor& x, int64_t num_groups) {
  check_activation_input(x, "x");
  TORCH_CHECK_VALUE(num_groups > 0 && x.size(1) % num_groups == 0, "num_groups: expected a positive divisor of the ",
                    x.size(1), " channels, got ", num_groups);
  TORCH_CHECK_VALUE(x.size(0) == 0 || x.size(1) * spatial_numel(x) > 0,
                    "x: expected at least one value per group, got shape ", x.sizes());
  return {dense_geometry(x), num_groups, x.size(1) / num_groups};
}

// mean/rstd-like (N, G) statistics: shape, accumulation dtype, device.
void check_group_vector(const at::Tensor& x, const at::Tensor& t, int64_t groups, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == groups, name, ": expected shape (",
                    x.size(0), ", ", groups, "), got ", t.sizes());
  const auto acc = accumulation_type(x.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == acc, name, ": expected dtype ", acc, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device(), ", got ", t.device());
}

// (weight or 1) and (bias or 0) as acc_t vectors.
template <typename acc_t>
std::pair<std::vector<acc_t>, std::vector<acc_t>> affine_vectors(const std::optional<at::Tensor>& weight,
                                                                 const std::optional<at::Tensor>& bias,
                                                                 int64_t channels) {
  std::vector<acc_t> w(channels, acc_t(1)), b(channels, acc_t(0));
  const std::pair<const std::optional<at::Tensor>*, std::vector<acc_t>*> items[] = {{&weight, &w}, {&bias, &b}};
  for (const auto& [t, out] : items) {
    if (!t->has_value()) continue;
    const at::Tensor v = (*t)->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    std::copy(v.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>() + channels, out->begin());
  }
  return {std::move(w), std::move(b)};
}

// Each (n, c)'s pivot: its group's first value in x (dense, kernel format).
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> group_pivots(const scalar_t* x, const GroupGeometry& gg) {
  const Geometry& g = gg.g;
  std::vector<at::opmath_type<scalar_t>> pivot(g.n * g.c);
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t c = 0; c < g.c; ++c) {
      const int64_t c0 = gg.first_channel(gg.group_of(c));
      pivot[n * g.c + c] = static_cast<at::opmath_type<scalar_t>>(
          x[g.channels_last ? n * g.hw * g.c + c0 : (n * g.c + c0) * g.hw]);
    }
  }
  return pivot;
}

// Mean and biased variance of group (n, grp), rounded to acc_t, from its
// channels' shifted sums (sums: [N][C][2]) added in channel order. Never
// inlined: the by-group path calls it from inside run_with_best_isa's
// AVX2/AVX-512 copies, where GCC would fuse its multiply-adds, and the
// two-pass path from baseline code, where it cannot; one copy keeps the two
// paths bitwise equal (input_grad_coefs likewise).
template <typename acc_t>
__attribute__((noinline)) std::pair<acc_t, acc_t> group_mean_var(const double* sums, const acc_t* pivot,
                                                                 const GroupGeometry& gg, int64_t n, int64_t grp) {
  double s1 = 0, s2 = 0;
  const int64_t c0 = gg.first_channel(grp);
  for (int64_t c = c0; c < c0 + gg.per_group; ++c) {
    s1 += sums[(n * gg.g.c + c) * 2];
    s2 += sums[(n * gg.g.c + c) * 2 + 1];
  }
  const double count = static_cast<double>(gg.count());
  const Moments<double> m = moments_from_shifted_sums<double>(count, pivot[n * gg.g.c + c0], s1, s2);
  return {static_cast<acc_t>(m.mean), static_cast<acc_t>(m.m2 / count)};
}

template <typename acc_t>
acc_t inverse_std(acc_t var, double eps) {
  return acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
}

// (N, G) mean and biased variance of x (in its kernel format).
template <typename scalar_t>
void group_moments(const at::Tensor& x, const GroupGeometry& gg, at::Tensor& mean, at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* px = x.const_data_ptr<scalar_t>();
  const std::vector<acc_t> pivot = group_pivots(px, gg);
  const std::vector<double> sums =
      sum_per_sample_channel<2>(gg.g, GroupShiftedSums<scalar_t>{px, pivot.data(), gg.g.c});
  acc_t* pm = mean.data_ptr<acc_t>();
  acc_t* pv = var.data_ptr<acc_t>();
  for (int64_t n = 0; n < gg.g.n; ++n) {
    for (int64_t grp = 0; grp < gg.groups; ++grp) {
      const int64_t k = n * gg.groups + grp;
      std::tie(pm[k], pv[k]) = group_mean_var(sums.data(), pivot.data(), gg, n, grp);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& x, const GroupGeometry& gg) {
  const auto acc_opts = x.options().dtype(accumulation_type(x.scalar_type()));
  at::Tensor mean = at::empty({gg.g.n, gg.groups}, acc_opts);
  at::Tensor var = at::empty({gg.g.n, gg.groups}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_stats",
                                  [&] { group_moments<scalar_t>(x, gg, mean, var); });
  return {mean, var};
}

// Per-(sample, channel) parameters of group (n, grp), written at [n, c] of
// (N, C) arrays: mean[n, c] = mean, scale[n, c] = rstd * weight[c], shift[n, c] = bias[c].
template <typename acc_t>
void fill_group_params(acc_t* om, acc_t* os, acc_t* ob, acc_t mean, acc_t rstd, const std::vector<acc_t>& w,
                       const std::vector<acc_t>& b, const GroupGeometry& gg, int64_t n, int64_t grp) {
  const int64_t c0 = gg.first_channel(grp);
  for (int64_t c = c0; c < c0 + gg.per_group; ++c) {
    const int64_t k = n * gg.g.c + c;
    om[k] = mean;
    os[k] = rstd * w[c];
    ob[k] = b[c];
  }
}

// (N, C) tensors of fill_group_params for every group, from (N, G) mean and rstd.
template <typename acc_t>
std::array<at::Tensor, 3> channel_params(const at::Tensor& mean, const at::Tensor& rstd, const std::vector<acc_t>& w,
                                         const std::vector<acc_t>& b, const GroupGeometry& gg) {
  std::array<at::Tensor, 3> out;
  for (auto& t : out) t = at::empty({gg.g.n, gg.g.c}, mean.options());
  const acc_t* pm = mean.const_data_ptr<acc_t>();
  const acc_t* pr = rstd.const_data_ptr<acc_t>();
  for (int64_t n = 0; n < gg.g.n; ++n) {
    for (int64_t grp = 0; grp < gg.groups; ++grp) {
      const int64_t k = n * gg.groups + grp;
      fill_group_params(out[0].data_ptr<acc_t>(), out[1].data_ptr<acc_t>(), out[2].data_ptr<acc_t>(), pm[k], pr[k],
                        w, b, gg, n, grp);
    }
  }
  return out;
}

// (N, G) mean and rstd = 1 / sqrt(var + eps) of x (in its kernel format).
std::tuple<at::Tensor, at::Tensor> mean_rstd(const at::Tensor& x, const GroupGeometry& gg, double eps) {
  auto [mean, rstd] = stats(x, gg);
  AT_DISPATCH_FLOATING_TYPES(rstd.scalar_type(), "group_rstd", [&] {
    scalar_t* r = rstd.data_ptr<scalar_t>();
    for (int64_t k = 0; k < rstd.numel(); ++k) r[k] = inverse_std(r[k], eps);
  });
  return {mean, rstd};
}

std::tuple<at::Tensor, at::Tensor> group_stats(const at::Tensor& input, int64_t num_groups) {
  const GroupGeometry gg = check_groups(input, num_groups);
  return stats(input.contiguous(kernel_format(input)), gg);
}

// group_stats and the (N, C) spread of its result in one call (see ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_affine(const at::Tensor& input,
                                                                             int64_t num_groups,
                                                                             const std::optional<at::Tensor>& weight,
                                                                             const std::optional<at::Tensor>& bias,
                                                                             double eps) {
  const GroupGeometry gg = check_groups(input, num_groups);
  check_group_norm_params(input, weight, bias, eps);
  auto [mean, rstd] = mean_rstd(input.contiguous(kernel_format(input)), gg, eps);
  std::array<at::Tensor, 3> params;
  AT_DISPATCH_FLOATING_TYPES(rstd.scalar_type(), "group_norm_affine", [&] {
    const auto [w, b] = affine_vectors<scalar_t>(weight, bias, gg.g.c);
    params = channel_params<scalar_t>(mean, rstd, w, b, gg);
  });
  return {params[0], params[1], params[2], rstd};
}

at::Tensor group_stats_backward(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& grad_mean,
                                const at::Tensor& grad_var) {
  check_activation_input(input, "x");
  const int64_t groups = mean.dim() == 2 ? mean.size(1) : 0;
  const GroupGeometry gg = check_groups(input, groups);
  check_group_vector(input, mean, groups, "mean");
  check_group_vector(input, grad_mean, groups, "grad_mean");
  check_group_vector(input, grad_var, groups, "grad_var");
  const at::Tensor x = input.contiguous(kernel_format(input));
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_stats_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // d(mean)/dx = 1/M, d(var)/dx = 2 (x - mean) / M, each group's spread
    // over its channels.
    const at::Tensor m = mean.contiguous(), gm = grad_mean.contiguous(), gv = grad_var.contiguous();
    const acc_t* pm = m.const_data_ptr<acc_t>();
    const acc_t* pgm = gm.const_data_ptr<acc_t>();
    const acc_t* pgv = gv.const_data_ptr<acc_t>();
    const double inv_count = 1.0 / static_cast<double>(gg.count());
    std::vector<acc_t> mean_nc(gg.g.n * gg.g.c), a(gg.g.n * gg.g.c), b(gg.g.n * gg.g.c);
    for (int64_t n = 0; n < gg.g.n; ++n) {
      for (int64_t grp = 0; grp < gg.groups; ++grp) {
        const int64_t k = n * gg.groups + grp, k0 = n * gg.g.c + gg.first_channel(grp);
        std::fill_n(mean_nc.begin() + k0, gg.per_group, pm[k]);
        std::fill_n(a.begin() + k0, gg.per_group, static_cast<acc_t>(pgm[k] * inv_count));
        std::fill_n(b.begin() + k0, gg.per_group, static_cast<acc_t>(2 * pgv[k] * inv_count));
      }
    }
    for_each_run(gg.g, CenteredAffineGrad<scalar_t, acc_t, /*kAccumulate=*/false>{
                           x.const_data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), mean_nc.data(), a.data(),
                           b.data(), gg.g.c, /*sample_stride=*/gg.g.c});
  });
  return grad_x;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm(const at::Tensor& input, int64_t num_groups,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias, double eps,
                                                          c10::string_view activation) {
  const GroupGeometry gg = check_groups(input, num_groups);
  check_group_norm_params(input, weight, bias, eps);
  const Activation act = parse_activation(activation);
  const at::MemoryFormat format = kernel_format(input);
  const at::Tensor x = input.contiguous(format);
  const Geometry& g = gg.g;
  at::Tensor mean, rstd;
  at::Tensor y = at::empty_like(x, x.options(), format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto [w, b] = affine_vectors<acc_t>(weight, bias, g.c);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    dispatch_activation(act, [&](auto a) {
      using Normalize = NormalizeActivate<scalar_t, scalar_t, acc_t, decltype(a)::value>;
      if (!by_group(gg, x.element_size())) {
        std::tie(mean, rstd) = mean_rstd(x, gg, eps);
        const auto params = channel_params<acc_t>(mean, rstd, w, b, gg);
        for_each_run(g, Normalize{px, y.data_ptr<scalar_t>(), NormParams<acc_t>(params[0], params[1], params[2]), g.c});
        return;
      }
      const auto acc_opts = x.options().dtype(accumulation_type(x.scalar_type()));
      mean = at::empty({g.n, gg.groups}, acc_opts);
      rstd = at::empty({g.n, gg.groups}, acc_opts);
      acc_t *pm = mean.data_ptr<acc_t>(), *pr = rstd.data_ptr<acc_t>();
      const std::vector<acc_t> pivot = group_pivots(px, gg);
      const GroupShiftedSums<scalar_t> shifted_sums{px, pivot.data(), g.c};
      std::vector<double> sums(g.n * g.c * 2);
      std::vector<acc_t> params(3 * g.n * g.c);
      acc_t *om = params.data(), *os = om + g.n * g.c, *ob = os + g.n * g.c;
      const Normalize normalize{px, y.data_ptr<scalar_t>(), NormParams<acc_t>(om, os, ob, g.c), g.c};
      for_each_group(gg, [&](int64_t n, int64_t grp) {
        sum_group_planes(gg, n, grp, shifted_sums, sums);
        const int64_t k = n * gg.groups + grp;
        const auto [group_mean, group_var] = group_mean_var(sums.data(), pivot.data(), gg, n, grp);
        pm[k] = group_mean;
        pr[k] = inverse_std(group_var, eps);
        fill_group_params(om, os, ob, pm[k], pr[k], w, b, gg, n, grp);
        for_each_group_plane(gg, n, grp,
                             [&](int64_t c, int64_t offset) { normalize.plane(n, c, offset, offset, g.hw); });
      });
    });
  });
  return {y, mean, rstd};
}

// With dxhat = dz * weight and xhat = (x - mean) * rstd over the group's M values:
// grad_x = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
//        = dz * scale - rstd / M * S1 - (x - mean) * rstd^3 / M * S2
//        = dz * scale + coef_a + coef_b * (x - mean),
// S1 = sum_c weight[c] sum(dz), S2 = sum_c weight[c] sum(dz * (x - mean)):
// (coef_a, coef_b) of group (n, grp) from the [N][C][2] sums of dz and dz * (x - mean).
template <typename acc_t>
__attribute__((noinline)) std::pair<acc_t, acc_t> input_grad_coefs(const double* sums, const std::vector<acc_t>& w,
                                                                   double rstd, const GroupGeometry& gg, int64_t n,
                                                                   int64_t grp) {
  double s1 = 0, s2 = 0;
  const int64_t c0 = gg.first_channel(grp);
  for (int64_t c = c0; c < c0 + gg.per_group; ++c) {
    s1 += w[c] * sums[(n * gg.g.c + c) * 2];
    s2 += w[c] * sums[(n * gg.g.c + c) * 2 + 1];
  }
  const double inv_count = 1.0 / static_cast<double>(gg.count());
  return {static_cast<acc_t>(-rstd * s1 * inv_count), static_cast<acc_t>(-rstd * rstd * rstd * s2 * inv_count)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward(
    const at::Tensor& grad_y_in, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, c10::string_view activation,
    std::array<bool, 3> output_mask) {
  check_activation_input(input, "x");
  const int64_t groups = mean.dim() == 2 ? mean.size(1) : 0;
  const GroupGeometry gg = check_groups(input, groups);
  check_group_vector(input, mean, groups, "mean");
  check_group_vector(input, rstd, groups, "rstd");
  check_group_norm_affine(input, weight, bias);
  TORCH_CHECK_VALUE(grad_y_in.sizes() == input.sizes(), "grad_y: expected shape ", input.sizes(), ", got ",
                    grad_y_in.sizes());
  TORCH_CHECK_TYPE(grad_y_in.scalar_type() == input.scalar_type(), "grad_y: expected dtype ", input.scalar_type(),
                   ", got ", grad_y_in.scalar_type());
  const Activation act = parse_activation(activation);
  const auto [want_x, want_weight, want_bias] = output_mask;
  const at::MemoryFormat format = kernel_format(input);
  const at::Tensor x = input.contiguous(format);
  const at::Tensor grad_y = grad_y_in.contiguous(format);
  const Geometry& g = gg.g;

  at::Tensor grad_x, grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto [w, b] = affine_vectors<acc_t>(weight, bias, g.c);
    const at::Tensor m = mean.contiguous(), r = rstd.contiguous();
    const acc_t* pr = r.const_data_ptr<acc_t>();
    const auto params = channel_params<acc_t>(m, r, w, b, gg);
    const NormParams<acc_t> p(params[0], params[1], params[2]);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    // grad_x = (what grad_x holds) + coef_a[n, c] + coef_b[n, c] * (x - mean[n, c]).
    std::vector<acc_t> coef_a(want_x ? g.n * g.c : 0), coef_b(want_x ? g.n * g.c : 0);
    if (want_x) grad_x = at::empty_like(x);
    scalar_t* pgx = want_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    const CenteredAffineGrad<scalar_t, acc_t, /*kAccumulate=*/true> input_grad{
        px, pgx, p.mean, coef_a.data(), coef_b.data(), g.c, /*sample_stride=*/g.c};
    const auto fill_coefs = [&](const std::vector<double>& sums, int64_t n, int64_t grp) {
      const auto [ca, cb] = input_grad_coefs(sums.data(), w, pr[n * gg.groups + grp], gg, n, grp);
      const int64_t k0 = n * g.c + gg.first_channel(grp);
      std::fill_n(coef_a.begin() + k0, gg.per_group, ca);
      std::fill_n(coef_b.begin() + k0, gg.per_group, cb);
    };
    // Per (n, c): sum of dz = act'(z) * grad_y, and of dz * (x - mean). The
    // same pass stores dz * scale in grad_x, so the activation's derivative
    // (an exp for SiLU) is computed once; eager rounds dz to x's dtype too.
    std::vector<double> sums;
    const bool grad_x_by_group = want_x && by_group(gg, x.element_size());
    dispatch_activation(act, [&](auto a) {
      const auto reduce = [&](auto write_grad_x) {
        const ActivationBackward<scalar_t, scalar_t, acc_t, decltype(a)::value, decltype(write_grad_x)::value>
            kernel{px, grad_y.const_data_ptr<scalar_t>(), pgx, p, g.c};
        if (!grad_x_by_group) {
          sums = sum_per_sample_channel<2>(g, kernel);
          return;
        }
        // Each group's input gradient follows its sums while it is in cache.
        sums.resize(g.n * g.c * 2);
        for_each_group(gg, [&](int64_t n, int64_t grp) {
          sum_group_planes(gg, n, grp, kernel, sums);
          fill_coefs(sums, n, grp);
          for_each_group_plane(gg, n, grp,
                               [&](int64_t c, int64_t offset) { input_grad.plane(n, c, offset, offset, g.hw); });
        });
      };
      if (want_x) {
        reduce(std::true_type{});
      } else {
        reduce(std::false_type{});
      }
    });
    if (want_weight || want_bias) {
      // d(weight[c]) = sum_n rstd[n, g] * sum(dz * (x - mean)), d(bias[c]) = sum_n sum(dz).
      const auto acc_opts = x.options().dtype(accumulation_type(x.scalar_type()));
      at::Tensor gw = at::empty({g.c}, acc_opts), gb = at::empty({g.c}, acc_opts);
      acc_t *pgw = gw.data_ptr<acc_t>(), *pgb = gb.data_ptr<acc_t>();
      for (int64_t c = 0; c < g.c; ++c) {
        double dw = 0, db = 0;
        for (int64_t n = 0; n < g.n; ++n) {
          db += sums[(n * g.c + c) * 2];
          dw += pr[n * gg.groups + gg.group_of(c)] * sums[(n * g.c + c) * 2 + 1];
        }
        pgw[c] = static_cast<acc_t>(dw);
        pgb[c] = static_cast<acc_t>(db);
      }
      if (want_weight) grad_weight = weight.has_value() ? gw.to(weight->scalar_type()) : gw;
      if (want_bias) grad_bias = bias.has_value() ? gb.to(bias->scalar_type()) : gb;
    }
    if (!want_x || grad_x_by_group) return;
    for (int64_t n = 0; n < g.n; ++n) {
      for (int64_t grp = 0; grp < gg.groups; ++grp) fill_coefs(sums, n, grp);
    }
    for_each_run(g, input_grad);
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("group_stats", &group_stats);
  m.impl("group_stats_backward", &group_stats_backward);
  m.impl("group_norm_affine", &group_norm_affine);
  m.impl("group_norm", &group_norm);
  m.impl("group_norm_backward", &group_norm_backward);
}

}  // namespace resfast::cpu
