"""BatchNorm → activation → max pool as one op (resfast.ops.norm_act_max_pool2d,
the stem of a ResNet as resfast.convert fuses it): against eager torch in
float64, the pool's choices on ties, what it saves, and bad input."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resfast
from resfast.activations import activate
from resfast.conversion.units import norm_act_max_pool
from utils import assert_close, assert_within_twice_torch_error

CL = torch.channels_last
# (kernel, stride, padding, dilation, ceil_mode): a ResNet stem's, and the other arguments.
POOLS = [(3, 2, 1, 1, False), (2, 2, 0, 1, True), (3, 1, 1, 2, False), (3, 2, 0, 1, True), ((3, 2), (2, 1), (1, 0),
                                                                                              1, False)]


def _inputs(shape, fmt, negative_gamma, dtype=torch.float64):
    c = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3).contiguous(memory_format=fmt)
    weight = torch.rand(c, dtype=torch.float64) + 0.5
    if negative_gamma:
        weight[1::3] *= -1
    return x, weight, torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64), \
        torch.rand(c, dtype=torch.float64) + 0.5


def _run(fused, x, weight, bias, running_mean, running_var, training, activation, pool, grad, dtype):
    """Output, gradients of x, weight and bias, and the running statistics, in dtype."""
    x, weight, bias = (t.detach().to(dtype).requires_grad_() for t in (x, weight, bias))
    running_mean, running_var = running_mean.to(dtype), running_var.to(dtype)
    k, s, p, d, ceil = pool
    if fused:
        affine = resfast.ops.batch_norm_affine(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)
        y = resfast.ops.norm_act_max_pool2d(x, affine, k, s, p, d, ceil, activation)
    else:
        z = activate(F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5), activation)
        y = F.max_pool2d(z, k, s, p, d, ceil)
    grads = torch.autograd.grad(y, (x, weight, bias), grad.to(dtype))
    return (y, *grads, running_mean, running_var)


NAMES = ("output", "grad x", "grad weight", "grad bias", "running mean", "running var")


@pytest.mark.parametrize("activation", ["relu", "relu6", "identity", "silu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("pool", POOLS, ids=lambda p: "-".join(map(str, p)))
def test_matches_eager_in_float64_and_float32(activation, training, fmt, pool):
    """Negative gammas included (their channels pool the window's minimum);
    a dense random output gradient; odd sizes."""
    torch.manual_seed(0)
    args = _inputs((2, 6, 11, 9), fmt, negative_gamma=True)
    k, s, p, d, ceil = pool
    grad = torch.randn(F.max_pool2d(args[0], k, s, p, d, ceil).shape, dtype=torch.float64)
    exact = _run(False, *args, training, activation, pool, grad, torch.float64)
    ours64 = _run(True, *args, training, activation, pool, grad, torch.float64)
    ours32 = _run(True, *args, training, activation, pool, grad, torch.float32)
    torch32 = _run(False, *args, training, activation, pool, grad, torch.float32)
    for name, e, o64, o32, t32 in zip(NAMES, exact, ours64, ours32, torch32):
        assert_close(o64, e, torch.float64, name)
        assert o32.dtype == torch.float32
        assert_within_twice_torch_error(o32, t32, e, name, floor=1e-5)
    assert ours32[0].is_contiguous(memory_format=fmt) and ours32[1].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("negative_gamma", [False, True], ids=["gamma+", "gamma-"])
def test_ties_go_where_eager_sends_them(fmt, negative_gamma):
    """Equal values in a window (a constant image border): the gradient goes
    to the element eager's max pool picks, the first in row-major order."""
    torch.manual_seed(0)
    x, weight, bias, running_mean, running_var = _inputs((2, 4, 10, 12), fmt, negative_gamma)
    x = torch.randint(-2, 3, x.shape, dtype=torch.float64).contiguous(memory_format=fmt)
    x[:, :, :4] = 1.0
    grad = torch.randn(F.max_pool2d(x, 3, 2, 1).shape, dtype=torch.float64)
    for training in (True, False):
        exact = _run(False, x, weight, bias, running_mean, running_var, training, "identity", POOLS[0], grad,
                     torch.float64)
        ours = _run(True, x, weight, bias, running_mean, running_var, training, "identity", POOLS[0], grad,
                    torch.float64)
        for name, e, o in zip(NAMES, exact, ours):
            assert_close(o, e, torch.float64, name)


def test_half_precision_and_dtypes():
    torch.manual_seed(0)
    x, weight, bias, running_mean, running_var = _inputs((2, 4, 9, 9), torch.contiguous_format, True)
    grad = torch.randn(F.max_pool2d(x, 3, 2, 1).shape, dtype=torch.float64)
    exact = _run(False, x, weight, bias, running_mean, running_var, True, "relu", POOLS[0], grad, torch.float64)
    for dtype in (torch.bfloat16, torch.float16):
        # BatchNorm parameters stay float32 for half input (batch_norm_affine's rule: the vectors are float32).
        xh = x.to(dtype).requires_grad_()
        w, b = weight.float().requires_grad_(), bias.float().requires_grad_()
        affine = resfast.ops.batch_norm_affine(xh, running_mean.float(), running_var.float(), w, b, True, 0.1, 1e-5)
        y = resfast.ops.norm_act_max_pool2d(xh, affine, 3, 2, 1)
        assert y.dtype == dtype
        gx, gw, gb = torch.autograd.grad(y, (xh, w, b), grad.to(dtype))
        assert gx.dtype == dtype
        for name, got, want in zip(NAMES, (y, gx, gw, gb), exact):
            assert_close(got, want, dtype, name)


def _saved_bytes(fn):
    sizes = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes.values())


def test_saves_only_the_input_and_vectors():
    x = torch.randn(2, 8, 32, 32, requires_grad=True)
    bn, pool = nn.BatchNorm2d(8), nn.MaxPool2d(3, 2, 1)
    ours = _saved_bytes(lambda: norm_act_max_pool(x, bn, pool, "relu"))
    eager = _saved_bytes(lambda: pool(F.relu(bn(x))))
    assert ours <= x.numel() * 4 + 64 * 8, ours
    # Eager keeps x, the activation and the pool's int64 indices: three times as much and more.
    assert eager > 2.4 * ours, (eager, ours)


def test_module_semantics_through_the_converted_stem():
    """The BatchNorm's bookkeeping (num_batches_tracked, momentum=None,
    track_running_stats=False, eval) as the module's forward keeps it."""
    torch.manual_seed(0)
    for momentum, track in itertools.product((0.1, None), (True, False)):
        ref = nn.BatchNorm2d(5, momentum=momentum, track_running_stats=track).double()
        ours = nn.BatchNorm2d(5, momentum=momentum, track_running_stats=track).double()
        pool = nn.MaxPool2d(3, 2, 1)
        for step, training in enumerate((True, True, False)):
            ref.train(training)
            ours.train(training)
            x = torch.randn(2, 5, 9, 9, dtype=torch.float64)
            assert_close(norm_act_max_pool(x, ours, pool, "relu"), pool(F.relu(ref(x))), torch.float64,
                         f"step {step}")
            for (name, a), b in zip(ours.named_buffers(), ref.buffers()):
                assert torch.equal(a, b) or torch.allclose(a, b, rtol=1e-12), name
    empty = torch.randn(0, 5, 9, 9)
    bn = nn.BatchNorm2d(5).eval()
    assert norm_act_max_pool(empty, bn, nn.MaxPool2d(3, 2, 1), "relu").shape == (0, 5, 5, 5)


def test_bad_input_raises_clearly():
    x = torch.randn(2, 4, 8, 8)
    affine = resfast.ops.batch_norm_affine(x, None, None, None, None, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        resfast.ops.norm_act_max_pool2d(torch.randn(2, 4, 3, 8, 8), affine, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        resfast.ops.norm_act_max_pool2d(x, affine, 0)
    with pytest.raises(ValueError, match="padding"):
        resfast.ops.norm_act_max_pool2d(x, affine, 3, 2, 2)
    with pytest.raises(ValueError, match="activation"):
        resfast.ops.norm_act_max_pool2d(x, affine, 3, activation="gelu")
    per_sample = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="per-channel"):
        torch.ops.resfast.norm_act_max_pool2d(x, per_sample, per_sample, per_sample, [3, 3], [2, 2], [1, 1], [1, 1],
                                              False, "relu", None)
    with pytest.raises(ValueError, match="shape"):
        torch.ops.resfast.norm_act_max_pool2d(x, affine.mean[:3], affine.scale, affine.shift, [3, 3], [2, 2], [1, 1],
                                              [1, 1], False, "relu", None)
    with pytest.raises(RuntimeError):  # a kernel larger than the padded input: ATen's own shape check
        resfast.ops.norm_act_max_pool2d(torch.randn(1, 4, 2, 2), affine, 5, 1, 0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_convert_fuses_the_stem_and_reports_what_it_cannot(training):
    from utils import compare_models, randomize

    torch.manual_seed(0)
    stem = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                   nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 4, 1))).double()
    converted, report = resfast.convert(stem)
    assert report.units == 1 and report.replaced[0].original == "1 → 2 → 3", str(report)
    compare_models(converted, stem, torch.randn(2, 3, 13, 11, dtype=torch.float64), training, dtype=torch.float64)
    for middle, reason in ((nn.GroupNorm(2, 8), "GroupNorm before a max pool"),
                           (nn.BatchNorm2d(8), "return_indices")):
        pool = nn.MaxPool2d(2, return_indices=isinstance(middle, nn.BatchNorm2d))
        _, report = resfast.convert(nn.Sequential(nn.Conv2d(3, 8, 3), middle, nn.ReLU(), pool))
        assert report.units == 0 and reason in report.skipped[0].reason, str(report)


def test_max_pool2d_is_max_pool():
    """resfast.ops.max_pool2d (the models' pools): F.max_pool2d's values and
    gradients, ties included, saving only its input."""
    torch.manual_seed(0)
    for fmt, ceil in itertools.product((torch.contiguous_format, CL), (False, True)):
        x = torch.randint(-3, 4, (2, 3, 9, 7), dtype=torch.float64).contiguous(memory_format=fmt)
        x = x.requires_grad_()
        grad = torch.randn(F.max_pool2d(x, 2, ceil_mode=ceil).shape, dtype=torch.float64)
        ours = resfast.ops.max_pool2d(x, 2, ceil_mode=ceil)
        eager = F.max_pool2d(x, 2, ceil_mode=ceil)
        assert torch.equal(ours, eager) and ours.is_contiguous(memory_format=fmt)
        assert torch.equal(*(torch.autograd.grad(y, x, grad)[0] for y in (ours, eager)))
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    assert _saved_bytes(lambda: resfast.ops.max_pool2d(x, 2)) <= x.numel() * 4 + 3 * 8 * 4


def test_max_pool_module_is_a_drop_in():
    torch.manual_seed(0)
    for args in ((2,), (3, 2, 1), (3, 1, 1, 2, False, True)):
        ours, torchs = resfast.nn.MaxPool2d(*args), nn.MaxPool2d(*args)
        assert repr(ours).split("(", 1)[1] == repr(torchs).split("(", 1)[1] and ours.state_dict() == {}
        for shape in ((2, 3, 9, 8), (3, 9, 8)):  # batched and unbatched
            x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
            y, ref = ours(x), torchs(x)
            if isinstance(ref, tuple):  # return_indices=True: torch's own
                assert all(torch.equal(a, b) for a, b in zip(y, ref))
                continue
            grad = torch.randn_like(ref)
            assert torch.equal(y, ref)
            assert torch.equal(*(torch.autograd.grad(t, x, grad)[0] for t in (y, ref)))


def test_windows_of_padding_only_and_strided_vectors():
    """A dilated window that covers only padding is refused (ATen returns
    -inf there) on every path; the vectors may be any view."""
    x = torch.randn(1, 3, 2, 6)
    vectors = [torch.zeros(3), torch.ones(3), torch.zeros(3)]
    for layout in (torch.contiguous_format, CL):
        with pytest.raises(ValueError, match="covers only padding"):
            torch.ops.resfast.norm_act_max_pool2d(x.contiguous(memory_format=layout), *vectors, [2, 2], [1, 1],
                                                  [1, 1], [3, 1], False, "relu", None)
    expanded = [torch.zeros(1).expand(3), torch.ones(1).expand(3), torch.full((6,), 0.5)[::2]]
    y = torch.ops.resfast.norm_act_max_pool2d(x, *expanded, [2, 2], [2, 2], [0, 0], [1, 1], False, "identity", None)
    assert torch.equal(y, F.max_pool2d(x, 2) + 0.5)


def test_pool_arguments_as_torch_takes_them():
    import numpy as np

    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(resfast.ops.max_pool2d(x, np.int64(2), [2], (0,)), F.max_pool2d(x, 2))
    with pytest.raises(ValueError, match="kernel_size"):
        resfast.ops.max_pool2d(x, 2.5)


def test_converted_and_resfast_models_still_trace_with_fx():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 4, 1)).eval()
    converted, _ = resfast.convert(model)
    assert type(converted[1]) is resfast.nn.MaxPool2d
    x = torch.randn(2, 3, 11, 11)
    features = create_feature_extractor(converted, return_nodes=["1", "2"])(x)
    assert torch.equal(features["2"], model(x))
    densenet = resfast.models.densenet121(num_classes=3).eval()
    traced = torch.fx.symbolic_trace(densenet.features[:4])  # the stem, as torch modules
    assert torch.equal(traced(x), densenet.features[:4](x))


def test_densenet_stem_changed_by_the_user_runs_as_sequential():
    from utils import randomize

    torch.manual_seed(0)
    model = randomize(resfast.models.densenet121(num_classes=3)).train()
    x = torch.randn(2, 3, 32, 32)
    seen = []
    model.features.relu0.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    model(x)
    assert seen == [(2, 64, 16, 16)]  # the hook ran: the stem was not fused
    model.features.pool0 = nn.Identity()
    assert model(x).shape == (2, 3)
