"""BNReLUConv2d and the ops under it, every backend, against float64 eager torch."""

import copy

import pytest
import torch
from torch import nn

import resfast
from conftest import available_backends
from resfast.bench.timing import saved_activation_bytes
from utils import assert_close

BACKENDS = available_backends()

# (in, out, kernel, stride, padding, dilation, groups, bias, (H, W))
CONFIGS = [
    (5, 6, 1, 1, 0, 1, 1, False, (7, 9)),
    (4, 10, 3, 1, 1, 1, 1, True, (8, 8)),
    (6, 4, 3, 2, (1, 0), 1, 2, False, (9, 7)),
    (3, 8, 7, 2, 3, 1, 1, False, (11, 10)),
    (4, 6, 3, 1, 2, 2, 1, True, (6, 7)),
    (20, 5, (1, 3), (2, 1), (0, 1), 1, 1, False, (5, 5)),
]


def make_pair(cfg, device, dtype=torch.float32, **bn_kwargs):
    """Our unit and the eager float64 reference with the same, non-trivial weights."""
    cin, cout, k, s, p, d, g, bias, _ = cfg
    unit = resfast.nn.BNReLUConv2d(cin, cout, k, s, p, d, g, bias, **bn_kwargs)
    with torch.no_grad():
        if unit.bn.affine:
            unit.bn.weight.uniform_(-1.5, 1.5)
            unit.bn.bias.uniform_(-0.5, 0.5)
        if unit.bn.track_running_stats:
            unit.bn.running_mean.uniform_(-1, 1)
            unit.bn.running_var.uniform_(0.5, 2)
    ref = nn.Sequential(copy.deepcopy(unit.bn), nn.ReLU(inplace=True), copy.deepcopy(unit.conv)).double()
    return unit.to(device=device, dtype=dtype), ref


def run_step(module, x, grad, backend=None):
    x = x.detach().clone().requires_grad_()
    if backend is None:
        y = module(x)
        y.backward(grad)
    else:
        with resfast.backend(backend):
            y = module(x)
            y.backward(grad)
    return y, x.grad


def compare(unit, ref, cfg, backend, device, training, channels_last=False, dtype=torch.float32, tol=None):
    unit.train(training)
    ref.train(training)
    h, w = cfg[-1]
    x = (torch.randn(3, cfg[0], h, w, dtype=torch.float64) * 1.5 + 0.3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y, gx = run_step(unit, x.to(device=device, dtype=dtype), grad.to(device=device, dtype=dtype), backend)
    assert_close(y, y_ref, dtype, "output", tol)
    assert_close(gx, x_ref.grad, dtype, "grad x", tol)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last), "channels_last in must give channels_last out"
    pairs = [(unit.conv.weight.grad, ref[2].weight.grad, "grad conv.weight")]
    if unit.conv.bias is not None:
        pairs.append((unit.conv.bias.grad, ref[2].bias.grad, "grad conv.bias"))
    if unit.bn.affine:
        pairs += [(unit.bn.weight.grad, ref[0].weight.grad, "grad bn.weight"),
                  (unit.bn.bias.grad, ref[0].bias.grad, "grad bn.bias")]
    if unit.bn.track_running_stats:
        pairs += [(unit.bn.running_mean, ref[0].running_mean, "running_mean"),
                  (unit.bn.running_var, ref[0].running_var, "running_var")]
        assert unit.bn.num_batches_tracked.item() == ref[0].num_batches_tracked.item()
    for actual, expected, name in pairs:
        assert_close(actual, expected, dtype, name, tol)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_unit_matches_eager(backend, device, cfg, training, poison_empty):
    unit, ref = make_pair(cfg, device)
    compare(unit, ref, cfg, backend, device, training)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_unit_channels_last(backend, device, training, poison_empty):
    cfg = CONFIGS[2]
    unit, ref = make_pair(cfg, device)
    unit = unit.to(memory_format=torch.channels_last)
    compare(unit, ref, cfg, backend, device, training, channels_last=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bn_kwargs", [dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
                                       dict(affine=False, track_running_stats=False, eps=1e-3)],
                         ids=["cumulative", "no-affine", "no-running", "bare"])
def test_unit_batchnorm_flags(backend, device, bn_kwargs):
    cfg = CONFIGS[1]
    unit, ref = make_pair(cfg, device, **bn_kwargs)
    for _ in range(2):  # twice: the cumulative average uses num_batches_tracked
        compare(unit, ref, cfg, backend, device, training=True)
    compare(unit, ref, cfg, backend, device, training=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_unit_low_precision_cpu(dtype, channels_last):
    cfg = CONFIGS[1]
    unit, ref = make_pair(cfg, "cpu", dtype=dtype)
    compare(unit, ref, cfg, None, "cpu", training=True, channels_last=channels_last, dtype=dtype)


@pytest.mark.parametrize("backend,device", [b for b in BACKENDS if b != ("auto", "cuda")])
def test_unit_autocast_matches_torch_modules(backend, device):
    """Under autocast the unit returns what BatchNorm2d→ReLU→Conv2d return, and
    its parameters and running statistics stay float32."""
    cfg = CONFIGS[1]
    unit, _ = make_pair(cfg, device)
    eager = nn.Sequential(copy.deepcopy(unit.bn), nn.ReLU(), copy.deepcopy(unit.conv))
    x = torch.randn(2, cfg[0], 8, 8, device=device)
    with torch.autocast(device, dtype=torch.bfloat16), resfast.backend(backend):
        y = unit(x)
        y_eager = eager(x)
    assert y.dtype == y_eager.dtype == torch.bfloat16
    assert_close(y, y_eager, torch.bfloat16, "autocast output")
    assert unit.bn.running_mean.dtype == torch.float32 and unit.conv.weight.dtype == torch.float32
    assert_close(unit.bn.running_var, eager[0].running_var, torch.float32, "autocast running_var")


@pytest.mark.parametrize("activation", ["relu", "silu", "identity", "relu6"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(activation, training):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    bn_w = torch.rand(4, dtype=torch.float64, requires_grad=True) + 0.5
    bn_b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 6, 3, 6, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5

    def f(x, bn_w, bn_b, w, b, res):
        return resfast.ops.batch_norm_act_conv2d(x, rm.clone(), rv.clone(), bn_w, bn_b, training, 0.1, 1e-5, w, b,
                                                 stride=(2, 1), padding=1, groups=2, activation=activation,
                                                 residual=res)

    assert torch.autograd.gradcheck(f, (x, bn_w, bn_b, w, b, res))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_relu6_clips_at_both_ends(training):
    """BatchNorm → ReLU6 → conv against torch's modules in float64, with the
    normalised values spread over [-12, 12] so both of ReLU6's kinks are crossed."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 5, 3, padding=1)).double()
    with torch.no_grad():
        eager[0].weight.uniform_(3.0, 4.0)
        eager[0].bias.uniform_(-1.0, 3.0)
        eager[0].running_var.uniform_(0.5, 1.5)
    unit = resfast.nn.BNReLUConv2d.from_modules(copy.deepcopy(eager[0]), copy.deepcopy(eager[2]), "relu6")
    unit.train(training)
    eager.train(training)
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = eager(xa), unit(xb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    z = eager[0](x) if not training else None
    assert z is None or ((z > 6).any() and (z < 0).any())
    assert_close(yb, ya, torch.float64, "output")
    assert_close(xb.grad, xa.grad, torch.float64, "grad input")
    for (name, p), q in zip(unit.named_parameters(), [eager[0].weight, eager[0].bias, eager[2].weight,
                                                       eager[2].bias]):
        assert_close(p.grad, q.grad, torch.float64, f"grad {name}")


def test_saved_activation_memory_at_most_055x_eager():
    unit = resfast.nn.BNReLUConv2d(64, 64, 3, padding=1)
    eager = nn.Sequential(nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.Conv2d(64, 64, 3, padding=1, bias=False))
    x = torch.randn(4, 64, 28, 28, requires_grad=True)
    ours, theirs = saved_activation_bytes(unit, x), saved_activation_bytes(eager, x)
    assert ours <= 0.55 * theirs, f"saved {ours} bytes vs eager {theirs}"


def test_from_modules_and_state_dict():
    bn, conv = nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3, padding=1, bias=True)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.running_mean.uniform_(-1, 1)
    seq = nn.Sequential(bn, nn.ReLU(), conv).eval()
    unit = resfast.nn.BNReLUConv2d.from_modules(bn, conv).eval()
    assert unit.bn.weight is bn.weight and unit.conv.weight is conv.weight
    x = torch.randn(2, 4, 6, 6)
    assert_close(unit(x), seq(x), torch.float32, "from_modules output")

    fresh = resfast.nn.BNReLUConv2d(4, 8, 3, padding=1, bias=True)
    expected_keys = {f"bn.{k}" for k in bn.state_dict()} | {f"conv.{k}" for k in conv.state_dict()}
    assert set(fresh.state_dict()) == expected_keys
    fresh.load_state_dict({**{f"bn.{k}": v for k, v in bn.state_dict().items()},
                           **{f"conv.{k}": v for k, v in conv.state_dict().items()}}, strict=True)
    assert_close(fresh.eval()(x), seq(x), torch.float32, "loaded state_dict output")


def test_same_and_valid_padding():
    for padding in ("same", "valid"):
        unit = resfast.nn.BNReLUConv2d(3, 4, 3, padding=padding).eval()
        seq = nn.Sequential(unit.bn, nn.ReLU(), unit.conv).eval()
        x = torch.randn(1, 3, 7, 5)
        assert_close(unit(x), seq(x), torch.float32, f"padding={padding}")


def test_empty_batch_returns_what_torch_returns():
    unit = resfast.nn.BNReLUConv2d(3, 4, 3, padding=1)
    ref = nn.Sequential(copy.deepcopy(unit.bn), nn.ReLU(), copy.deepcopy(unit.conv))
    x = torch.randn(0, 3, 5, 5)
    y, y_ref = unit(x), ref(x)
    assert y.shape == y_ref.shape
    assert torch.equal(unit.bn.running_mean, ref[0].running_mean)
    assert unit.bn.num_batches_tracked.item() == ref[0].num_batches_tracked.item() == 1


def test_inputs_are_not_modified():
    unit = resfast.nn.BNReLUConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    res = torch.randn(2, 4, 5, 5)
    x0, res0 = x.clone(), res.clone()
    unit(x, residual=res).sum().backward()
    assert torch.equal(x, x0) and torch.equal(res, res0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_stats_large_mean(backend, device, channels_last, poison_empty):
    """Statistics stay accurate when the mean dwarfs the spread."""
    x = torch.randn(3, 5, 7, 9, dtype=torch.float64) + 1e4
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    var_ref, mean_ref = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    with resfast.backend(backend):
        mean, var = resfast.ops.channel_stats(x.float().to(device))
    assert_close(mean, mean_ref, torch.float32, "mean")
    assert_close(var, var_ref, torch.float32, "var", tol=1e-3)


def test_channel_stats_gradcheck():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: resfast.ops.channel_stats(t), (x,))
    assert torch.autograd.gradcheck(lambda t: resfast.ops.channel_stats(t),
                                    (x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(),))


def test_batch_stats_from_the_producer_replace_the_pass():
    """batch_norm_affine with the producer's (mean, var) gives the same
    NormAffine and running statistics as its own pass, and rejects stats of
    the wrong shape or dtype."""
    x = torch.randn(3, 6, 5, 7) * 2 + 1
    var, mean = torch.var_mean(x, (0, 2, 3), unbiased=False)
    results = []
    for stats in (None, (mean, var)):
        bn = torch.nn.BatchNorm2d(6)
        affine = resfast.nn.batch_norm.bn_affine(bn, x, True, batch_stats=stats)
        results.append((affine, bn.running_mean.clone(), bn.running_var.clone()))
    (own, own_rm, own_rv), (given, given_rm, given_rv) = results
    for a, b, name in zip(own[:3], given[:3], ("mean", "scale", "shift")):
        torch.testing.assert_close(b, a, msg=name)
    torch.testing.assert_close(given_rm, own_rm)
    torch.testing.assert_close(given_rv, own_rv)
    for bad in ((mean[:5], var), (mean, var.double())):
        with pytest.raises(ValueError, match="batch_stats"):
            resfast.nn.batch_norm.bn_affine(torch.nn.BatchNorm2d(6), x, True, batch_stats=bad)
