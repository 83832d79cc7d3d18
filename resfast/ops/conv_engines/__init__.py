"""The CUDA implementations of the fused convolution ops (the registry's
Python implementation of norm_act_conv2d, its _into and _stats variants and
norm_act_conv2d_backward): several engines computing the same thing with the
same memory contract, chosen per shape (selection.py).

- split (split.py): a pointwise Triton pass, ATen's (cuDNN's) convolution,
  pointwise passes after it; always available, the default;
- triton (fused.py): our implicit-GEMM kernels, normalisation in the
  prologue, residual/slice/statistics in the epilogue;
- cudnn (cudnn_fused.py): cuDNN's runtime-fused graphs (cudnn_graphs.py)
  through the optional nvidia-cudnn-frontend package.
"""

from resfast.ops.conv_engines.calls import Backward, Forward
from resfast.ops.conv_engines.selection import ENGINES, backward, conv_choices, conv_impl, forward

__all__ = ["ENGINES", "Backward", "Forward", "backward", "conv_choices", "conv_impl", "forward"]
