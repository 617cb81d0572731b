"""Loss -> compute curves of the toy families, for the honest-scale section of `spd eval` and `spd degrade`.

Each curve holds (i) checkpoints of the target's own training run (the same recipe and seed, rerun with a
held-out evaluation at log-spaced steps; its last point is the target) and (ii) a ladder: the same recipe with
shorter schedules (each a complete run, its schedule fitted to its budget) and other widths (TMS n_hidden,
ResidMLP d_mlp: `WIDTHS` x the target's). Every loss is the toy's own loss on one fixed held-out set; compute is
FLOPs of a training step (counted by torch's FlopCounterMode, forward + backward) times steps.

Curves are cached as JSON (keyed by recipe, ladder and seed) in $SPD_TARGET_CACHE, else ~/.cache/spd/curves.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from spd.scale import ComputeCurve, CurvePoint, curve_from_json
from toy_models.data import sparse_features

N_CHECKPOINTS = 16
BUDGETS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)  # ladder schedules, fractions of the recipe's steps (+ the full one)
WIDTHS = (0.5, 0.75, 1.5)  # ladder widths beside the target's own (below d_mlp = n_features: still superposed)


def checkpoint_steps(steps: int, n: int = N_CHECKPOINTS) -> list[int]:
    """Log-spaced steps from 1 to `steps` (always including both)."""
    return sorted({max(1, round(steps ** (i / (n - 1)))) for i in range(n)} | {steps})


def count_flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


CURVE_VERSION = 2  # bump when the curve files change form, so stale caches are not read


def cache_path(kind: str, key: dict[str, Any]) -> Path:
    key = key | {"version": CURVE_VERSION}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    env = os.environ.get("SPD_TARGET_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "spd" / "curves"
    return root / f"curve-{kind}-{digest}.json"


def cached_curve(kind: str, key: dict[str, Any], build: Callable[[], ComputeCurve]) -> ComputeCurve:
    path = cache_path(kind, key)
    if path.is_file():
        return curve_from_json(json.loads(path.read_text()), f"cached compute curve {str(path)!r}")
    curve = build()
    curve.info["cache_key"] = key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # parallel writers (pytest-xdist workers) never share it
    curve.save(tmp)
    os.replace(tmp, path)
    return curve


def anchor(curve: ComputeCurve, target_loss: float) -> None:
    """Make the curve's target the model actually decomposed (a loaded or degraded target may differ from the
    recipe's own run, whose loss stays in info)."""
    curve.info["recipe_target_loss"] = curve.target_loss
    curve.target_loss = target_loss


def _widths(width: int) -> list[int]:
    return sorted({max(1, round(width * w)) for w in (1.0, *WIDTHS)})


def _ladder(steps: int) -> list[int]:
    return sorted({max(1, round(steps * f)) for f in BUDGETS} | {steps})


# ---- TMS ---------------------------------------------------------------------------------------------
def tms_curve(seed: int, n_features: int, n_hidden: int, feature_prob: float, steps: int, batch_size: int, lr: float,
              n_eval: int = 65536, eval_seed: int = 424242, ladder: bool = True,
              target: torch.nn.Module | None = None) -> ComputeCurve:  # fmt: skip
    """Checkpoints of the target's own run plus a ladder over schedule length and n_hidden (see module note).
    `target`: the model actually decomposed (e.g. loaded from a file): the curve's target loss is its loss."""
    from toy_models.tms import train_tms

    key = {"toy": "tms", "seed": seed, "n_features": n_features, "n_hidden": n_hidden, "feature_prob": feature_prob,
           "steps": steps, "batch_size": batch_size, "lr": lr, "n_eval": n_eval, "eval_seed": eval_seed,
           "ladder": [BUDGETS, WIDTHS] if ladder else None}  # fmt: skip
    x_eval = sparse_features(n_eval, n_features, feature_prob, torch.Generator().manual_seed(eval_seed))

    def loss(W: Tensor, b: Tensor) -> float:
        return (F.relu(x_eval @ W.T @ W + b) - x_eval).pow(2).mean().item()

    def step_flops(h: int) -> int:
        W = torch.randn(h, n_features, requires_grad=True)
        b = torch.zeros(n_features, requires_grad=True)
        x = torch.rand(batch_size, n_features)
        return count_flops(lambda: (F.relu(x @ W.T @ W + b) - x).pow(2).mean().backward())

    def build() -> ComputeCurve:
        points: list[CurvePoint] = []
        per_step = step_flops(n_hidden)
        marks = set(checkpoint_steps(steps))
        final: dict[str, float] = {}

        def on_step(s: int, W: Tensor, b: Tensor) -> None:
            if s in marks:
                points.append(CurvePoint(s * per_step, loss(W, b), f"checkpoint step {s}", f"n_hidden={n_hidden}"))
                final["loss"] = points[-1].loss

        train_tms(n_features, n_hidden, seed, steps, batch_size, lr, feature_prob=feature_prob, on_step=on_step)
        if ladder:
            for h in _widths(n_hidden):
                flops = step_flops(h)
                for s in _ladder(steps):
                    if h == n_hidden and s == steps:
                        continue  # the target's own run, above
                    W, b = train_tms(n_features, h, seed, s, batch_size, lr, feature_prob=feature_prob)
                    points.append(CurvePoint(s * flops, loss(W, b), f"ladder n_hidden={h} steps={s}", f"n_hidden={h}"))
        return ComputeCurve(points, steps * per_step, final["loss"], "FLOP", _describe("TMS", "n_hidden", n_eval,
                            ladder), {"flops_per_step": per_step}, f"n_hidden={n_hidden}")  # fmt: skip

    curve = cached_curve("tms", key, build)
    if target is not None:
        with torch.no_grad():
            anchor(curve, (target(x_eval) - x_eval).pow(2).mean().item())
    return curve


# ---- ResidMLP ----------------------------------------------------------------------------------------
def resid_mlp_curve(seed: int, n_layers: int, d_embed: int, n_features: int | None, d_mlp: int | None,
                    feature_prob: float, steps: int, n_eval: int = 32768, eval_seed: int = 424242,
                    ladder: bool = True, target: torch.nn.Module | None = None) -> ComputeCurve:  # fmt: skip
    from toy_models.resid_mlp import SIZES, init_resid_mlp, labels, train_resid_mlp

    nf, dm = n_features or SIZES[n_layers][0], d_mlp or SIZES[n_layers][1]
    key = {"toy": "resid_mlp", "seed": seed, "n_layers": n_layers, "d_embed": d_embed, "n_features": nf,
           "d_mlp": dm, "feature_prob": feature_prob, "steps": steps, "n_eval": n_eval, "eval_seed": eval_seed,
           "ladder": [BUDGETS, WIDTHS] if ladder else None}  # fmt: skip
    x_eval = sparse_features(n_eval, nf, feature_prob, torch.Generator().manual_seed(eval_seed), lo=-1.0, hi=1.0)
    y_eval = labels(x_eval)

    @torch.no_grad()
    def loss(model: torch.nn.Module) -> float:
        pairs = zip(x_eval.split(4096), y_eval.split(4096), strict=True)
        return sum((model(x) - y).pow(2).sum().item() for x, y in pairs) / y_eval.numel()

    def step_flops(width: int) -> int:
        model = init_resid_mlp(n_layers, seed, d_embed, nf, width)
        x = torch.rand(2048, nf)
        return count_flops(lambda: (model(x) - labels(x)).pow(2).mean().backward())

    def build() -> ComputeCurve:
        points: list[CurvePoint] = []
        per_step = step_flops(dm)
        marks = set(checkpoint_steps(steps))
        model = init_resid_mlp(n_layers, seed, d_embed, nf, dm)
        final: dict[str, float] = {}

        def on_step(s: int) -> None:
            if s in marks:
                points.append(CurvePoint(s * per_step, loss(model), f"checkpoint step {s}", f"d_mlp={dm}"))
                final["loss"] = points[-1].loss

        train_resid_mlp(model, seed, steps, feature_prob=feature_prob, on_step=on_step)
        if ladder:
            for width in _widths(dm):
                flops = step_flops(width)
                for s in _ladder(steps):
                    if width == dm and s == steps:
                        continue
                    m = init_resid_mlp(n_layers, seed, d_embed, nf, width)
                    train_resid_mlp(m, seed, s, feature_prob=feature_prob)
                    points.append(CurvePoint(s * flops, loss(m), f"ladder d_mlp={width} steps={s}", f"d_mlp={width}"))
        return ComputeCurve(points, steps * per_step, final["loss"], "FLOP", _describe("ResidMLP", "d_mlp", n_eval,
                            ladder), {"flops_per_step": per_step}, f"d_mlp={dm}")  # fmt: skip

    curve = cached_curve("resid_mlp", key, build)
    if target is not None:
        anchor(curve, loss(target))
    return curve


def _describe(toy: str, width: str, n_eval: int, ladder: bool) -> str:
    text = f"{toy}: {N_CHECKPOINTS} log-spaced checkpoints of the target's own run"
    if ladder:
        budgets = ", ".join(f"{f:g}" for f in BUDGETS)
        widths = ", ".join(f"x{w:g}" for w in sorted((1.0, *WIDTHS)))
        text += f"; ladder of complete runs with {budgets} x the steps and {width} {widths}"
    return text + f"; loss on {n_eval} held-out inputs; compute = FLOPs per training step (FlopCounterMode) x steps"
