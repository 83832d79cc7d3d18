"""Comparison helpers: errors relative to a float64 reference, reporting the
worst element and the share of elements out of tolerance."""

import torch

import resfast

# Largest error allowed, relative to the reference's largest magnitude.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def assert_close(actual, expected, dtype, name, tol=None, floor=0.0):
    """floor: a magnitude the error is measured against when expected's own is
    smaller (a gradient that cancels to zero is exact only up to the rounding
    of the terms that cancel)."""
    tol = TOLERANCE[dtype] if tol is None else tol
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: {(~torch.isfinite(a)).sum().item()} non-finite elements"
    if e.numel() == 0:
        return
    scale = max(e.abs().max().item(), floor) or 1.0
    err = (a - e).abs()
    worst = err.max().item()
    if worst > tol * scale:
        idx = tuple(torch.nonzero(err == err.max())[0].tolist())
        bad = (err > tol * scale).double().mean().item()
        raise AssertionError(
            f"{name}: max error {worst:.3e} > {tol:.1e} x {scale:.3e} at {idx} "
            f"(actual {a[idx].item():.6g}, expected {e[idx].item():.6g}); {bad:.2%} of elements out of tolerance"
        )


def max_rel_error(actual, expected):
    """Largest absolute error, relative to expected's largest magnitude."""
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def assert_within_twice_torch_error(ours, torch32, exact, name, floor):
    """The rule for float32 against a float64 reference: our error at most
    twice torch's own float32 error, or `floor` when torch's is smaller."""
    limit = max(2 * max_rel_error(torch32, exact), floor)
    err = max_rel_error(ours, exact)
    assert err <= limit, f"{name}: error {err:.2e} vs float64 > {limit:.2e} (torch float32: " \
                         f"{max_rel_error(torch32, exact):.2e})"


def randomize(model):
    """Non-trivial weights and statistics everywhere (timm zero-initialises
    the last conv of each block, which would hide the residual branches)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.uniform_(-0.2, 0.2)
            else:
                p.normal_(0, (2.0 / p[0].numel()) ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.uniform_(-0.5, 0.5)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return model


def assert_param_grads_close(ours, ref, dtype, tol=None):
    """Each of ours' parameter gradients against ref's parameter of the same
    name. A gradient that cancels to zero (a bias before a training-mode
    BatchNorm, an attention key's bias) is exact only up to the rounding of
    the terms that cancel: it is measured against its module's largest."""
    ref_params = dict(ref.named_parameters())
    module_scale = {}
    for name, p in ref_params.items():
        module = name.rpartition(".")[0]
        module_scale[module] = max(module_scale.get(module, 0.0), p.grad.abs().max().item())
    for name, p in ours.named_parameters():
        assert_close(p.grad, ref_params[name].grad, dtype, f"grad {name}", tol,
                     floor=module_scale[name.rpartition(".")[0]])


def _as_list(y):
    return [y] if isinstance(y, torch.Tensor) else list(y)


def compare_models(ours, ref, x, training, backend="auto", dtype=torch.float32, tol=None, grads=True):
    """Run both models (ref in float64 on the CPU; ours where x is) on x with
    the same output gradients and compare outputs (a tensor or a list of
    them), the input and parameter gradients, and the buffers."""
    ours.train(training)
    ref.train(training)
    x_ref = x.detach().double().cpu().requires_grad_()
    y_ref = ref(x_ref)
    xin = x.to(dtype).requires_grad_()
    with resfast.backend(backend):
        ys, ys_ref = _as_list(ours(xin)), _as_list(y_ref)
        if grads:
            gs = [torch.randn_like(t) for t in ys_ref]
            torch.autograd.backward(ys_ref, gs)
            torch.autograd.backward(ys, [g.to(t.device, t.dtype) for g, t in zip(gs, ys)])
    assert len(ys) == len(ys_ref), f"{len(ys)} outputs, expected {len(ys_ref)}"
    for i, (out, out_ref) in enumerate(zip(ys, ys_ref)):
        assert_close(out, out_ref, dtype, f"output {i}", tol)
    if grads:
        assert_close(xin.grad, x_ref.grad, dtype, "grad input", tol)
        assert_param_grads_close(ours, ref, dtype, tol)
    ref_buffers = dict(ref.named_buffers())
    for name, b in ours.named_buffers():
        if b.is_floating_point():
            assert_close(b, ref_buffers[name], dtype, name, tol)
        else:
            assert torch.equal(b, ref_buffers[name]), name
