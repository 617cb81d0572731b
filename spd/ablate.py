"""Ablation as a weight edit: switch subcomponents or mechanisms off, W' = W - sum(ablated), and export the edited
target as a plain model of its own class.

What to ablate is chosen
- by id: "module:c" (or "module:c1,c2") strings, `parse_members`;
- by mechanism: the members of named mechanisms of a saved grouping;
- by data, `select_by_data`: units (subcomponents, or mechanisms of a grouping) important on a forget set and
  unimportant on a retain set. A unit is important on an input when its causal importance exceeds `threshold` (a
  mechanism: when any member's does); with f and r the fractions of forget and retain inputs on which it is
  important, the rule (`Rule`) selects the units with f >= forget_min, r <= retain_max and f >= min_ratio * r.
  Every position of a sequence counts as an input.

The edit is exact: with the delta component kept, the masked pass `model(x, *member_masks(model, members))` and the
edited target compute the same function (a test holds them equal).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from spd import io
from spd.components import module_kind
from spd.lm_metrics import scored_positions
from spd.mechanisms import Grouping, Mechanism, Member, member_masks
from spd.names import target_modules
from spd.task import batch_len

EDITED_WEIGHTS = "model.safetensors"
EDITED_INFO = "model.json"


@dataclass(frozen=True)
class Rule:
    """Important (importance > `threshold`) on at least `forget_min` of the forget inputs, on at most `retain_max`
    of the retain inputs, and at least `min_ratio` times as often on forget as on retain inputs.

    Base rates set the scale of "rarely on retain": in TMS 5-2 a feature's output piece also fires on ~2% of
    inputs without it (its neighbours' interference), while ResidMLP 1's shared W_out mechanism fires on 59% of
    retain inputs against 87% of forget inputs. The ratio separates both cases; the cap bounds the damage."""

    threshold: float = 0.1
    forget_min: float = 0.5
    retain_max: float = 0.05
    min_ratio: float = 10.0

    def __post_init__(self) -> None:
        for name in ("threshold", "forget_min", "retain_max"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"selection rule: {name} must lie in [0, 1] (got {v})")
        if self.min_ratio < 1.0:
            raise ValueError(f"selection rule: min_ratio must be >= 1 (got {self.min_ratio})")

    def describe(self) -> str:
        return (f"importance > {self.threshold:g} on >= {self.forget_min:.0%} of forget inputs, on <= "
                f"{self.retain_max:.1%} of retain inputs, and >= {self.min_ratio:g}x as often on forget as on "
                "retain")  # fmt: skip

    def as_dict(self) -> dict[str, float]:
        return {"threshold": self.threshold, "forget_min": self.forget_min, "retain_max": self.retain_max,
                "min_ratio": self.min_ratio}  # fmt: skip


@dataclass
class Scores:
    """Per unit: the fraction of forget and of retain inputs on which it is important."""

    units: list[str]
    forget: Float[Tensor, " U"]
    retain: Float[Tensor, " U"]

    def passing(self, rule: Rule) -> list[int]:
        ok = (self.forget >= rule.forget_min) & (self.retain <= rule.retain_max)
        ok &= self.forget >= rule.min_ratio * self.retain
        return [i for i in self.ranked() if ok[i]]

    def ranked(self) -> list[int]:
        """Units by forget - retain, then by forget, best first."""
        key = list(zip((self.forget - self.retain).tolist(), self.forget.tolist(), strict=True))
        return sorted(range(len(self.units)), key=lambda i: (-key[i][0], -key[i][1], i))

    def row(self, i: int) -> dict[str, Any]:
        return {
            "unit": self.units[i],
            "forget": round(self.forget[i].item(), 4),
            "retain": round(self.retain[i].item(), 4),
        }


@dataclass
class Selection:
    """The subcomponents to ablate and how they were chosen (kind, rule, the chosen units and their scores)."""

    members: list[Member]
    how: dict[str, Any] = field(default_factory=dict)


def firing(importance: Float[Tensor, "n U"], threshold: float) -> Float[Tensor, " U"]:
    """Fraction of inputs on which each unit's importance exceeds `threshold`."""
    return (importance > threshold).double().mean(0).float()


# ---- choosing ------------------------------------------------------------------------------------------
def parse_members(specs: list[str], model: Any) -> list[Member]:
    """ "module:c" or "module:c1,c2,..." -> [(module, c), ...], checked against the model's modules and C."""
    out: list[Member] = []
    for spec in specs:
        mod, sep, idx = spec.rpartition(":")
        if not sep or mod not in model.Cs:
            raise ValueError(f"subcomponent id {spec!r}: expected MODULE:INDEX with MODULE one of {list(model.Cs)}")
        try:
            cs = [int(v) for v in idx.split(",")]
        except ValueError:
            raise ValueError(f"subcomponent id {spec!r}: indices must be integers, e.g. {mod}:3 or {mod}:3,7") from None
        for c in cs:
            if not 0 <= c < model.Cs[mod]:
                raise ValueError(
                    f"subcomponent id {spec!r}: {mod} has C = {model.Cs[mod]} (indices 0..{model.Cs[mod] - 1})"
                )
            out.append((mod, c))
    return list(dict.fromkeys(out))


def mechanism_members(grouping: Grouping, names: list[str]) -> list[Member]:
    return list(dict.fromkeys(x for n in names for x in grouping[n].members))


def chunks(x: Any, batch_size: int) -> list[Any]:
    """Split an input batch (a tensor, or a dict of tensors sharing the batch axis) into pieces."""
    n = batch_len(x)
    return [take(x, slice(i, i + batch_size)) for i in range(0, n, batch_size)]


def take(x: Any, idx: slice) -> Any:
    return {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]


@torch.no_grad()
def importances(model: Any, x: Any, batch_size: int = 4096) -> dict[str, Float[Tensor, "n C"]]:
    """Lower causal importances (APD: importances) of every module on x, positions flattened into inputs. For an
    LM batch with a `loss_mask` (B, L), only the positions that predict a marked token count (position t - 1 for a
    mark on token t): the importances where the scored predictions are made."""
    parts = [_scored(model.causal_importances(xb).lower, xb) for xb in chunks(x, batch_size)]
    return {n: torch.cat([p[n] for p in parts]).cpu() for n in parts[0]}


def _scored(ci: dict[str, Tensor], x: Any) -> dict[str, Tensor]:
    out = {}
    for n, v in ci.items():
        at = scored_positions(v, x)
        out[n] = v.flatten(0, -2) if at is None else at
    return out


def unit_importance(
    ci: dict[str, Float[Tensor, "n C"]], grouping: Grouping | None
) -> tuple[Float[Tensor, "n U"], list[str]]:
    """Every subcomponent's importance (columns "module:c"), or every mechanism's (the max over its members)."""
    if grouping is None:
        names = [f"{m}:{c}" for m, v in ci.items() for c in range(v.shape[-1])]
        return torch.cat(list(ci.values()), dim=-1), names
    return torch.stack([m.importance(ci) for m in grouping.mechanisms], dim=-1), [m.name for m in grouping.mechanisms]


def select_by_data(
    model: Any, forget: Any, retain: Any, rule: Rule, grouping: Grouping | None = None, batch_size: int = 4096
) -> tuple[Selection, Scores]:
    """The units (subcomponents, or `grouping`'s mechanisms) the rule selects on these forget and retain inputs."""
    imp_f, units = unit_importance(importances(model, forget, batch_size), grouping)
    imp_r, _ = unit_importance(importances(model, retain, batch_size), grouping)
    scores = Scores(units, firing(imp_f, rule.threshold), firing(imp_r, rule.threshold))
    return data_selection(scores, scores.passing(rule), rule, grouping), scores


def unit_member(unit: str) -> Member:
    """ "module:c" -> (module, c)."""
    mod, _, c = unit.rpartition(":")
    return mod, int(c)


def data_selection(scores: Scores, chosen: list[int], rule: Any, grouping: Grouping | None, **how: Any) -> Selection:
    """The members of the `chosen` units (subcomponents "module:c", or `grouping`'s mechanisms) and the record of
    how they were chosen (`rule` has `as_dict` and `describe`; `how` adds entries)."""
    names = [scores.units[i] for i in chosen]
    members = [unit_member(u) for u in names] if grouping is None else mechanism_members(grouping, names)
    record = {
        "kind": "data",
        **how,
        "units": "subcomponents" if grouping is None else "mechanisms",
        "rule": rule.as_dict(),
        "rule_text": rule.describe(),
        "chosen": [scores.row(i) for i in chosen],
        "best_unchosen": [scores.row(i) for i in scores.ranked() if i not in chosen][:5],
    }
    if grouping is not None:
        record["grouping"] = grouping.params
    return Selection(members, record)


# ---- editing -------------------------------------------------------------------------------------------
@torch.no_grad()
def edited_target(model: Any, members: list[Member]) -> nn.Module:
    """A copy of the target with W' = W - (sum of the `members`) written into each touched module's own weight;
    everything else (biases, other modules, buffers) unchanged."""
    member_masks(model, members)  # checks every member exists
    target = copy.deepcopy(model.target)
    named = target_modules(target)
    removed = Mechanism("ablated", tuple(members)).weights(model)  # {module: summed pieces (d_in, d_out)}
    seen: dict[int, str] = {}
    for mod in removed:
        ptr = named[mod].weight.data_ptr()
        if ptr in seen:
            raise ValueError(f"{mod!r} and {seen[ptr]!r} share one weight tensor (tied); ablate in one of them only")
        seen[ptr] = mod
    for mod, delta in removed.items():
        w = named[mod].weight
        w -= (delta.T if module_kind(named[mod]) == "linear" else delta).to(w.dtype)
    return target


@torch.no_grad()
def edit_stats(original: nn.Module, edited: nn.Module) -> dict[str, Any]:
    """Which tensors an edit changed: entries changed, and ||W' - W|| / ||W|| per tensor and overall."""
    a, b = original.state_dict(), edited.state_dict()
    per: dict[str, dict[str, float]] = {}
    changed = total = 0
    num = den = 0.0
    for k, v in a.items():
        if not torch.is_floating_point(v):
            continue
        d = (b[k] - v).float()
        n = int((d != 0).sum())
        total += v.numel()
        den += v.float().pow(2).sum().item()
        if n:
            changed += n
            num += d.pow(2).sum().item()
            per[k] = {
                "changed": n,
                "numel": v.numel(),
                "relative_norm": (d.norm() / v.float().norm().clamp_min(1e-12)).item(),
            }
    return {"parameters_changed": changed, "parameters_total": total, "relative_norm": (num / max(den, 1e-30)) ** 0.5,
            "tensors": per}  # fmt: skip


def save_edited(target: nn.Module, out_dir: Path, architecture: dict[str, Any] | None, note: dict[str, Any]) -> Path:
    """Write the edited target so it loads without spd: `save_pretrained` for transformers models, else its
    state dict in safetensors, with a JSON that says how to rebuild the class (`architecture`, from the task)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"class": f"{type(target).__module__}:{type(target).__qualname__}", **note}
    if callable(getattr(target, "save_pretrained", None)):
        target.save_pretrained(str(out_dir), safe_serialization=True)  # type: ignore[operator]
        info["format"] = "transformers save_pretrained (from_pretrained(dir) loads it)"
    else:
        io.save_tensors(out_dir / EDITED_WEIGHTS, target.state_dict())
        info["format"] = "torch state dict in safetensors"
        if architecture is not None:
            info["architecture"] = architecture
            mod, _, cls = architecture["class"].partition(":")
            kw = ", ".join(f"{k}={v!r}" for k, v in architecture.get("kwargs", {}).items())
            info["load"] = (f"from safetensors.torch import load_file; from {mod} import {cls}; "
                            f"model = {cls}({kw}); model.load_state_dict(load_file('{EDITED_WEIGHTS}'))")  # fmt: skip
    io.write_json(out_dir / EDITED_INFO, info)
    return out_dir
