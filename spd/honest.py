"""The honest-scale section of evaluations and ablation reports.

For each degraded model (masked decomposition, edited target) it states, in the target's own loss:
the raw gap, the gap relative to the target's loss, the equivalent training compute (spd.scale; a toy's ladder
or a user's curve file; for language models without one, a published scaling law, named with its constants),
and the inverse temperature nβ (and LLC) of the natural degradation (spd.natural) at the same loss.

Every loss here is measured on one held-out set; a curve or a sampler measured on its own held-out set receives
the same gap added to its own target loss, so sampling noise in the absolute loss does not move the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from spd.model import target_output
from spd.natural import NaturalConfig, NaturalDegradation, task_loss_fn
from spd.scale import ComputeCurve, chinchilla_compute_fraction
from spd.task import Task, held_out, to_device

NATURAL_MAX_PARAMS = 5_000_000  # above this, `spd eval` leaves the SGLD search out unless asked for


@torch.no_grad()
def mean_loss(forward: Callable[[Any], Tensor], batches: list[Any], metrics: Any, device: torch.device) -> float:
    """The task's mean per-sample loss of `forward` over `batches`."""
    total, count = 0.0, 0
    for x in batches:
        x = to_device(x, device)
        per = metrics(x, forward(x))["loss"]
        total, count = total + per.sum().item(), count + per.numel()
    return total / count


def section(
    task: Task,
    target_loss: float,
    losses: dict[str, float],
    natural: bool | NaturalConfig = True,
    curve: ComputeCurve | None = None,
) -> dict[str, Any]:
    """The honest-scale numbers for the degraded models in `losses` (name -> the task's mean loss, measured on
    the same held-out set as `target_loss`)."""
    out: dict[str, Any] = {"target_loss": target_loss, "rows": {}}
    rows: dict[str, dict[str, Any]] = out["rows"]
    for name, loss in losses.items():
        gap = loss - target_loss
        rows[name] = {"loss": loss, "gap": gap, "gap_rel": gap / target_loss if target_loss > 0 else math.nan}
    if curve is None and task.compute_curve is not None:
        curve = task.compute_curve()
    if curve is not None:
        own = curve.same_model()
        family = len(curve.models) > 1
        out["compute"] = {
            "description": curve.description,
            "sources": curve.sources,
            "unit": curve.unit,
            "target_compute": curve.target_compute,
            "target_frontier_compute": own.target_frontier_compute,
            "curve_target_loss": curve.target_loss,
            "note": "fraction = compute reaching (curve's target loss + gap) / compute reaching the target's loss, "
            + ("on the frontier of the target's own size (the same model trained with less compute); 'family' "
               "uses the frontier over every size, which jumps between sizes of different capacity" if family
               else "on the curve's frontier"),
        }  # fmt: skip
        for row in rows.values():
            shifted = curve.target_loss + row["gap"]
            row["compute_fraction"] = own.fraction(shifted)
            if own.bound(shifted):
                row["compute_bound"] = own.bound(shifted)
            if family:
                row["compute_fraction_family"] = curve.fraction(shifted)
    elif task.causal_lm:
        n_params = sum(p.numel() for p in task.target.parameters())
        tokens = task.info.get("train_tokens")
        assumed = tokens is None
        n_tokens = float(tokens) if tokens is not None else 20.0 * n_params
        for row in rows.values():
            law = chinchilla_compute_fraction(n_params, n_tokens, max(row["gap"], 0.0))
            row["compute_fraction"] = law["compute_fraction"]
        out["compute"] = {k: v for k, v in law.items() if k != "compute_fraction"} | {
            "note": "no ladder for this model: a published scaling law is used as an approximation (constants fitted "
            "to large web-text models); the gap in nats is added to the law's loss at (N, D)"
            + ("; D assumed compute-optimal (20 N): set train_tokens in the task info" if assumed else "")
        }
    else:
        out["compute"] = {"note": "no loss -> compute curve for this target (give target.compute_curve: FILE)"}
    out["natural"] = _natural(task, rows, natural)
    return out


def _natural(task: Task, rows: dict[str, dict[str, Any]], natural: bool | NaturalConfig) -> dict[str, Any]:
    if natural is False:
        return {"note": "not computed (natural degradation turned off)"}
    if task.metrics is None:
        return {"note": "not computed: the task defines no loss of its own (Task.metrics)"}
    n_params = sum(p.numel() for p in task.target.parameters())
    if natural is True and n_params > NATURAL_MAX_PARAMS:
        return {"note": f"not computed by default for {n_params:,} parameters (slow); ask for it explicitly"}
    cfg = natural if isinstance(natural, NaturalConfig) else NaturalConfig()
    try:
        nd = NaturalDegradation(task.target, task_loss_fn(task.metrics), task.eval_sampler, cfg,
                                task.trained_parameters)  # fmt: skip
    except ImportError:
        return {"note": "not computed: install the `slt` extra (pip install 'spd[slt]', devinterp)"}
    found = nd.at_losses({name: nd.target_loss + row["gap"] for name, row in rows.items()})
    for name, res in found.items():
        rows[name] |= {f"natural_{k}": v for k, v in res.items()}
    return {
        "sampler_target_loss": nd.target_loss,
        "settings": nd.settings,
        "note": "nbeta whose SGLD draws have the same mean loss gap (search tolerance 10%); LLC = nbeta x gap",
    }


def decomposition_losses(
    run: Any, n: int | None = None, seed_offset: int = 2_000_003
) -> tuple[float, dict[str, float]]:
    """The target's loss and the masked decomposition's (CI, rounded CI, stochastic masks) on one held-out set."""
    from spd.masks import delta_masks, make_masks

    model, task, ev = run.model, run.task, run.config.eval
    if task.metrics is None:
        raise ValueError("the task defines no loss of its own (Task.metrics): no honest-scale section")
    device = next(model.parameters()).device
    batches = held_out(
        task.eval_sampler, n or ev.batch_size * ev.n_batches, ev.batch_size, run.config.seed + seed_offset
    )
    gen = torch.Generator(device=device).manual_seed(run.config.seed + seed_offset)

    def masked(kind: str) -> Callable[[Any], Tensor]:
        def forward(x: Any) -> Tensor:
            ci = model.importances(x, model.clean_pass(x)).lower
            dm = delta_masks(ci, gen) if kind == "stochastic" and model.delta_component else None
            return model(x, make_masks(ci, kind, threshold=ev.ci_threshold, generator=gen), dm)

        return forward

    target = mean_loss(lambda x: target_output(model.target, x), batches, task.metrics, device)
    names = {"ci": "CI-masked", "rounded": "rounded-CI-masked", "stochastic": "stochastic-masked"}
    return target, {label: mean_loss(masked(kind), batches, task.metrics, device) for kind, label in names.items()}


def target_losses(task: Task, models: dict[str, nn.Module], n: int, batch_size: int, seed: int
                  ) -> tuple[float, dict[str, float]]:  # fmt: skip
    """The target's loss and each model's (e.g. edited targets) on one held-out set of the training data."""
    if task.metrics is None:
        raise ValueError("the task defines no loss of its own (Task.metrics): no honest-scale section")
    device = next(task.target.parameters()).device
    batches = held_out(task.eval_sampler, n, batch_size, seed)
    target = mean_loss(lambda x: target_output(task.target, x), batches, task.metrics, device)
    losses = {
        k: mean_loss(lambda x, m=m: target_output(m, x), batches, task.metrics, device) for k, m in models.items()
    }
    return target, losses


def markdown(sec: dict[str, Any]) -> str:
    lines = [
        "## Honest scale",
        "",
        f"Target loss (its own metric, held-out): {sec['target_loss']:.6g}.",
        "",
        "| model | loss | gap | gap / target loss | equivalent compute | (family frontier) | natural degradation nβ |"
        " LLC at nβ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in sec["rows"].items():
        frac = r.get("compute_fraction")
        fs = "n/a" if frac is None else _pct(frac, r.get("compute_bound", ""))
        fam = r.get("compute_fraction_family")
        fs += " | " + ("n/a" if fam is None else _pct(fam, ""))
        nb = r.get("natural_nbeta")
        nbs = "n/a" if nb is None else f"{nb:.4g}" + ("" if r.get("natural_converged", True) else " (approx.)")
        llc = r.get("natural_llc")
        lines.append(
            f"| {name} | {r['loss']:.6g} | {r['gap']:+.4g} | {100 * r['gap_rel']:+.2f}% | {fs} | {nbs} | "
            f"{'n/a' if llc is None else f'{llc:.4g}'} |"
        )
    comp = sec.get("compute", {})
    how = comp.get("description") or comp.get("law") or ""
    lines += ["", f"Equivalent compute: {how}. {comp['note']}."]
    if "constants" in comp:
        lines.append(f"Constants: {comp['constants']}; N = {comp['n_params']:.4g}, D = {comp['n_tokens']:.4g}.")
    nat = sec.get("natural", {})
    if "settings" in nat:
        s = nat["settings"]
        lines.append(
            f"Natural degradation: {nat['note']}; SGLD ({s['sampler']}) eta {s['eta']:.3g}, localization "
            f"{s['localization']:g}, {s['n_steps']} steps ({s['burnin']} burn-in, a draw every {s['draw_every']}), "
            f"batch {s['batch_size']}, {s['n_eval']} held-out inputs."
        )
    else:
        lines.append(f"Natural degradation: {nat.get('note', '')}.")
    return "\n".join(lines) + "\n"


def _pct(frac: float, bound: str) -> str:
    if math.isinf(frac):
        return "beyond the curve (lower loss than any point)"
    text = f"{100 * frac:.3g}%" if frac >= 1e-3 else f"{frac:.2e}"
    return f"{bound} {text}".strip()
