"""resfast.convert on the models of torchvision, timm, diffusers, MONAI and
segmentation_models_pytorch: units fused, patterns left alone, the bytes
saved for backward by one training forward (converted / original), the
training-step speed-up (original's time / converted's, interleaved medians)
and whether a float64 training forward gives the same outputs; on the CPU at
64x64, batch 2. Writes JSON; `--markdown` prints the table.

    python benchmarks/convert_models.py --json benchmarks/results/convert-models-DATE.json --markdown
"""

import argparse
import copy
import json
import statistics
import time
import warnings
from collections import Counter

import torch

import resfast
from resfast.bench.__main__ import environment


def _torchvision(name):
    import torchvision
    return lambda: getattr(torchvision.models, name)(num_classes=10)


def _timm(name):
    import timm
    return lambda: timm.create_model(name, num_classes=10)


def _diffusers_unet():
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)


def _diffusers_condition_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, layers_per_block=1, attention_head_dim=8)


def _diffusers_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, latent_channels=4)


def _monai(name):
    def make():
        from monai.networks import nets
        if name == "SegResNet":
            return nets.SegResNet(spatial_dims=2, in_channels=3, out_channels=2)
        return nets.BasicUNet(spatial_dims=2, in_channels=3, out_channels=2)
    return make


def _smp_unet():
    import segmentation_models_pytorch as smp
    return smp.Unet("resnet34", encoder_weights=None, classes=2)


def _image():
    return (torch.randn(2, 3, 64, 64),)


MODELS = [(f"torchvision {n}", _torchvision(n), _image) for n in
          ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "regnet_y_400mf", "mobilenet_v2",
           "efficientnet_b0", "densenet121", "vgg11_bn")]
MODELS += [(f"timm {n}", _timm(n), _image) for n in
           ("resnetv2_50", "resnetv2_50x1_bit", "resnetv2_50d_gn", "densenet121", "resnet50d", "resnet26t", "dpn68",
            "dla34", "regnetx_002", "cs3darknet_s", "cspresnet50", "mobilenetv3_small_100")]
MODELS += [
    ("diffusers UNet2DModel", _diffusers_unet, lambda: (torch.randn(2, 3, 64, 64), torch.tensor([10, 500]))),
    ("diffusers UNet2DConditionModel", _diffusers_condition_unet,
     lambda: (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 7, 32))),
    ("diffusers AutoencoderKL", _diffusers_vae, _image),
    ("MONAI SegResNet (2-D)", _monai("SegResNet"), _image),
    ("MONAI BasicUNet (2-D)", _monai("BasicUNet"), _image),
    ("smp Unet(resnet34)", _smp_unet, _image),
]


def _output(y):
    return y.sample if hasattr(y, "sample") else y


def _step(model, args, grad):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # dropout and stochastic depth: the same draws for both models
    _output(model(*args)).backward(grad)


def _step_ratio(model, converted, args, repeats):
    """Training-step time, original / converted: interleaved, medians after warm-up."""
    grad = torch.randn_like(_output(model(*args)))
    times = {id(m): [] for m in (model, converted)}
    for i in range(repeats + 2):
        for m in (model, converted):
            start = time.perf_counter()
            _step(m, args, grad)
            if i >= 2:
                times[id(m)].append(time.perf_counter() - start)
    return statistics.median(times[id(model)]) / statistics.median(times[id(converted)])


def _equal(model, converted, args):
    """Outputs of a float64 training forward agree to 1e-8 relative."""
    model, converted = copy.deepcopy(model).double().train(), copy.deepcopy(converted).double().train()
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    ys = []
    for m in (model, converted):
        torch.manual_seed(0)
        ys.append(_output(m(*args)))
    return bool((ys[0] - ys[1]).abs().max() <= 1e-8 * ys[0].abs().max())


def measure(name, make, inputs, repeats):
    torch.manual_seed(0)
    model = make()
    args = inputs()
    converted, report = resfast.convert(model, example_inputs=args)
    reasons = Counter(s.reason for s in report.skipped)
    return {"model": name, "units": report.units, "skipped": len(report.skipped),
            "saved_ratio": round(report.saved_ratio, 3), "equal": _equal(model, converted, args),
            "step_speedup": round(_step_ratio(model.train(), converted.train(), args, repeats), 3),
            "reasons": dict(reasons)}


def markdown(rows):
    lines = ["| model | units fused | left alone | saved activations | training step speed-up | equal |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        why = "; ".join(f"{n}× {reason[:70]}" for reason, n in r["reasons"].items())
        lines.append(f"| {r['model']} | {r['units']} | {r['skipped']}{' (' + why + ')' if why else ''} | "
                     f"{r['saved_ratio']:.2f}× | {r['step_speedup']:.2f}× | {'yes' if r['equal'] else 'no'} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--repeats", type=int, default=7, help="timed training steps per model (medians)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    rows = []
    for name, make, inputs in MODELS:
        try:
            rows.append(measure(name, make, inputs, args.repeats))
        except ImportError as e:
            print(f"{name}: skipped ({e})")
            continue
        print(rows[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(torch.device("cpu")), "input": "64x64, batch 2, float32, training",
                       "rows": rows}, f, indent=1)
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
