"""Equivalent training compute: how much compute a model of the target's family needs to reach a loss.

A `ComputeCurve` holds measured (compute, loss) points of one target family: checkpoints of the target's own
training run, and the final losses of a ladder of runs (shorter schedules, other widths) where the recipe
allows it. Its frontier is the best loss reached with at most a given compute (a running minimum over the
points sorted by compute, so it never rises); between frontier points, loss is linear in log compute. The
inversion `compute_for(loss)` returns the least compute whose frontier loss is <= loss; it is exact at every
frontier point and monotone (a higher loss never needs more compute).

Checkpoints of one long run and complete shorter runs differ, either way round (a stopped run has not annealed
its learning rate; a short schedule decays it early): the frontier takes the better of both at every compute,
and `sources` says which kinds of points a curve holds. `same_model()` keeps the target's own size only.

For language models without a ladder, `chinchilla_compute_fraction` uses a published scaling-law fit, with the
constants stated in `CHINCHILLA_LAWS` (conventions: Hoffmann et al. 2022; Besiroglu et al. 2024 refit).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CurvePoint:
    compute: float  # in the curve's unit (FLOP unless stated)
    loss: float
    label: str = ""  # where the point comes from, e.g. "checkpoint step 500" or "ladder d_mlp=25 steps=250"
    model: str = ""  # which model size of the family, e.g. "d_mlp=50" ("" when the curve has one size)


@dataclass
class ComputeCurve:
    """Measured (compute, loss) points of a target family and the target's own (compute, loss)."""

    points: list[CurvePoint]
    target_compute: float
    target_loss: float
    unit: str = "FLOP"
    description: str = ""  # how the points were made (recipe, eval set, widths), shown with every result
    info: dict[str, Any] = field(default_factory=dict)
    target_model: str = ""  # the target's own size among the points' `model`s
    # the target counts as reached once the frontier is within this fraction of its loss: on a curve that has
    # flattened (an overtrained target), where exactly it reaches the last digits of the loss is noise
    target_rtol: float = 1e-3

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a compute curve needs at least one (compute, loss) point")
        for p in self.points:
            if not (p.compute > 0 and math.isfinite(p.compute) and math.isfinite(p.loss)):
                raise ValueError(f"compute curve point {p}: compute must be > 0 and finite, loss finite")
        if not self.target_compute > 0:
            raise ValueError(f"target_compute must be > 0 (got {self.target_compute})")

    def same_model(self) -> ComputeCurve:
        """The curve of the target's own size only: "the same model trained with less compute". With several
        sizes, the family frontier can jump between sizes of different capacity, and linear interpolation
        across such a jump says little; this curve has no jumps."""
        pts = [p for p in self.points if p.model == self.target_model]
        return ComputeCurve(pts, self.target_compute, self.target_loss, self.unit, self.description, self.info,
                            self.target_model, self.target_rtol)  # fmt: skip

    @property
    def models(self) -> list[str]:
        return sorted({p.model for p in self.points})

    @property
    def sources(self) -> list[str]:
        return sorted({p.label.split(" ")[0] for p in self.points if p.label})

    def frontier(self) -> tuple[np.ndarray, np.ndarray]:
        """(log compute, loss) of the points that improve on every point of lower compute: strictly falling."""
        pts = sorted(self.points, key=lambda p: (p.compute, p.loss))
        logc, loss = [], []
        for p in pts:
            if not loss or p.loss < loss[-1]:
                if logc and math.log(p.compute) == logc[-1]:
                    loss[-1] = p.loss
                else:
                    logc.append(math.log(p.compute))
                    loss.append(p.loss)
        return np.asarray(logc), np.asarray(loss)

    def compute_for(self, loss: float) -> float:
        """Least compute that reaches `loss` on the frontier. A loss above the frontier's first point returns
        that point's compute (an upper bound: the curve does not go lower); below its best loss, `inf`."""
        logc, ls = self.frontier()
        if loss < ls[-1]:
            return math.inf
        if loss >= ls[0]:
            return float(math.exp(logc[0]))
        i = int(np.searchsorted(-ls, -loss, side="left"))  # first frontier point with loss <= `loss`
        if ls[i] == loss:
            return float(math.exp(logc[i]))
        t = (ls[i - 1] - loss) / (ls[i - 1] - ls[i])
        return float(math.exp(logc[i - 1] + t * (logc[i] - logc[i - 1])))

    def loss_at(self, compute: float) -> float:
        """The frontier's loss at `compute` (the inverse of `compute_for` inside the curve's range)."""
        logc, ls = self.frontier()
        x = math.log(compute)
        if x <= logc[0]:
            return float(ls[0])
        if x >= logc[-1]:
            return float(ls[-1])
        return float(np.interp(x, logc, ls))

    @property
    def target_frontier_compute(self) -> float:
        """The compute the frontier needs to come within `target_rtol` of the target's own loss (<= target_compute
        when the target's run is one of the points: a ladder can reach the same loss more cheaply). A target
        better than every point counts as reached by the best point."""
        _, ls = self.frontier()
        return self.compute_for(max(self.target_loss * (1 + self.target_rtol), float(ls[-1])))

    def fraction(self, loss: float) -> float:
        """Equivalent compute of `loss` as a fraction of the target's: compute_for(loss) / compute_for(target's
        loss), both on the frontier, so the target itself is at 1."""
        return self.compute_for(loss) / self.target_frontier_compute

    def bound(self, loss: float) -> str:
        """'' inside the curve; 'at most' above its highest loss; 'beyond' below its best loss."""
        _, ls = self.frontier()
        return "beyond" if loss < ls[-1] else "at most" if loss > ls[0] else ""

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "description": self.description,
            "target": {"compute": self.target_compute, "loss": self.target_loss},
            "points": [asdict(p) for p in self.points],
            "info": self.info,
            "target_model": self.target_model,
            "target_rtol": self.target_rtol,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def curve_from_json(data: Any, source: str = "compute curve") -> ComputeCurve:
    """Build a curve from its JSON form; errors name the file (`source`) and the field."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object with 'target' and 'points'")
    target = data.get("target")
    if not isinstance(target, dict) or "compute" not in target or "loss" not in target:
        raise ValueError(f"{source}: field 'target' must be {{'compute': C, 'loss': L}} (the target's own run)")
    pts = data.get("points")
    if not isinstance(pts, list) or not pts:
        raise ValueError(f"{source}: field 'points' must be a non-empty list of {{'compute': C, 'loss': L}}")
    points = []
    for i, p in enumerate(pts):
        if not isinstance(p, dict) or "compute" not in p or "loss" not in p:
            raise ValueError(f"{source}: points[{i}] must be {{'compute': C, 'loss': L[, 'label': S]}} (got {p!r})")
        points.append(
            CurvePoint(float(p["compute"]), float(p["loss"]), str(p.get("label", "")), str(p.get("model", "")))
        )
    try:
        return ComputeCurve(
            points,
            float(target["compute"]),
            float(target["loss"]),
            str(data.get("unit", "FLOP")),
            str(data.get("description", "")),
            dict(data.get("info", {})),
            str(data.get("target_model", "")),
            float(data.get("target_rtol", 1e-3)),
        )
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def load_curve(path: str | Path) -> ComputeCurve:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compute curve file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"compute curve file {str(path)!r} is not valid JSON: {err}") from None
    return curve_from_json(data, f"compute curve file {str(path)!r}")


def curve_from_log(
    steps: list[int], losses: list[float], compute_per_step: float, target_loss: float | None = None
) -> ComputeCurve:
    """A curve from a logged training run: loss at each step, compute = step x compute per step (the target is
    the last step). Points of one run only: see the module note on why a ladder is more honest."""
    if len(steps) != len(losses) or not steps:
        raise ValueError("steps and losses must be non-empty and of equal length")
    pairs = zip(steps, losses, strict=True)
    points = [CurvePoint(s * compute_per_step, v, f"checkpoint step {s}") for s, v in pairs if s > 0]
    last = max(steps)
    final = losses[steps.index(last)] if target_loss is None else target_loss
    return ComputeCurve(points, last * compute_per_step, final)


# ---- language models: published scaling laws ---------------------------------------------------------
@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (nats per token; N parameters, D training tokens; C = 6 N D)."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n_params: float, n_tokens: float) -> float:
        return self.E + self.A / n_params**self.alpha + self.B / n_tokens**self.beta

    def optimal_split(self, compute: float) -> tuple[float, float]:
        """(N*, D*) minimising L at compute C = 6 N D."""
        a, b = self.alpha, self.beta
        G = (a * self.A / (b * self.B)) ** (1 / (a + b))
        n = G * (compute / 6) ** (b / (a + b))
        return n, compute / 6 / n

    def optimal_loss(self, compute: float) -> float:
        return self.loss(*self.optimal_split(compute))

    def compute_for(self, loss: float) -> float:
        """Compute on the compute-optimal frontier that reaches `loss` (bisection in log C; inf at or below E)."""
        if loss <= self.E:
            return math.inf
        lo, hi = 1.0, 1e40
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if self.optimal_loss(mid) > loss else (lo, mid)
        return math.sqrt(lo * hi)


CHINCHILLA_LAWS = {
    # Besiroglu et al. 2024 (arXiv:2404.10102), the refit of Hoffmann et al.'s data: the default
    "besiroglu2024": ChinchillaLaw("Besiroglu et al. 2024 refit", 1.8172, 482.01, 2085.43, 0.3478, 0.3658),
    # Hoffmann et al. 2022 (Chinchilla), paper body values
    "hoffmann2022": ChinchillaLaw("Hoffmann et al. 2022", 1.69, 406.4, 410.7, 0.34, 0.28),
}


def chinchilla_compute_fraction(
    n_params: float, n_tokens: float, delta_loss: float, law: str = "besiroglu2024"
) -> dict[str, Any]:
    """Equivalent compute of a loss increase `delta_loss` (nats/token) for an LM with N parameters trained on D
    tokens, from a published law: the law's loss at (N, D) plus the gap, mapped onto the compute-optimal
    frontier, relative to the frontier compute that reaches the law's loss at (N, D). An approximation: the
    constants were fitted to large web-text models (MassiveText), not to this model's tokeniser or data."""
    fit = CHINCHILLA_LAWS[law]
    anchor = fit.loss(n_params, n_tokens)
    c_anchor = fit.compute_for(anchor)
    c_degraded = fit.compute_for(anchor + delta_loss)
    return {
        "law": fit.name,
        "constants": {"E": fit.E, "A": fit.A, "B": fit.B, "alpha": fit.alpha, "beta": fit.beta},
        "n_params": n_params,
        "n_tokens": n_tokens,
        "law_loss_at_target": anchor,
        "compute_fraction": c_degraded / c_anchor,
    }
