"""Python twins of the ops that C++ composes from other resfast ops
(CompositeExplicitAutograd kernels), for resfast.backend: run here, their
inner ops go through the backend the block chose."""

import torch

from resfast.ops.layout import conv_output_size, kernel_format


def norm_act_conv2d_stats(impls, x, mean, scale, shift, weight, bias, residual, stride, padding, dilation, groups,
                          activation, batch_invstd=None):
    oh, ow = conv_output_size(x, weight, stride, padding, dilation)
    y = torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=weight.dtype, device=x.device,
                    memory_format=kernel_format(x))
    y_mean, y_var = impls["norm_act_conv2d_into"](x, mean, scale, shift, weight, bias, residual, stride, padding,
                                                  dilation, groups, activation, y, 0, True)
    return y, y_mean, y_var


def group_norm_affine(impls, x, num_groups, weight, bias, eps):
    mean, var = impls["group_stats"](x, num_groups)
    per_group = x.shape[1] // num_groups
    rstd = torch.rsqrt(var + eps)
    scale = rstd.repeat_interleave(per_group, 1)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    # A copy even where expand_as would be a view of bias: ops never return their inputs.
    shift = torch.zeros_like(scale) if bias is None else bias.to(scale.dtype).expand_as(scale).clone(
        memory_format=torch.contiguous_format)
    return mean.repeat_interleave(per_group, 1), scale, shift, rstd


COMPOSITES = {"norm_act_conv2d_stats": norm_act_conv2d_stats, "group_norm_affine": group_norm_affine}
