"""Sparse-feature data: each feature is independently active with probability p, active values U(lo, hi)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def sparse_features(
    batch_size: int,
    n_features: int,
    p: float,
    generator: torch.Generator | None = None,
    lo: float = 0.0,
    hi: float = 1.0,
) -> Float[Tensor, "batch n_features"]:
    active = torch.rand(batch_size, n_features, generator=generator) < p
    values = torch.rand(batch_size, n_features, generator=generator) * (hi - lo) + lo
    return values * active


SUBSETS_HELP = "only:I (feature I on, every other off), without:I[,J...] (the data with those features off), all"


def feature_subset(
    spec: str, batch_size: int, n_features: int, p: float, generator: torch.Generator, lo: float = 0.0, hi: float = 1.0
) -> Float[Tensor, "batch n_features"]:
    """Named slices of sparse-feature data, for forget/retain sets: see SUBSETS_HELP."""
    kind, _, arg = spec.partition(":")
    try:
        feats = [int(v) for v in arg.split(",")] if arg else []
    except ValueError:
        feats = [-1]
    if kind == "all" and not arg:
        return sparse_features(batch_size, n_features, p, generator, lo, hi)
    if kind not in ("only", "without") or not feats or any(not 0 <= f < n_features for f in feats):
        raise ValueError(f"data subset {spec!r} is not one of: {SUBSETS_HELP} (features 0..{n_features - 1})")
    if kind == "only":
        if len(feats) != 1:
            raise ValueError(f"data subset {spec!r}: `only:` takes one feature")
        x = torch.zeros(batch_size, n_features)
        x[:, feats[0]] = torch.rand(batch_size, generator=generator) * (hi - lo) + lo
        return x
    x = sparse_features(batch_size, n_features, p, generator, lo, hi)
    x[:, feats] = 0.0
    return x
