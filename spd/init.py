"""Data-aligned initialisation of rank-1 subcomponents (`decomposition.init: data`).

The default initialisation reads random directions, so at the start every subcomponent reads a little of every
input feature, and the first steps decide which features end up sharing a subcomponent. The data-aligned start
instead reads directions the module actually sees: V's columns are the normalised inputs of the decomposed module
on random nonzero examples (token positions, for sequence models), and U is the ridge least-squares fit of the
target weight, U = (V^T V + lam I)^-1 V^T W, so the subcomponents sum to W on the span of the data (what lies
outside it goes to the delta component, which then changes no output on the data) and subcomponents reading the
same direction share its write evenly. This is the usual data initialisation of dictionary learning (e.g. sparse
autoencoders initialised from data points), applied to parameter components.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from spd.model import ComponentModel
from spd.task import BatchSampler, to_device

RIDGE = 1e-2  # relative to V^T V's diagonal (1: unit columns)
MAX_BATCHES = 64
INIT_SEED_OFFSET = 7_919  # the init's own data stream, so that it does not shift the training batches


def read_directions(acts: Float[Tensor, "n d_in"], C: int, generator: torch.Generator) -> Float[Tensor, "d_in C"]:
    """C unit-norm columns: C distinct nonzero rows of `acts` drawn at random (with replacement if fewer)."""
    norms = acts.norm(dim=-1)
    rows = acts[norms > 1e-8 * norms.max().clamp_min(1e-30)] if acts.shape[0] else acts
    if rows.shape[0] == 0:
        raise ValueError("every sampled input of the module is zero; the data-aligned init has nothing to read")
    if rows.shape[0] >= C:
        idx = torch.randperm(rows.shape[0], generator=generator)[:C]
    else:
        idx = torch.randint(rows.shape[0], (C,), generator=generator)
    picked = rows[idx.to(rows.device)]
    return (picked / picked.norm(dim=-1, keepdim=True)).T


def ridge_writes(
    V: Float[Tensor, "d_in C"], W: Float[Tensor, "d_in d_out"], ridge: float = RIDGE
) -> Float[Tensor, "C d_out"]:
    """U minimising ||V U - W||^2 + ridge ||U||^2 (computed in float64)."""
    V64, W64 = V.double(), W.double()
    gram = V64.T @ V64 + ridge * torch.eye(V.shape[1], dtype=torch.float64, device=V.device)
    return torch.linalg.solve(gram, V64.T @ W64).to(W.dtype)


@torch.no_grad()
def data_init(model: ComponentModel, sample_batch: BatchSampler, batch_size: int, seed: int) -> None:
    """Initialise every untied module's V and U from module inputs on fresh batches (see the module doc)."""
    names = [n for n in model.module_names if n not in model.tied]
    for n in names:
        comp = model.comp(n)
        if comp.kind == "embedding":
            raise ValueError(
                f"decomposition.init 'data' cannot initialise {n!r}: an embedding's input is token ids, not "
                "vectors; use init 'random' or leave the embedding out of decomposition.modules"
            )
        if comp.rank != 1:
            raise ValueError("decomposition.init 'data' is for rank-1 subcomponents (method spd)")
    generator = torch.Generator().manual_seed(seed + INIT_SEED_OFFSET)
    need = max(model.Cs[n] for n in names)
    device = next(iter(model.decomposition_parameters())).device
    seen: dict[str, list[Tensor]] = {n: [] for n in names}  # nonzero input rows so far
    for _ in range(MAX_BATCHES):
        x = to_device(sample_batch(batch_size, generator), device)
        _, acts = model.forward_with_cache(x)
        for n in names:
            a = acts[n].flatten(0, -2)
            seen[n].append(a[a.norm(dim=-1) > 0])
        if all(sum(t.shape[0] for t in seen[n]) >= 4 * need for n in names):
            break
    for n in names:
        comp = model.comp(n)
        V = read_directions(torch.cat(seen[n]).to(comp.V.dtype), model.Cs[n], generator)
        comp.V.copy_(V)
        comp.U.copy_(ridge_writes(V, comp.target_weight().detach()))
