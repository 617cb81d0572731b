"""Choosing what to ablate by its effect: how the task loss on the forget and on the retain inputs changes when one
unit alone is removed.

Importance (`spd.ablate.Rule`) says where a unit matters, not which way it pushes. In SmolLM2's last MLP the
subcomponents most selectively important where digits are predicted *lower* the digit loss when removed: they
matter there, against the digit. The effect rule reads the sign. For each candidate unit, with f0 and r0 the
losses of the unedited target on the forget and retain selection inputs, and df, dr their relative changes with
that unit alone removed (the change itself where the base loss is 0, as for a divergence from the original), it
selects the units with

    df >= forget_min   and   df >= min_ratio * max(dr, 0)

(removing it alone makes the forget inputs worse, and relatively at least `min_ratio` times more so than the
retain inputs). Candidates: for subcomponents and mechanisms, those whose importance exceeds `threshold` on at
least `candidate_min` of the forget inputs (the decomposition's own claim about where each piece acts; every other
piece is left out only to save passes); for neurons and heads (the unit baseline) every unit.

One pass per candidate over each selection set: the loss is measured with a hook that removes the unit from its
module's output (a subcomponent: `x @ V[:, c] ⊗ U[c]` subtracted, exactly what the weight edit removes; a neuron
or head: zeroed, as `spd.units.zero_units` does), so no copy of the target is made per unit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from spd.ablate import Scores, Selection, data_selection, firing, importances, unit_importance, unit_member
from spd.components import module_kind
from spd.mechanisms import Grouping, Mechanism, Member
from spd.names import target_modules
from spd.units import Unit, zeroing_hook

Remover = Callable[[nn.Module], list[RemovableHandle]]  # installs hooks that remove one unit from a target
Score = Callable[[nn.Module, Any], float]  # a target's loss on a set of inputs


@dataclass(frozen=True)
class EffectRule:
    """Removing the unit alone raises the forget loss by at least `forget_min` (relative) and, relatively, at least
    `min_ratio` times as much as the retain loss. `threshold` and `candidate_min` choose the candidate
    subcomponents/mechanisms (importance > threshold on >= candidate_min of the forget inputs)."""

    forget_min: float = 0.001
    min_ratio: float = 10.0
    threshold: float = 0.1
    candidate_min: float = 0.01

    def __post_init__(self) -> None:
        if self.forget_min < 0.0:
            raise ValueError(f"effect rule: forget_min must be >= 0 (got {self.forget_min})")
        if self.min_ratio < 1.0:
            raise ValueError(f"effect rule: min_ratio must be >= 1 (got {self.min_ratio})")
        for name in ("threshold", "candidate_min"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"effect rule: {name} must lie in [0, 1] (got {v})")

    def describe(self) -> str:
        return (f"removing the unit alone raises the forget loss by >= {self.forget_min:.2%} and, relatively, "
                f">= {self.min_ratio:g}x as much as the retain loss (candidates: importance > {self.threshold:g} on "
                f">= {self.candidate_min:.0%} of forget inputs; neurons/heads: all)")  # fmt: skip

    def as_dict(self) -> dict[str, float]:
        return {"forget_min": self.forget_min, "min_ratio": self.min_ratio, "threshold": self.threshold,
                "candidate_min": self.candidate_min}  # fmt: skip


@dataclass
class EffectScores(Scores):
    """Per unit: the relative change of the forget and of the retain selection loss when it alone is removed
    (`ranked` as for importance: by forget - retain, then by forget, best first)."""

    def passing(self, rule: EffectRule) -> list[int]:  # type: ignore[override]
        ok = (self.forget >= rule.forget_min) & (self.forget >= rule.min_ratio * self.retain.clamp_min(0.0))
        return [i for i in self.ranked() if ok[i]]

    def row(self, i: int) -> dict[str, Any]:
        return {"unit": self.units[i], "forget_effect": round(self.forget[i].item(), 6),
                "retain_effect": round(self.retain[i].item(), 6)}  # fmt: skip


# ---- removing one unit -----------------------------------------------------------------------------------
def piece_remover(model: Any, members: list[Member]) -> Remover:
    """Hooks that subtract the summed subcomponents `members` from their modules' outputs (the masked pass with
    those members at 0; with a delta component, the weight edit's function)."""
    weights = {m: w.detach() for m, w in Mechanism("unit", tuple(members)).weights(model).items()}

    def install(target: nn.Module) -> list[RemovableHandle]:
        named = target_modules(target)
        return [named[m].register_forward_hook(_subtract(w, module_kind(named[m]))) for m, w in weights.items()]

    return install


def _subtract(w: Float[Tensor, "d_in d_out"], kind: str | None) -> Callable[..., Tensor]:
    def hook(_mod: nn.Module, inp: tuple[Any, ...], out: Tensor) -> Tensor:
        x = inp[0]
        return out - (w[x] if kind == "embedding" else x.to(w.dtype) @ w).to(out.dtype)

    return hook


def unit_remover(u: Unit) -> Remover:
    """A hook that zeroes neuron/head `u` in its module (the function of `spd.units.zero_units`)."""

    def install(target: nn.Module) -> list[RemovableHandle]:
        return [zeroing_hook(target_modules(target)[u.module], u)]

    return install


@torch.no_grad()
def lone_effects(
    target: nn.Module, removers: list[Remover], score: Score, x: Any, desc: str = "effects"
) -> Float[Tensor, " U"]:
    """Per remover: the relative change of `score(target, x)` with that one unit removed (the change itself where
    the base score is 0). A progress bar on a terminal (one pass per unit can take minutes for a language model)."""
    base = score(target, x)
    out = []
    for remove in tqdm(removers, desc=desc, leave=False, disable=None):
        hooks = remove(target)
        try:
            out.append(score(target, x) - base)
        finally:
            for h in hooks:
                h.remove()
    d = torch.tensor(out, dtype=torch.float64)
    return (d / base if base > 0 else d).float()


def effect_scores(
    target: nn.Module, units: list[str], removers: list[Remover], score: Score, forget: Any, retain: Any
) -> EffectScores:
    return EffectScores(units, lone_effects(target, removers, score, forget, "effects on forget"),
                        lone_effects(target, removers, score, retain, "effects on retain"))  # fmt: skip


def select_by_effect(
    model: Any, forget: Any, retain: Any, rule: EffectRule, score: Score, grouping: Grouping | None = None,
    batch_size: int = 4096,
) -> tuple[Selection, EffectScores]:  # fmt: skip
    """The units (subcomponents, or `grouping`'s mechanisms) the effect rule selects on these forget and retain
    inputs; `score(target, x)` is the loss the rule reads (the task loss, or the divergence from the original)."""
    imp, names = unit_importance(importances(model, forget, batch_size), grouping)
    fire = firing(imp, rule.threshold)
    cand = [names[i] for i in range(len(names)) if fire[i] >= rule.candidate_min]
    members = [[unit_member(u)] if grouping is None else list(grouping[u].members) for u in cand]
    scores = effect_scores(model.target, cand, [piece_remover(model, m) for m in members], score, forget, retain)
    return data_selection(scores, scores.passing(rule), rule, grouping, by="effect", candidates=len(cand)), scores
