"""Stochastic depth, the regulariser of the residual blocks."""


def drop_path(x, p: float, training: bool):
    """Stochastic depth (Huang et al. 2016): zero whole samples with
    probability p in training and scale the kept ones by 1 / (1 - p)."""
    if not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"p: expected a drop probability in [0, 1), got {p!r}")
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)
