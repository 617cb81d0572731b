"""Diagnostics: warnings, each with the numbers that triggered it, saying when a decomposition cannot be trusted.

Inputs are plain data: the evaluation dict (`spd.evals.evaluate`), the run's logged history (metrics.jsonl rows),
the configured step count and the decomposed matrices' shapes. Rules (thresholds in `Thresholds`):

- collapse: in a module, few of the CIs that fire (> the CI threshold) are decisive (>= 0.9), while reconstruction
  is poor (stochastic recon a sizeable share of the zero-output baseline) or has risen from its best value, or
  almost none are (the penalty holds every CI down: ResidMLP 1 at 30x its importance coefficient, 0.2%);
- too_dense: CI-L0 of a module is at least half the rank of its weight matrix (no sparser than the matrix itself);
  when no more subcomponents than the rank are alive and all of them fire on almost every input, the message says
  the module acts as one dense mechanism, which is right for a layer every input needs whole (TMS 40-10's
  identity layer: 10 of rank 10, always on) and wrong for one that should be sparse: only the user can tell;
- dead: no subcomponent of a module is alive; capacity: all are alive (none spare: C may be too small, or exactly
  enough, as in ResidMLP 1's paper config with C = the number of features; only a larger C tells);
- unconverged: CI-L0 (training log) or adversarial reconstruction (periodic evals; judged with >= 5 of them in
  the window and a slope > 3 standard errors, since each is one noisy batch) still trends over the last window of
  training, or the run stopped before its last step;
- faithfulness: one matrix's relative error ||W - sum of subcomponents|| / ||W|| far above the other matrices'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Thresholds:
    near_one_min: float = 0.5  # collapse: share of firing CIs that reach 0.9
    near_one_floor: float = 0.02  # collapse whatever the reconstruction: so few reach 0.9 (good runs: >= 0.1)
    recon_share_max: float = 0.05  # collapse: stochastic recon / zero-output baseline
    recon_rise: float = 2.0  # collapse: settled recon / best logged recon
    dense_rank_frac: float = 0.5  # too_dense: CI-L0 / rank
    always_on: float = 0.9  # ... worded as one dense mechanism when CI-L0 >= this x alive and alive <= rank
    redundancy_max: float = 2.0  # too_dense: pieces per input / rank of the inputs sharing their firing pattern
    redundancy_coverage: float = 0.05  # ... judged only when the repeated patterns cover this share of the inputs
    window: float = 0.2  # unconverged: last fraction of the steps
    l0_trend_max: float = 0.1  # unconverged: |relative change of CI-L0 over the window|
    adv_trend_max: float = 0.25  # unconverged: |relative change of adversarial recon over the window|
    adv_min_points: int = 5  # ... judged only with this many periodic evals in the window (one batch each: noisy)
    adv_t_min: float = 3.0  # ... and only when the slope is this many standard errors from 0
    min_points: int = 3
    faith_ratio: float = 10.0  # faithfulness: error / median of the other matrices'
    faith_min: float = 0.1  # ... and at least this relative error


@dataclass
class Diagnostic:
    kind: str  # collapse | too_dense | dead | capacity | unconverged | faithfulness
    message: str
    module: str | None = None
    numbers: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


def _modules(results: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix) and k[len(prefix) :] != "total"}


def trend(steps: list[float], values: list[float]) -> float:
    """Relative change of a least-squares line over the span of `steps`: slope * span / |mean|."""
    s, v = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if len(s) < 2 or s.max() == s.min():
        return 0.0
    slope = np.polyfit(s, v, 1)[0]
    return float(slope * (s.max() - s.min()) / max(abs(v.mean()), 1e-12))


def slope_t(steps: list[float], values: list[float]) -> float:
    """t statistic of a least-squares slope (slope / its standard error); inf for a perfect line."""
    s, v = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if len(s) < 3 or s.max() == s.min():
        return 0.0
    slope, icept = np.polyfit(s, v, 1)
    resid = v - (slope * s + icept)
    se = np.sqrt(resid.var() * len(s) / (len(s) - 2) / ((s - s.mean()) ** 2).sum())
    return float("inf") if se == 0 else float(abs(slope) / se)


def _window(history: list[dict[str, Any]], key: Any, frac: float, min_points: int) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows where key(row) is not None, restricted to the last `frac` of the logged steps
    (or the last `min_points` rows when the window holds fewer)."""
    rows = [(r["step"], key(r)) for r in history]
    rows = [(s, v) for s, v in rows if v is not None and isinstance(v, int | float) and math.isfinite(v)]
    if not rows:
        return [], []
    last = rows[-1][0]
    inside = [(s, v) for s, v in rows if s >= (1 - frac) * last]
    if len(inside) < min_points:
        inside = rows[-min_points:]
    return [s for s, _ in inside], [v for _, v in inside]


def _train_l0(row: dict[str, Any]) -> float | None:
    vals = [v for k, v in row.items() if k.startswith("train_ci_l0/")]
    return float(sum(vals)) if vals else None


def diagnose(
    results: dict[str, Any],
    history: list[dict[str, Any]],
    steps: int,
    shapes: dict[str, tuple[int, int, int]],
    ci_threshold: float,
    checkpoint_step: int | None = None,
    th: Thresholds = Thresholds(),
    method: str = "spd",
) -> list[Diagnostic]:
    """Warnings for one evaluated run. shapes: module -> (C, d_in, d_out); checkpoint_step: the step of the
    checkpoint an unfinished run was evaluated from. For method "apd" the importances are binary top-k
    indicators: no collapse check, and the messages speak of components, activity and top-k."""
    out: list[Diagnostic] = []
    apd = method == "apd"
    pieces = "components" if apd else "subcomponents"
    on = "in the top-k" if apd else f"with CI above {ci_threshold}"
    knob_low = "apd.topk may be too high" if apd else "the importance coefficient may be too low"
    knob_high = "apd.topk may be too low" if apd else "the importance coefficient may be too high"
    near = _modules(results, "ci_near_one/")
    l0 = _modules(results, "ci_l0/")
    alive = _modules(results, "alive/")
    red, cover = _modules(results, "redundancy/"), _modules(results, "redundancy_coverage/")
    stoch, base = results.get("recon/stochastic_all"), results.get("recon/zero_output_baseline")
    share = stoch / base if stoch is not None and base else None
    hist_recon = [r["loss/stochastic_recon"] for r in history if isinstance(r.get("loss/stochastic_recon"), float)]
    settled = _window(history, lambda r: r.get("loss/stochastic_recon"), th.window, th.min_points)[1]
    rise = (float(np.mean(settled)) / max(min(hist_recon), 1e-30)) if settled and hist_recon else None

    # collapse
    poor = share is not None and share > th.recon_share_max
    rising = rise is not None and rise > th.recon_rise
    for n, frac in near.items():
        held_down = frac < th.near_one_floor and alive.get(n, 1) > 0  # (a module where nothing fires is "dead")
        if not apd and frac < th.near_one_min and (poor or rising or held_down):
            why = []
            if held_down:
                why.append(f"the importance penalty holds the CIs down ({knob_high})")
            if poor:
                why.append(f"stochastic recon {stoch:.3g} is {share:.1%} of the zero-output baseline {base:.3g}")
            if rising:
                why.append(f"training recon settled at {rise:.1f}x its best value")
            out.append(Diagnostic(
                "collapse",
                f"CI collapse in {n}: only {frac:.1%} of the CIs above {ci_threshold} reach 0.9, and " + "; ".join(why),
                n, {"ci_near_one": frac, "recon_share": share or 0.0, "recon_rise": rise or 0.0},
            ))  # fmt: skip

    # density and dead / capacity
    collapsed = {d.module for d in out}  # a collapse explains all-alive better than a capacity warning does
    for n, (C, d_in, d_out) in shapes.items():
        rank = min(d_in, d_out)
        a = alive.get(n)
        if n in l0 and l0[n] >= th.dense_rank_frac * rank:
            if a and a <= rank and l0[n] >= th.always_on * a:  # each piece on every input: one full-rank mechanism
                msg = (f"{n} is one dense mechanism: its {a:g} alive {pieces} (rank {rank}) are all {on} on almost "
                       f"every input (CI-L0 {l0[n]:.2f}). Right for a layer every input needs whole (an identity, a "
                       f"rotation); if this layer should be sparse, {knob_low}")  # fmt: skip
            else:
                msg = (f"{n} is too dense: CI-L0 {l0[n]:.2f} per input is >= {th.dense_rank_frac:g} x its rank "
                       f"{rank} (no sparser than the matrix itself); {knob_low}")  # fmt: skip
            out.append(Diagnostic("too_dense", msg, n, {"ci_l0": l0[n], "rank": rank, "alive": a or 0}))
        elif red.get(n, 0.0) >= th.redundancy_max and cover.get(n, 0.0) >= th.redundancy_coverage:
            pl0, prank = results.get(f"redundancy_l0/{n}", 0.0), results.get(f"redundancy_rank/{n}", 0.0)
            msg = (f"{n} is too dense: on the {cover[n]:.1%} of inputs whose firing pattern repeats, {pl0:.1f} "
                   f"{pieces} fire per input while those inputs to the matrix span rank {prank:.2f} (99% energy): "
                   f"{red[n]:.1f} {pieces} do the work of one (a mechanism spread over several, or {pieces} shared "
                   f"across mechanisms); {knob_low}")  # fmt: skip
            nums = {"redundancy": red[n], "coverage": cover[n], "pattern_l0": pl0, "pattern_rank": prank}
            out.append(Diagnostic("too_dense", msg, n, nums))
        if n in alive and alive[n] == 0:
            out.append(Diagnostic(
                "dead", f"all {C} {pieces} of {n} are dead (never {on} on the eval data); {knob_high}",
                n, {"alive": 0, "C": C},
            ))  # fmt: skip
        elif n in alive and alive[n] == C and n not in collapsed:
            out.append(Diagnostic(
                "capacity", f"all {C} {pieces} of {n} are alive ({on}): none is spare, so this run cannot tell "
                f"whether C holds every mechanism (C exactly enough looks the same as C too small); rerun with a "
                f"larger C to check, or {knob_low}", n, {"alive": C, "C": C},
            ))  # fmt: skip

    # convergence
    last_step = checkpoint_step if checkpoint_step is not None else max((r["step"] for r in history), default=None)
    if last_step is not None and last_step < steps - 1:
        where = "; evaluated from its last checkpoint" if checkpoint_step is not None else ""
        out.append(Diagnostic(
            "unconverged", f"the run stopped at step {last_step} of {steps} ({(last_step + 1) / steps:.1%}){where}",
            None, {"last_step": last_step, "steps": steps},
        ))  # fmt: skip
    s, v = _window(history, _train_l0, th.window, th.min_points)
    if len(v) >= 2:
        t = trend(s, v)
        if abs(t) > th.l0_trend_max:
            out.append(Diagnostic(
                "unconverged",
                f"CI-L0 still moving: {t:+.0%} over steps {s[0]}-{s[-1]} (from {v[0]:.3g} to {v[-1]:.3g})",
                None, {"l0_trend": t},
            ))  # fmt: skip
    adv_keys = sorted({k for r in history for k in r if k.startswith("eval/recon/adversarial_all")})
    for key in adv_keys:
        s, v = _window(history, lambda r, key=key: r.get(key), th.window, th.adv_min_points)
        if len(v) >= th.adv_min_points:
            t = trend(s, v)
            if abs(t) > th.adv_trend_max and slope_t(s, v) > th.adv_t_min:
                out.append(Diagnostic(
                    "unconverged", f"{key[5:]} still moving: {t:+.0%} over steps {s[0]}-{s[-1]}",
                    None, {"adv_trend": t},
                ))  # fmt: skip

    # faithfulness outliers
    rel = _modules(results, "faithfulness_rel/")
    if len(rel) >= 2:
        for n, r in rel.items():
            others = float(np.median([v for m, v in rel.items() if m != n]))
            if r > th.faith_min and r > th.faith_ratio * others:
                out.append(Diagnostic(
                    "faithfulness",
                    f"{n}: relative error ||W - sum of subcomponents|| / ||W|| = {r:.3g}, "
                    f"{r / max(others, 1e-30):.0f}x "
                    f"the median of the other matrices ({others:.3g})",
                    n, {"rel_error": r, "median_others": others},
                ))  # fmt: skip
    return out
