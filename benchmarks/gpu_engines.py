"""Every convolution engine at real ResNet, DenseNet and U-Net layer shapes on
a GPU: forward and backward of the fused unit in bfloat16 channels_last,
each engine forced in turn and checked against a float64 reference on the
same GPU, timed with CUDA events against eager BatchNorm/GroupNorm -> act ->
conv; then the per-shape choice the measurement makes (conv_choices).

    python benchmarks/gpu_engines.py [--json PATH] [--quick]
"""

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import resfast
from resfast.ops.conv_engines import selection

# (name, N, C_in, C_out, kernel, stride, size, norm): ResNet-50/200 at batch 64,
# DenseNet-121's bottleneck and transition, a U-Net GroupNorm 3x3.
SHAPES = [
    ("resnet 1x1 256->64 @56", 64, 256, 64, 1, 1, 56, "batch"),
    ("resnet 3x3 64->64 @56", 64, 64, 64, 3, 1, 56, "batch"),
    ("resnet 1x1 64->256 @56", 64, 64, 256, 1, 1, 56, "batch"),
    ("resnet 3x3 128->128 @28 s2", 64, 128, 128, 3, 2, 56, "batch"),
    ("resnet 3x3 256->256 @14", 64, 256, 256, 3, 1, 14, "batch"),
    ("resnet 1x1 2048->512 @7", 64, 2048, 512, 1, 1, 7, "batch"),
    ("densenet bottleneck 1x1 512->128 @28", 64, 512, 128, 1, 1, 28, "batch"),
    ("densenet transition 1x1 1024->512 @14", 64, 1024, 512, 1, 1, 14, "batch"),
    ("unet GN 3x3 128->128 @64 silu", 16, 128, 128, 3, 1, 64, "group"),
]
TOLERANCE = 3e-2  # bfloat16, against float64


def unit_inputs(n, c, oc, k, stride, size, norm, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, c, size, size, device=device, generator=g).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(oc, c, k, k, device=device, generator=g) / (k * c ** 0.5)).to(torch.bfloat16)
    w = w.contiguous(memory_format=torch.channels_last)
    if norm == "batch":
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
        invstd = (var + 1e-5).rsqrt()
        gamma = torch.rand(c, device=device, generator=g) + 0.5
        affine = (mean, gamma * invstd, torch.randn(c, device=device, generator=g) * 0.1, invstd)
        activation = "relu"
    else:
        affine = resfast.ops.group_norm_affine(x, 32, None, None, 1e-5)
        activation = "silu"
    return x, affine, w, ([stride, stride], [k // 2, k // 2], [1, 1], 1, activation)


def reference(x, affine, w, conv, grad):
    """float64 output and gradients (x and weight) of the unit, statistics held fixed."""
    mean, scale, shift, _ = affine
    per = (lambda t: t[:, None, None]) if mean.dim() == 1 else (lambda t: t[:, :, None, None])
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    z = (xd - per(mean.double())) * per(scale.double()) + per(shift.double())
    a = F.relu(z) if conv[4] == "relu" else F.silu(z)
    y = F.conv2d(a.to(torch.bfloat16).double(), wd, None, *conv[:4])
    gx, gw = torch.autograd.grad(y, (xd, wd), grad.double())
    return y, gx, gw


def rel_error(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def time_cuda(fn, repeats):
    return selection.cuda_seconds(fn, repeats, warmup=3)


def eager_unit(x, affine, w, conv, norm):
    def run():
        if norm == "batch":
            z = F.batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
        else:
            z = F.group_norm(x, 32)
        a = F.relu(z) if conv[4] == "relu" else F.silu(z)
        return F.conv2d(a, w, None, *conv[:4])

    return run


def main(argv):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="the first three shapes, fewer repeats")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_engines.py: needs a CUDA GPU")
    device, repeats = "cuda", 5 if args.quick else 20
    rows = []
    for name, n, c, oc, k, stride, size, norm in SHAPES[:3] if args.quick else SHAPES:
        x, affine, w, conv = unit_inputs(n, c, oc, k, stride, size, norm, device)
        y_shape = F.conv2d(x[:1], w, None, *conv[:4]).shape[1:]
        grad = torch.randn(n, *y_shape, device=device).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        y_ref, gx_ref, gw_ref = reference(x, affine, w, conv, grad)
        row = {"case": name, "engines": {}}
        eager = eager_unit(x, affine, w, conv, norm)
        row["eager_forward_s"] = time_cuda(eager, repeats)
        xr = x.detach().requires_grad_()
        row["eager_step_s"] = time_cuda(lambda: torch.autograd.grad(eager_unit(xr, affine, w, conv, norm)(), xr,
                                                                    grad), repeats)
        mean, scale, shift, invstd = affine
        for engine in selection.ENGINES:
            with resfast.backend("triton"), resfast.ops.conv_impl(engine):
                try:
                    def forward():
                        return torch.ops.resfast.norm_act_conv2d(x, mean, scale, shift, w, None, None, *conv)

                    def backward():
                        return torch.ops.resfast.norm_act_conv2d_backward(grad, x, mean, scale, shift, w, *conv,
                                                                          None, [True, True])

                    y = forward()
                    gx, _, _, gw = backward()
                    errors = {"y": rel_error(y, y_ref), "grad_x": rel_error(gx, gx_ref),
                              "grad_w": rel_error(gw, gw_ref)}
                    row["engines"][engine] = {"errors": errors, "ok": max(errors.values()) <= TOLERANCE,
                                              "forward_s": time_cuda(forward, repeats),
                                              "backward_s": time_cuda(backward, repeats)}
                except Exception as e:  # noqa: BLE001  (reported: the engine cannot run this shape)
                    row["engines"][engine] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        # What the per-shape measurement chooses for this unit.
        with resfast.backend("triton"):
            torch.ops.resfast.norm_act_conv2d(x, mean, scale, shift, w, None, None, *conv)
        rows.append(row)
        cells = [f"{e}: " + (f"{r['forward_s'] * 1e6:.0f}/{r['backward_s'] * 1e6:.0f} us "
                             f"{'ok' if r['ok'] else 'WRONG ' + str(r['errors'])}" if "forward_s" in r else r["error"])
                 for e, r in row["engines"].items()]
        print(f"{name:42s} eager {row['eager_forward_s'] * 1e6:.0f}/{row['eager_step_s'] * 1e6:.0f} us | "
              + " | ".join(cells), flush=True)
    choices = resfast.ops.conv_choices()
    print("\nper-shape choices:")
    for key, choice in choices.items():
        print(f"  {key}: {choice['choice']} {choice['candidates']}")
    if args.json:
        env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cudnn": torch.backends.cudnn.version(), **selection.environment()}
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows, "conv_choices": choices}, f, indent=1)
    return 0 if all(r.get("ok", True) for row in rows for r in row["engines"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
