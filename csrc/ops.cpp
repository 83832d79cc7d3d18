// The one place resfast's operator schemas are defined. Kernels are registered
// per backend: csrc/cpu (C++), csrc/cuda (CUDA C++), and resfast/ops (Triton,
// fake and autograd registrations, from Python).
#include <torch/library.h>

TORCH_LIBRARY(resfast, m) {
  // Per-channel mean and biased variance over (N, H, W), in float32 (float64
  // for float64 input).
  m.def("channel_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("channel_stats_backward(Tensor x, Tensor mean, Tensor grad_mean, Tensor grad_var) -> Tensor");

  // y = conv(act((x - mean) * scale + shift), weight, bias) + residual, a 2-D
  // convolution for 4-D x and weight, 3-D for 5-D ones (the ops' names say
  // conv2d, which came first).
  // mean/scale/shift are per channel, shape (C,), or per sample and channel,
  // shape (N, C). The activation is rounded to weight's dtype before the
  // convolution, so x may be float32 with a half/bfloat16 weight (autocast).
  // batch_invstd marks normalisation by x's own statistics, whose dependence
  // on x the gradient with respect to x then includes (the forward does not
  // read it): training-mode BatchNorm, shape (C,), mean and scale are x's
  // batch mean and gamma * batch_invstd; GroupNorm, shape (N, G), mean[n, c]
  // and scale[n, c] are the mean of x's group (n, c // (C / G)) and
  // gamma[c] * batch_invstd[n, c // (C / G)].
  m.def(
      "norm_act_conv2d(Tensor x, Tensor mean, Tensor scale, Tensor shift, Tensor weight, "
      "Tensor? bias, Tensor? residual, int[] stride, int[] padding, int[] dilation, "
      "int groups, str activation, Tensor? batch_invstd=None) -> Tensor");
  // norm_act_conv2d whose epilogue stores the result into the channel slice
  // out[:, out_offset:out_offset + C_out] of a preallocated NCHW- or
  // channels_last-contiguous buffer (dense blocks); no other element of out
  // is written. With compute_stats, returns the per-channel mean and biased
  // variance of the stored values (float32, float64 for float64; deterministic),
  // the next BatchNorm's batch statistics; otherwise two empty tensors. No
  // autograd: callers compose its gradient from norm_act_conv2d_backward.
  m.def(
      "norm_act_conv2d_into(Tensor x, Tensor mean, Tensor scale, Tensor shift, Tensor weight, "
      "Tensor? bias, Tensor? residual, int[] stride, int[] padding, int[] dilation, "
      "int groups, str activation, Tensor(a!) out, int out_offset, bool compute_stats=False) "
      "-> (Tensor mean, Tensor var)");
  // norm_act_conv2d that also returns the per-channel mean and biased variance
  // of its output, taken in the epilogue (norm_act_conv2d_into into a fresh
  // tensor): the next training-mode BatchNorm's statistics without a pass over
  // the output. y has norm_act_conv2d's gradient; the statistics have none
  // (their consumer folds it into its own input gradient via batch_invstd).
  m.def(
      "norm_act_conv2d_stats(Tensor x, Tensor mean, Tensor scale, Tensor shift, Tensor weight, "
      "Tensor? bias, Tensor? residual, int[] stride, int[] padding, int[] dilation, "
      "int groups, str activation, Tensor? batch_invstd=None) -> (Tensor y, Tensor y_mean, Tensor y_var)");
  // Both gradients of norm_act_conv2d in one op, so the CPU makes a single
  // convolution-backward call. With dz = act'(z) * conv2d_input_grad(grad_out):
  // grad_scale = sum(dz * (x - mean)) and grad_shift = sum(dz), shaped like
  // scale; grad_x = dz * scale, plus, with batch_invstd, the gradient through
  // the statistics, per channel (BatchNorm, count = N * H * W):
  //   - scale * (grad_shift + (x - mean) * batch_invstd^2 * grad_scale) / count,
  // and for GroupNorm the same with scale * grad_shift and scale * grad_scale
  // summed over each group's channels (count = C / G * H * W);
  // grad_weight recomputes act(z) from x. output_mask = (input side, weight);
  // masked-off outputs are undefined (None).
  m.def(
      "norm_act_conv2d_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor scale, Tensor shift, "
      "Tensor weight, int[] stride, int[] padding, int[] dilation, int groups, str activation, "
      "Tensor? batch_invstd, bool[2] output_mask) "
      "-> (Tensor grad_x, Tensor grad_scale, Tensor grad_shift, Tensor grad_weight)");
  // GroupNorm of an (N, C, H, W) tensor with G = num_groups groups of C / G
  // channels, followed by an activation ("identity", "relu", "relu6", "silu"):
  //   y = act((x - mean[n, g]) * rstd[n, g] * weight[c] + bias[c]).
  // mean and rstd = 1 / sqrt(var + eps) (biased variance) are (N, G), float32
  // (float64 for float64 input); weight/bias are optional (C,) vectors of x's
  // dtype. y is laid out like x.
  m.def(
      "group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, str activation) "
      "-> (Tensor y, Tensor mean, Tensor rstd)");
  // Gradients of group_norm's y, recomputing act's input from x (y is not
  // read). output_mask = (x, weight, bias); masked-off outputs are undefined.
  m.def(
      "group_norm_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
      "str activation, bool[3] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // Per-(sample, group) mean and biased variance, (N, G), float32 (float64 for
  // float64 input), differentiable: GroupNorm's statistics, which
  // group_norm_affine spreads over channels for the fused conv unit.
  m.def("group_stats(Tensor x, int num_groups) -> (Tensor mean, Tensor var)");
  m.def("group_stats_backward(Tensor x, Tensor mean, Tensor grad_mean, Tensor grad_var) -> Tensor");
  // GroupNorm as the fused conv unit's per-(sample, channel) (N, C)
  // normalisation: mean[n, c] = mean[n, g], scale[n, c] = rstd[n, g] *
  // weight[c], shift[n, c] = bias[c] (or 1 and 0 without weight and bias),
  // and rstd = 1 / sqrt(var + eps), (N, G); float32 (float64 for float64
  // input). Differentiable with respect to weight and bias only: the fused
  // unit given rstd as its batch_invstd adds x's share of the statistics'
  // gradient to its own input gradient, as for BatchNorm.
  m.def(
      "group_norm_affine(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor mean, Tensor scale, Tensor shift, Tensor rstd)");
  // BatchNorm as the fused conv unit's per-channel (C,) normalisation, with
  // F.batch_norm's semantics. training: mean and var are x's batch statistics
  // (batch_mean/batch_var when its producer computed them, else one pass over
  // x), and the running statistics, when given, are updated in place with
  // momentum and the unbiased variance; otherwise the running statistics are
  // used. Returns mean, scale = bn_weight * invstd (invstd without a weight),
  // shift = bn_bias (or 0) and invstd = 1 / sqrt(var + eps); float32 (float64
  // for float64 input). Differentiable with respect to bn_weight and bn_bias
  // only: in training the fused unit given invstd as its batch_invstd adds
  // x's share of the statistics' gradient to its own input gradient.
  m.def(
      "batch_norm_affine(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? bn_weight, "
      "Tensor? bn_bias, bool training, float momentum, float eps, Tensor? batch_mean=None, "
      "Tensor? batch_var=None) -> (Tensor mean, Tensor scale, Tensor shift, Tensor invstd)");
  // act((x - mean) * scale + shift) max-pooled as F.max_pool2d(kernel_size,
  // stride, padding, dilation, ceil_mode) pools it, for 4-D x and per-channel
  // (C,) vectors (BatchNorm's: batch_norm_affine's outputs); batch_invstd as
  // for norm_act_conv2d. The output has x's dtype and layout; only x and the
  // vectors are saved for backward (csrc/norm_act_max_pool.cpp).
  m.def(
      "norm_act_max_pool2d(Tensor x, Tensor mean, Tensor scale, Tensor shift, int[] kernel_size, int[] stride, "
      "int[] padding, int[] dilation, bool ceil_mode, str activation, Tensor? batch_invstd=None) -> Tensor");
  // Its gradients, recomputing the activation and the pool's choices from x:
  // grad_scale = sum(dz * (x - mean)), grad_shift = sum(dz) and grad_x as in
  // norm_act_conv2d_backward, with dz the gradient of act's input.
  m.def(
      "norm_act_max_pool2d_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor scale, Tensor shift, "
      "int[] kernel_size, int[] stride, int[] padding, int[] dilation, bool ceil_mode, str activation, "
      "Tensor? batch_invstd) -> (Tensor grad_x, Tensor grad_scale, Tensor grad_shift)");
  // The fused unit with BatchNorm's or GroupNorm's arguments: batch_norm_affine
  // (or group_norm_affine), then norm_act_conv2d, composed at the autograd
  // level (CompositeImplicitAutograd): one call from Python per unit.
  m.def(
      "batch_norm_act_conv2d(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? bn_weight, "
      "Tensor? bn_bias, bool training, float momentum, float eps, Tensor weight, Tensor? bias, Tensor? residual, "
      "int[] stride, int[] padding, int[] dilation, int groups, str activation, Tensor? batch_mean=None, "
      "Tensor? batch_var=None) -> Tensor");
  m.def(
      "group_norm_act_conv2d(Tensor x, int num_groups, Tensor? norm_weight, Tensor? norm_bias, float eps, "
      "Tensor weight, Tensor? bias, Tensor? residual, int[] stride, int[] padding, int[] dilation, int groups, "
      "str activation) -> Tensor");
}
