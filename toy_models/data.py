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
