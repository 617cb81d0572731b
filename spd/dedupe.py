"""Merge duplicate subcomponents: pieces of one matrix that read the same direction and fire together.

A decomposition can end with one mechanism split over two rank-1 subcomponents that read (nearly) the same
direction and share its write: both are then important on the same inputs, and the importance-minimality loss
alone hardly moves them, since shifting the write from one to the other changes neither the output nor (at CI
1 on both) the penalty. On ResidMLP 3 such pairs survive thousands of steps (read |cos| 0.95-0.99). Folding one
into the other removes them exactly where the pair is a duplicate:

    V_a U_a + V_b U_b  ->  V_a (U_a + s U_b),  s = <V_a, V_b> / |V_a|^2,

which changes the matrix only by (V_b - s V_a) U_b, the part of b's read off a's direction. b is left as a
spare: no write, a random read of its old norm, and a CI that is 0 everywhere (`CIFunction.silence`). Use it on a
finished run and train a short tail from the result (`train.init_from`): see `benchmarks/merge_duplicates.py`.

Two parallel pieces may also split one direction by input region instead (on ResidMLP, one piece for a feature's
positive values and one for its negative values: the loss cannot tell this from one piece). `min_overlap=0`
merges those too; the kept piece's CI then has to learn the other's inputs in the tail.
"""

from __future__ import annotations

from typing import Any

import torch

from spd.model import ComponentModel


@torch.no_grad()
def merge_duplicates(
    model: ComponentModel,
    x: Any,
    max_cos: float = 0.9,
    min_overlap: float = 0.5,
    threshold: float = 0.1,
    min_density: float = 0.0,
    seed: int = 0,
) -> dict[str, list[tuple[int, int]]]:
    """Fold every alive subcomponent b into a larger alive one a of the same matrix when |cos(V_a, V_b)| >
    `max_cos` and the less often firing of the two fires together with the other on at least `min_overlap` of
    its inputs (firing: CI > `threshold` on the batch `x`; alive: firing on more than `min_density` of it, as
    in the run's eval config). Larger means larger |V||U| (a's mechanism carries more of the write). Returns
    {module: [(a, b): b folded into a]}; tied modules (and their sources) are left alone."""
    if not 0 < max_cos < 1 or not 0 <= min_overlap <= 1:
        raise ValueError(
            f"merge_duplicates needs 0 < max_cos < 1 and 0 <= min_overlap <= 1, got {max_cos}, {min_overlap}"
        )
    if model.ci_fn is None:
        raise ValueError("merge_duplicates needs the model's CI function (to decide which pieces fire together)")
    ci = model.causal_importances(x).lower
    generator = torch.Generator().manual_seed(seed)
    skip = set(model.tied) | set(model.tied.values())
    merged: dict[str, list[tuple[int, int]]] = {}
    for name in model.module_names:
        if name in skip:
            continue
        comp = model.comp(name)
        if comp.rank != 1:
            raise ValueError(f"merge_duplicates: {name!r} has rank {comp.rank}; it is for rank-1 (method spd)")
        V, U = comp.V, comp.U  # (d_in, C), (C, d_out)
        fire = (ci[name].flatten(0, -2) > threshold).float()
        count = fire.sum(0)
        alive = count > max(min_density * fire.shape[0], 0.5)
        unit = V / V.norm(dim=0, keepdim=True).clamp_min(1e-30)
        parallel = (unit.T @ unit).abs() > max_cos
        overlap = (fire.T @ fire) / torch.minimum(count[:, None], count[None, :]).clamp_min(1)
        size = U.norm(dim=1) * V.norm(dim=0)
        pairs: list[tuple[int, int]] = []
        for a in size.argsort(descending=True).tolist():
            if not alive[a]:
                continue
            for b in (parallel[a] & alive & (overlap[a] >= min_overlap)).nonzero().flatten().tolist():
                if b == a or size[b] > size[a]:
                    continue
                U[a] += (V[:, a] @ V[:, b]) / (V[:, a] @ V[:, a]) * U[b]
                U[b] = 0.0
                noise = torch.randn(V.shape[0], generator=generator).to(V)
                V[:, b] = noise / noise.norm() * V[:, b].norm()
                model.ci_fn.silence(name, b)
                alive[b] = False
                pairs.append((a, b))
        merged[name] = pairs
    return merged
