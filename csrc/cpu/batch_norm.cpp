// CPU kernel of batch_norm_affine: one loop over the channels (the composite
// kernel of csrc/composites.cpp makes a dozen tensor calls, which cost more
// than a small unit's convolution).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "../common/checks.h"
#include "../common/layout.h"
#include "channel_stats.h"

namespace resfast::cpu {
namespace {

// A (C,) vector's values as acc_t, or `fallback` where it is absent. The
// vector is converted once (a no-op for a contiguous acc_t one): reading a
// tensor element by element through its accessors costs more than the loop.
template <typename acc_t>
struct Vector {
  at::Tensor values;
  const acc_t* data;
  acc_t fallback;
  acc_t operator[](int64_t c) const { return data == nullptr ? fallback : data[c]; }
};

template <typename acc_t>
Vector<acc_t> vector(const std::optional<at::Tensor>& t, acc_t fallback) {
  if (!t.has_value() || !t->defined()) return {at::Tensor(), nullptr, fallback};
  at::Tensor values = t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* data = values.const_data_ptr<acc_t>();
  return {std::move(values), data, fallback};
}

// running = (1 - momentum) * running + momentum * value, in running's dtype.
void update(at::Tensor& running, const double* value, double momentum) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "update_running", [&] {
    scalar_t* r = running.data_ptr<scalar_t>();
    const int64_t stride = running.stride(0);
    for (int64_t c = 0; c < running.size(0); ++c) {
      const double old = static_cast<double>(r[c * stride]);
      r[c * stride] = static_cast<scalar_t>(old * (1 - momentum) + momentum * value[c]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_affine(
    const at::Tensor& x, const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias, bool training,
    double momentum, double eps, const std::optional<at::Tensor>& batch_mean,
    const std::optional<at::Tensor>& batch_var) {
  check_batch_norm_args(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps);
  const int64_t c = x.size(1);
  const auto acc_opts = x.options().dtype(accumulation_type(x.scalar_type()));
  at::Tensor mean = at::empty({c}, acc_opts), scale = at::empty({c}, acc_opts), shift = at::empty({c}, acc_opts),
             invstd = at::empty({c}, acc_opts);
  at::Tensor stats_mean, stats_var;
  if (training) {
    if (check_batch_stats(x, batch_mean, batch_var)) {
      stats_mean = *batch_mean;
      stats_var = *batch_var;
    } else {
      std::tie(stats_mean, stats_var) = channel_stats(x);
    }
  }
  AT_DISPATCH_FLOATING_TYPES(acc_opts.dtype().toScalarType(), "batch_norm_affine", [&] {
    using acc_t = scalar_t;
    const auto w = vector<acc_t>(bn_weight, 1), b = vector<acc_t>(bn_bias, 0);
    acc_t *pm = mean.data_ptr<acc_t>(), *ps = scale.data_ptr<acc_t>(), *pb = shift.data_ptr<acc_t>(),
          *pi = invstd.data_ptr<acc_t>();
    if (training) {
      const auto m = vector<acc_t>(stats_mean, 0), v = vector<acc_t>(stats_var, 0);
      std::vector<double> new_mean(c), new_var(c);
      const int64_t count = x.size(0) * spatial_numel(x);
      const double unbiased = static_cast<double>(count) / static_cast<double>(count - 1);
      for (int64_t k = 0; k < c; ++k) {
        pm[k] = m[k];
        pi[k] = acc_t(1) / std::sqrt(v[k] + static_cast<acc_t>(eps));
        new_mean[k] = static_cast<double>(pm[k]);
        // The unbiased variance rounded as ATen rounds var * (count / (count - 1)).
        new_var[k] = static_cast<double>(static_cast<acc_t>(v[k] * static_cast<acc_t>(unbiased)));
      }
      if (running_mean.has_value()) {
        at::Tensor rm = *running_mean, rv = *running_var;
        update(rm, new_mean.data(), momentum);
        update(rv, new_var.data(), momentum);
      }
    } else {
      const auto m = vector<acc_t>(running_mean, 0), v = vector<acc_t>(running_var, 1);
      for (int64_t k = 0; k < c; ++k) {
        pm[k] = m[k];
        pi[k] = acc_t(1) / std::sqrt(v[k] + static_cast<acc_t>(eps));
      }
    }
    for (int64_t k = 0; k < c; ++k) {
      ps[k] = w[k] * pi[k];
      pb[k] = b[k];
    }
  });
  return {mean, scale, shift, invstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) { m.impl("batch_norm_affine", &batch_norm_affine); }

}  // namespace resfast::cpu
