"""The per-shape choice among the convolution engines (resfast/ops/conv_engines),
on CPU tensors under the Triton interpreter with an injected timer: the
measurement, its checks, the caches, forcing and determinism. (Every engine's
numbers against the reference are in test_ops.py.)"""

import contextlib
import json
import os

import pytest
import torch

import resfast
from conftest import triton_available
from resfast.ops.conv_engines import selection

pytestmark = [pytest.mark.skipif(not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("fresh_conv_choices")]
ops = torch.ops.resfast


def unit_args(n=2, c=4, hw=5, oc=6):
    torch.manual_seed(0)
    x = torch.randn(n, c, hw, hw)
    vec = [torch.randn(c), torch.rand(c) + 0.5, torch.randn(c)]
    return (x, *vec, torch.randn(oc, c, 3, 3) * 0.2, None, None, [1, 1], [1, 1], [1, 1], 1, "relu")


FUSED_LAUNCHERS = ("norm_act_conv2d_forward", "norm_act_conv2d_backward_input", "norm_act_conv2d_backward_weight")


@contextlib.contextmanager
def fused_launches():
    """The list of the fused engine's launches inside the block."""
    from resfast.kernels import conv

    launched, saved = [], {name: getattr(conv, name) for name in FUSED_LAUNCHERS}
    for name, real in saved.items():
        setattr(conv, name, lambda *a, real=real, **k: launched.append(1) or real(*a, **k))
    try:
        yield launched
    finally:
        for name, real in saved.items():
            setattr(conv, name, real)


def timings(seconds):
    """A timer that reports `seconds[engine]`, telling the engines apart by
    whether the fused kernels launch."""
    calls = []

    def measure(fn):
        with fused_launches() as launched:
            fn()
        engine = "triton" if launched else "split"
        calls.append(engine)
        return seconds[engine]

    return measure, calls


def test_the_faster_engine_is_chosen_once_and_cached(tmp_path):
    args = unit_args()
    for fastest, slower in (("triton", "split"), ("split", "triton")):
        selection.forget()
        if os.path.exists(selection.cache_path()):
            os.remove(selection.cache_path())
        measure, timed = timings({fastest: 1e-3, slower: 2e-3})
        with resfast.backend("triton"), selection.timer(measure):
            y = ops.norm_act_conv2d(*args)
            n_timed = len(timed)
            ops.norm_act_conv2d(*args)  # decided: no second measurement
        assert sorted(set(timed)) == ["split", "triton"] and len(timed) == n_timed
        (key, choice), = resfast.ops.conv_choices().items()
        assert choice["choice"] == fastest and choice["candidates"][slower] == 2e-3, choice
        with resfast.backend("reference"):
            expected = ops.norm_act_conv2d(*args)
        torch.testing.assert_close(y, expected)
    # On disk, for the next process: read back once the memory is dropped.
    data = json.loads((tmp_path / "conv-choices.json").read_text())
    assert data["environment"] == selection.environment() and key in data["choices"]
    selection.forget()
    measure, timed = timings({"triton": 1.0, "split": 1.0})
    with resfast.backend("triton"), selection.timer(measure):
        ops.norm_act_conv2d(*args)
    assert timed == [] and resfast.ops.conv_choices()[key]["choice"] == "split"


def test_without_a_timer_cpu_calls_take_the_split_engine_unmeasured():
    with fused_launches() as launched, resfast.backend("triton"):
        ops.norm_act_conv2d(*unit_args())
    assert launched == [] and resfast.ops.conv_choices() == {}


def test_an_engine_that_disagrees_is_dropped_with_a_warning(monkeypatch):
    from resfast.ops.conv_engines import fused

    real = fused.forward
    monkeypatch.setattr(fused, "forward", lambda call: (lambda y, s: (y + 1, s))(*real(call)))
    measure, _ = timings({"triton": 1e-6, "split": 1.0})
    with resfast.backend("triton"), selection.timer(measure), pytest.warns(UserWarning, match="triton convolution "
                                                                                              "engine disagrees"):
        y = ops.norm_act_conv2d(*unit_args())
    (choice,) = resfast.ops.conv_choices().values()
    assert choice["choice"] == "split" and choice["candidates"]["triton"].startswith("disagrees")
    with resfast.backend("reference"):
        torch.testing.assert_close(y, ops.norm_act_conv2d(*unit_args()))


def test_measuring_never_writes_the_callers_buffer():
    args = list(unit_args())
    out = torch.randn(2, 9, 5, 5)
    before = out.clone()
    measure, timed = timings({"triton": 1.0, "split": 2.0})
    with resfast.backend("triton"), selection.timer(measure):
        ops.norm_act_conv2d_into(*args, out, 2, True)
    assert len(timed) == 2
    with resfast.backend("reference"):
        expected = before.clone()
        ops.norm_act_conv2d_into(*args, expected, 2, True)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[:, :2], before[:, :2]) and torch.equal(out[:, 8:], before[:, 8:])


@pytest.mark.parametrize("how", ["conv_impl", "environment"])
@pytest.mark.parametrize("engine", ["split", "triton"])
def test_an_engine_can_be_forced(engine, how, monkeypatch):
    if how == "environment":
        monkeypatch.setenv("RESFAST_CONV_IMPL", engine)
    forced = resfast.ops.conv_impl(engine) if how == "conv_impl" else contextlib.nullcontext()
    with fused_launches() as launched, resfast.backend("triton"), forced:
        ops.norm_act_conv2d(*unit_args())
    assert bool(launched) == (engine == "triton") and resfast.ops.conv_choices() == {}


def test_bad_engine_names_and_unsupported_forced_engines_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="conv_impl: expected one of 'auto', 'split', 'triton'"):
        with resfast.ops.conv_impl("cublas"):
            pass
    monkeypatch.setenv("RESFAST_CONV_IMPL", "winograd")
    with pytest.raises(ValueError, match="RESFAST_CONV_IMPL: expected one of"):
        with resfast.backend("triton"):
            ops.norm_act_conv2d(*unit_args())
    monkeypatch.delenv("RESFAST_CONV_IMPL")
    from resfast.ops.conv_engines import fused
    monkeypatch.setattr(fused, "unsupported", lambda call: "no such layout")
    with pytest.raises(ValueError, match="the triton engine cannot run .*: no such layout"):
        with resfast.backend("triton"), resfast.ops.conv_impl("triton"):
            ops.norm_act_conv2d(*unit_args())


def test_deterministic_mode_considers_deterministic_engines_only(monkeypatch):
    from resfast.ops.conv_engines import fused

    monkeypatch.setattr(fused, "DETERMINISTIC", False)
    measure, timed = timings({"triton": 1e-6, "split": 1.0})
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with resfast.backend("triton"), selection.timer(measure):
            ops.norm_act_conv2d(*unit_args())
        with pytest.raises(ValueError, match="not deterministic"), resfast.backend("triton"):
            with resfast.ops.conv_impl("triton"):
                ops.norm_act_conv2d(*unit_args())
    finally:
        torch.use_deterministic_algorithms(previous)
    assert "triton" not in timed


@pytest.mark.parametrize("content", ["{not json", json.dumps({"environment": {"torch": "0.0"}, "choices": {}}),
                                     json.dumps(["a", "list"])], ids=["corrupt", "foreign", "wrong-shape"])
def test_an_unusable_cache_file_is_ignored_with_a_warning_and_rewritten(content):
    path = selection.cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(content)
    measure, timed = timings({"triton": 1.0, "split": 2.0})
    with resfast.backend("triton"), selection.timer(measure), pytest.warns(UserWarning, match="ignoring"):
        ops.norm_act_conv2d(*unit_args())
    assert timed, "measured afresh"
    with open(path) as f:
        data = json.load(f)
    assert data["environment"] == selection.environment() and len(data["choices"]) == 1


def test_the_backward_is_chosen_separately():
    args = unit_args()
    x, mean, scale, shift, w = args[:5]
    grad = torch.randn(2, 6, 5, 5)
    measure, _ = timings({"triton": 1.0, "split": 2.0})
    with resfast.backend("triton"), selection.timer(measure):
        grads = ops.norm_act_conv2d_backward(grad, x, mean, scale, shift, w, *args[7:12], None, [True, True])
    choices = resfast.ops.conv_choices()
    assert len(choices) == 1 and next(iter(choices)).startswith("bwd-")
    with resfast.backend("reference"):
        expected = ops.norm_act_conv2d_backward(grad, x, mean, scale, shift, w, *args[7:12], None, [True, True])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_every_convolution_op_lists_its_engines():
    from resfast.ops.registry import OPS

    conv_ops = {name for name, op in OPS.items() if op.engines}
    assert conv_ops == {"norm_act_conv2d", "norm_act_conv2d_into", "norm_act_conv2d_stats",
                        "norm_act_conv2d_backward"}
    assert all(set(OPS[name].engines) == set(selection.ENGINES) for name in conv_ops)
