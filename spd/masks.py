"""Mask sampling and routing: pure tensor functions.

Stochastic masks are `m = g + (1 - g) r` with r ~ U(0, 1) ("continuous") or r ~ Bernoulli(1/2)
("binomial"), drawn independently per module, example (and position) and subcomponent.
Routing says which decomposed modules use their components in a masked forward pass.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

Sampling = Literal["continuous", "binomial"]
Routing = Literal["all", "layerwise", "subset"]
MaskKind = Literal["ci", "rounded", "ones", "zeros", "random", "stochastic"]


def stochastic_mask(
    g: Float[Tensor, "... C"], sampling: Sampling, generator: torch.Generator | None = None
) -> Float[Tensor, "... C"]:
    r = torch.rand(g.shape, generator=generator, dtype=g.dtype, device=g.device)
    if sampling == "binomial":
        r = (r < 0.5).to(g.dtype)
    return g + (1 - g) * r


def stochastic_masks(
    ci: dict[str, Tensor], sampling: Sampling, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    return {n: stochastic_mask(g, sampling, generator) for n, g in ci.items()}


def delta_masks(ci: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Delta-component masks ~ U(0, 1), one per example (and position); always continuous."""
    return {n: torch.rand(g.shape[:-1], generator=generator, dtype=g.dtype, device=g.device) for n, g in ci.items()}


def subset_routes(
    names: list[str],
    batch_shape: torch.Size,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Bool[Tensor, "..."]]:
    """Uniform k-subset routing: per position draw k ~ U{1..L}, then route a uniformly random k-subset."""
    L = len(names)
    k = torch.randint(1, L + 1, batch_shape, generator=generator, device=device)
    # The rank of each module in a random permutation: argsort of i.i.d. uniforms.
    ranks = torch.rand((*batch_shape, L), generator=generator, device=device).argsort(-1).argsort(-1)
    routed = ranks < k[..., None]
    return {n: routed[..., i] for i, n in enumerate(names)}


def make_masks(
    ci: dict[str, Tensor],
    kind: MaskKind,
    threshold: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Masks of a named kind shaped like the CIs `ci` (lower): for notebooks and evaluation.

    ci: m = g; rounded: m = 1[g > threshold]; ones / zeros: constant; random: U(0, 1);
    stochastic: g + (1 - g) U(0, 1).
    """
    if kind == "ci":
        return dict(ci)
    if kind == "rounded":
        return {n: (g > threshold).to(g.dtype) for n, g in ci.items()}
    if kind == "ones":
        return {n: torch.ones_like(g) for n, g in ci.items()}
    if kind == "zeros":
        return {n: torch.zeros_like(g) for n, g in ci.items()}
    if kind == "random":
        return {n: torch.rand(g.shape, generator=generator, dtype=g.dtype, device=g.device) for n, g in ci.items()}
    if kind == "stochastic":
        return stochastic_masks(ci, "continuous", generator)
    raise ValueError(f"unknown mask kind {kind!r}; valid: ci, rounded, ones, zeros, random, stochastic")


def subset_masks(ci: dict[str, Tensor], keep: dict[str, list[int]], default: float = 1.0) -> dict[str, Tensor]:
    """Masks that keep only the listed subcomponents of each listed module (1) and ablate the rest (0).

    Modules not in `keep` get `default` everywhere (1.0: untouched).
    """
    out = {}
    for n, g in ci.items():
        if n in keep:
            m = torch.zeros_like(g)
            m[..., keep[n]] = 1.0
        else:
            m = torch.full_like(g, default)
        out[n] = m
    return out
