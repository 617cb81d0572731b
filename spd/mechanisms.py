"""Mechanisms: groups of subcomponents (across ranks and layers) as objects, found from a decomposition.

- `Mechanism`: its member subcomponents, its summed weight per matrix, its causal importance on an input (the
  max over members: it is important when any member is), and masks that switch it off.
- `Grouping`: a partition of a run's alive subcomponents into mechanisms, with the method and every parameter
  that made it (alpha always stated); JSON round trip.
- `group_model`: the data pass (binarised CIs), the MDL grouping, the hierarchical alternative, and the adjusted
  Rand index of both against the target's ground-truth mechanisms when it has them.
- `compare_groupings`: stability across decompositions of the same target, mechanisms matched by what switching
  each off does to the output on the same inputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from spd import io
from spd.cluster import adjusted_rand_index, hierarchical_groups, mdl_groups
from spd.ground_truth import GroundTruth, firing_density, mechanism_labels
from spd.task import to_device

Member = tuple[str, int]  # (decomposed module, subcomponent index)
GROUP_SEED_OFFSET = 2_000_003  # the grouping's data differ from training and evaluation data


@dataclass(frozen=True)
class Mechanism:
    name: str
    members: tuple[Member, ...]
    firing: float = math.nan  # fraction of the grouping's samples on which it was important

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(m for m, _ in self.members))

    def indices(self, module: str) -> list[int]:
        return [c for m, c in self.members if m == module]

    def rank(self, model: Any) -> int:
        """Sum of its members' ranks (1 per SPD subcomponent, r per APD component)."""
        return sum(model.comp(m).rank * len(self.indices(m)) for m in self.modules)

    def weights(self, model: Any) -> dict[str, Float[Tensor, "d_in d_out"]]:
        """Its summed weight in every matrix it touches (x @ W orientation, as Components.weight_of)."""
        out = {}
        for m in self.modules:
            comp = model.comp(m)
            out[m] = comp.weight_of(torch.tensor(self.indices(m), device=comp.V.device))
        return out

    def importance(self, ci: dict[str, Float[Tensor, "... C"]]) -> Float[Tensor, "..."]:
        """Causal importance on each input: the max over members (important when any member is)."""
        return torch.stack([ci[m][..., self.indices(m)].amax(-1) for m in self.modules]).amax(0)


@dataclass
class Grouping:
    """Mechanisms over a run's alive subcomponents. `params` holds everything that made it (method, alpha or
    cut, CI threshold, samples, restarts, seed); `stats` what was measured (MDL, restarts' minima, ...)."""

    mechanisms: list[Mechanism]
    params: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Mechanism:
        for m in self.mechanisms:
            if m.name == name:
                return m
        raise KeyError(f"no mechanism {name!r} (there are {len(self.mechanisms)}: m0 ... )")

    @property
    def members(self) -> list[Member]:
        return [x for m in self.mechanisms for x in m.members]

    def labels(self) -> list[str]:
        """The mechanism of each member, in `members` order."""
        return [m.name for m in self.mechanisms for _ in m.members]

    def masks(
        self, model: Any, off: list[str], delta: bool = True
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """Masks for `model(x, masks, delta_masks)` that switch the mechanisms `off` off and keep everything
        else (every other subcomponent at 1, and the delta component, if the model has one, when `delta`)."""
        return member_masks(model, [x for name in off for x in self[name].members], delta)

    def summary(self) -> str:
        sizes = sorted((len(m.members) for m in self.mechanisms), reverse=True)
        multi = [m for m in self.mechanisms if len(m.members) > 1]
        p = self.params
        head = f"{p['method']}"
        head += f" (alpha {p['alpha']:g})" if "alpha" in p else f" (cut {p.get('max_distance')})"
        lines = [f"{head}: {len(self.members)} alive subcomponents -> {len(self.mechanisms)} mechanisms; "
                 f"sizes {_histogram(sizes)}"]  # fmt: skip
        for m in multi[:8]:
            mods = ", ".join(f"{mod}[{len(m.indices(mod))}]" for mod in m.modules)
            lines.append(f"  {m.name}: {len(m.members)} subcomponents ({mods}), fires on {m.firing:.2%}")
        if len(multi) > 8:
            lines.append(f"  ... {len(multi) - 8} more with several members")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "stats": self.stats,
            "mechanisms": [{**asdict(m), "members": [list(x) for x in m.members]} for m in self.mechanisms],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Grouping:
        mechs = [
            Mechanism(m["name"], tuple((str(a), int(b)) for a, b in m["members"]), float(m.get("firing", math.nan)))
            for m in d["mechanisms"]
        ]
        return cls(mechs, d["params"], d.get("stats", {}))


def member_masks(
    model: Any, off: list[Member], delta: bool = True
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Masks for `model(x, masks, delta_masks)`: the subcomponents `off` at 0, every other at 1, and the delta
    component (if the model has one, and `delta`) at 1. With the delta kept, this pass computes exactly the
    target with W' = W - sum(off) in every matrix (what `spd.ablate.edited_target` writes into the weights)."""
    masks = {n: torch.ones(model.comp(n).C, device=model.comp(n).V.device) for n in model.module_names}
    for mod, c in off:
        if mod not in masks or not 0 <= c < masks[mod].shape[0]:
            raise ValueError(f"no subcomponent {mod}:{c} in this model (modules and C: {dict(model.Cs)})")
        masks[mod][c] = 0.0
    deltas = None
    if delta and model.delta_component:
        deltas = {n: torch.ones((), device=v.device) for n, v in masks.items()}
    return masks, deltas


def _histogram(sizes: list[int]) -> str:
    vals, counts = np.unique(sizes, return_counts=True)
    return ", ".join(f"{c}x{v}" for v, c in sorted(zip(vals.tolist(), counts.tolist(), strict=True), reverse=True))


def from_labels(
    members: list[Member], labels: Tensor, active: Bool[Tensor, "n c"], params: dict[str, Any],
    stats: dict[str, Any] | None = None,
) -> Grouping:  # fmt: skip
    """A Grouping from one label per member column; mechanisms named m0, m1, ... by rank then firing."""
    groups: dict[int, list[int]] = {}
    for col, g in enumerate(labels.tolist()):
        groups.setdefault(g, []).append(col)
    fire = {g: active[:, cols].any(1).double().mean().item() for g, cols in groups.items()}
    order = sorted(groups, key=lambda g: (-len(groups[g]), -fire[g], groups[g][0]))
    mechs = [Mechanism(f"m{i}", tuple(members[c] for c in groups[g]), fire[g]) for i, g in enumerate(order)]
    return Grouping(mechs, params, stats or {})


# ---- the data pass -------------------------------------------------------------------------------------
@torch.no_grad()
def importance_batches(
    model: Any, sample_batch: Callable[[int, torch.Generator], Any], n_samples: int, batch_size: int, seed: int
) -> list[dict[str, Tensor]]:
    """Lower CIs (importances, for APD) on fresh data, per batch, on the CPU."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed + GROUP_SEED_OFFSET)
    out = []
    done = 0
    while done < n_samples:
        b = min(batch_size, n_samples - done)
        x = to_device(sample_batch(b, gen), device)
        out.append({n: v.cpu() for n, v in model.causal_importances(x).lower.items()})
        done += b
    return out


def binarise(
    ci_batches: list[dict[str, Tensor]], threshold: float, min_density: float = 0.0
) -> tuple[Bool[Tensor, "n c"], list[Member]]:
    """CI > threshold on every sample (positions of sequences count as samples), over all modules side by side;
    only alive columns (firing on more than `min_density` of samples, and at least once) are kept."""
    dens = firing_density(ci_batches, threshold)
    names = list(ci_batches[0])
    cols = [(n, c) for n in names for c in range(dens[n].shape[0]) if dens[n][c] > min_density and dens[n][c] > 0]
    keep = {n: torch.tensor([c for m, c in cols if m == n], dtype=torch.long) for n in names}
    rows = [torch.cat([b[n].flatten(0, -2)[:, keep[n]] > threshold for n in names], dim=-1) for b in ci_batches]
    return torch.cat(rows), cols


def truth_labels(members: list[Member], labels: dict[str, list[str | None]]) -> tuple[dict[Member, str], int]:
    """Each member's true mechanism; members the ground truth does not explain become singletons. Returns the
    labels and how many were unexplained."""
    out, unexplained = {}, 0
    for m, c in members:
        lab = labels[m][c] if m in labels and c < len(labels[m]) else None
        if lab is None:
            unexplained += 1
            lab = f"unexplained {m}:{c}"
        out[(m, c)] = lab
    return out, unexplained


def score_against_truth(grouping: Grouping, truth: dict[Member, str]) -> dict[str, Any]:
    """ARI of the grouping's partition of its members against their true mechanism labels, plus how many true
    mechanisms were found exactly (same member set)."""
    members = grouping.members
    if set(members) != set(truth):
        raise ValueError("the grouping and the truth labels cover different subcomponents")
    found = grouping.labels()
    true = [truth[x] for x in members]
    true_sets: dict[str, frozenset[Member]] = {}
    for x, t in zip(members, true, strict=True):
        true_sets[t] = true_sets.get(t, frozenset()) | {x}
    found_sets = {frozenset(m.members) for m in grouping.mechanisms}
    multi = [s for s in true_sets.values() if len(s) > 1]
    return {
        "ari": adjusted_rand_index(found, true),
        "true_mechanisms": len(true_sets),
        "found_mechanisms": len(grouping.mechanisms),
        "exact": sum(s in found_sets for s in true_sets.values()),
        "multi_member_true": len(multi),
        "multi_member_exact": sum(s in found_sets for s in multi),
    }


def group_model(
    model: Any,
    sample_batch: Callable[[int, torch.Generator], Any],
    alpha: float = 2.0,
    threshold: float = 0.1,
    min_density: float = 0.0,
    n_samples: int = 16384,
    batch_size: int = 4096,
    restarts: int = 4,
    tolerance: float = 0.05,
    max_distance: float = 0.5,
    seed: int = 0,
    ground_truth: GroundTruth | None = None,
) -> dict[str, Any]:
    """Group a decomposition's alive subcomponents by MDL and by hierarchical clustering (the alternative the MDL
    choice is compared with). Returns {"mdl": Grouping, "hierarchical": Grouping, "truth": scores or None}."""
    ci = importance_batches(model, sample_batch, n_samples, batch_size, seed)
    active, members = binarise(ci, threshold, min_density)
    if not members:
        raise ValueError(f"no alive subcomponents (CI > {threshold} on > {min_density:g} of {n_samples} samples)")
    ranks = torch.tensor([float(model.comp(m).rank) for m, _ in members])
    common = {"threshold": threshold, "min_density": min_density, "n_samples": int(active.shape[0]), "seed": seed}
    hist, minima = mdl_groups(active, alpha, ranks, restarts, tolerance, seed)
    mdl = from_labels(
        members, hist.labels(), active,
        {"method": "mdl", "alpha": alpha, "restarts": restarts, "tolerance": tolerance, **common},
        {"mdl_bits": hist.mdl[hist.best_step], "mdl_singletons_bits": hist.mdl[0], "merges": hist.best_step,
         "restart_minima_bits": minima, "mdl_curve_bits": [round(v, 6) for v in hist.mdl]},
    )  # fmt: skip
    hier = from_labels(
        members, hierarchical_groups(active, max_distance), active,
        {"method": "hierarchical", "linkage": "average", "distance": "jaccard", "max_distance": max_distance,
         **common},
    )  # fmt: skip
    out: dict[str, Any] = {"mdl": mdl, "hierarchical": hier, "truth": None}
    if ground_truth is not None and ground_truth.ci_patterns:
        truth, unexplained = truth_labels(members, mechanism_labels(model, ground_truth))
        out["truth"] = {
            "unexplained_alive": unexplained,
            "mdl": score_against_truth(mdl, truth),
            "hierarchical": score_against_truth(hier, truth),
        }
    return out


# ---- files -------------------------------------------------------------------------------------------
def grouping_path(run_dir: Path, alpha: float) -> Path:
    return run_dir / f"grouping-alpha{alpha:g}.json"


def save_result(path: Path, result: dict[str, Any], force: bool = False) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; nothing was overwritten (pass --force to replace it)")
    io.write_json(path, {k: (v.to_dict() if isinstance(v, Grouping) else v) for k, v in result.items()})


def load_grouping(path: str | Path, which: str = "mdl") -> Grouping:
    """A saved grouping (`which`: "mdl" or "hierarchical") from a grouping-alpha*.json file."""
    d = json.loads(Path(path).read_text())
    if which not in d or not isinstance(d[which], dict):
        raise ValueError(f"{path} holds no {which!r} grouping (it has: {[k for k in d if k != 'truth']})")
    return Grouping.from_dict(d[which])


# ---- stability across decompositions of one target -----------------------------------------------------
@torch.no_grad()
def mechanism_effects(grouping: Grouping, model: Any, x: Any) -> Float[Tensor, "M D"]:
    """What every mechanism does to the output on inputs x: the target's output minus the output with the
    mechanism switched off (its subcomponents at 0, the delta component kept: the target with W' = W - its summed
    weight), flattened. Only what the output sees counts. Two decompositions of one target may differ freely in
    directions no input reaches (on the input side) and in directions nothing downstream reads (the delta
    component carries the rest): ResidMLP 1's W_out writes into 1000 residual dimensions of which the
    unembedding reads 100, and three decompositions of one target agreed there only at cosine 0.14-0.19 on the
    weights' action but 0.9999 on the output."""
    from spd.model import output_tensor

    full = output_tensor(model(x, *member_masks(model, [])))
    rows = [
        (full - output_tensor(model(x, *grouping.masks(model, [m.name])))).flatten().cpu() for m in grouping.mechanisms
    ]
    return torch.stack(rows)


def compare_groupings(
    ga: Grouping, model_a: Any, gb: Grouping, model_b: Any, x: Any, match: float = 0.9
) -> dict[str, Any]:
    """Mechanisms of two decompositions of the same target, matched one-to-one (Hungarian) on the cosine
    similarity of what they do to the output on the same inputs x (`mechanism_effects`). Reports how many
    match (cos >= `match`) and whether matched ones have the same rank."""
    va, vb = mechanism_effects(ga, model_a, x), mechanism_effects(gb, model_b, x)
    cos = torch.nn.functional.normalize(va, dim=1) @ torch.nn.functional.normalize(vb, dim=1).T
    ri, ci = linear_sum_assignment(-cos.numpy())
    matched = cos[ri, ci]
    good = matched >= match
    ranks_a = [ga.mechanisms[i].rank(model_a) for i in ri]
    ranks_b = [gb.mechanisms[j].rank(model_b) for j in ci]
    same_rank = sum(a == b for a, b, g in zip(ranks_a, ranks_b, good.tolist(), strict=True) if g)
    return {
        "mechanisms_a": len(ga.mechanisms),
        "mechanisms_b": len(gb.mechanisms),
        f"matched_cos>={match}": int(good.sum()),
        "matched_same_rank": int(same_rank),
        "mean_matched_cos": matched.mean().item(),
        "mmcs_a_to_b": cos.max(1).values.mean().item(),
        "mmcs_b_to_a": cos.max(0).values.mean().item(),
        "largest_rank_a": max(m.rank(model_a) for m in ga.mechanisms),
        "largest_rank_b": max(m.rank(model_b) for m in gb.mechanisms),
    }
