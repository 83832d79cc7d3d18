"""Comparison helpers: errors relative to a float64 reference, reporting the
worst element and the share of elements out of tolerance."""

import torch

# Largest error allowed, relative to the reference's largest magnitude.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def assert_close(actual, expected, dtype, name, tol=None):
    tol = TOLERANCE[dtype] if tol is None else tol
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: {(~torch.isfinite(a)).sum().item()} non-finite elements"
    scale = e.abs().max().item() or 1.0
    err = (a - e).abs()
    worst = err.max().item()
    if worst > tol * scale:
        idx = tuple(torch.nonzero(err == err.max())[0].tolist())
        bad = (err > tol * scale).double().mean().item()
        raise AssertionError(
            f"{name}: max error {worst:.3e} > {tol:.1e} x {scale:.3e} at {idx} "
            f"(actual {a[idx].item():.6g}, expected {e[idx].item():.6g}); {bad:.2%} of elements out of tolerance"
        )
