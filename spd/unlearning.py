"""Unlearning studies: edit a target by ablating what its decomposition selects, and compare the edit with two
baselines at a matched forget effect.

Data: the forget and the retain inputs are each split in halves. The first halves choose what to ablate and drive
gradient ascent; every reported number is measured on the second halves.

Methods (each edits the decomposed matrices only):
- components: W' = W - sum(selected subcomponents), `spd.ablate.edited_target`;
- neurons/heads (key "neurons"): whole units of the decomposed matrices zeroed (`spd.units`): attention heads in
  attention output (or value) projections, output units elsewhere (a row of W and its bias entry; for an MLP's
  input matrix, its hidden neurons) or, with `neuron_inputs`, input units (a column of W; for an MLP's output
  matrix, its hidden neurons). The same rule ranks the units as chose the components: with an importance
  `Rule`, a unit's importance on an input is the squared change of the model's output when that unit alone is
  zeroed, divided by its largest value on the selection data; with an `EffectRule` (`spd.effects`), the change of
  the selection losses when it alone is zeroed. They are ablated in that order (those the rule selects first)
  until the held-out forget loss reaches the component edit's (if it never does, the prefix of that order with the
  highest forget loss is kept and reported as not matched);
- gradient ascent: Adam on the decomposed matrices' weights, maximising the forget loss on the selection half,
  stopped at the first step whose held-out forget loss reaches the component edit's.

Reference for the forget side: the forget loss with every decomposed matrix zeroed (nothing passes through them;
for a toy whose decomposed matrices compute the answer, the loss of predicting zero), so `forget_vs_zero` = forget
loss / that reference says how far the edit went towards knowing nothing. By default the baselines are matched to
the component edit's forget loss capped at that reference (past it, a toy's baselines would have to know less than
nothing); `cap_at_zero=False` drops the cap, for a model whose decomposed matrices are only part of what computes
the answer (one matrix of a language model: removing selected pieces can hurt the forget set more than zeroing
the matrix). The task loss is the target's own (its
`Task.metrics`); a task without one is measured by the divergence from the original output instead.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spd import io
from spd.ablate import (
    Rule,
    Scores,
    Selection,
    chunks,
    edit_stats,
    edited_target,
    firing,
    save_edited,
    select_by_data,
    take,
)
from spd.effects import EffectRule, effect_scores, select_by_effect, unit_remover
from spd.lm_metrics import scored_positions
from spd.losses import DIVERGENCES
from spd.mechanisms import Grouping, member_masks
from spd.model import target_output
from spd.names import target_modules
from spd.replay import FixedPrefix, run_target
from spd.task import TaskMetrics, batch_len
from spd.units import Unit, kinds_text, target_units, unit_effects, zero_units


def halves(x: Any) -> tuple[Any, Any]:
    n = batch_len(x)
    if n < 2:
        raise ValueError(f"a forget or retain set needs at least 2 inputs (got {n})")
    return take(x, slice(0, n // 2)), take(x, slice(n // 2, n))


@torch.no_grad()
def measure(
    target: nn.Module,
    original: nn.Module,
    x: Any,
    metrics: TaskMetrics | None,
    output_loss: str,
    batch_size: int,
    divergence: bool = True,
    prefix: FixedPrefix | None = None,
) -> dict[str, float]:
    """Means over x of the task metrics (loss, accuracy, ...) and, with `divergence` (always when the task has no
    metrics), of the divergence from the original output (one more pass of the original per batch). `prefix`
    replays the unchanged part of each pass (`spd.replay`)."""
    div = DIVERGENCES[output_loss]
    sums: dict[str, float] = {}
    n = 0
    for xb in chunks(x, batch_size):
        out = run_target(target, xb, prefix)
        b = batch_len(xb)
        vals = {k: v.double().sum().item() for k, v in (metrics(xb, out) if metrics else {}).items()}
        if divergence or metrics is None:
            ref = run_target(original, xb, prefix)
            if out.ndim == 3 and (at := scored_positions(out, xb)) is not None:  # LM: the scored positions only
                out, ref = at, scored_positions(ref, xb)
            vals[f"{output_loss}_to_original"] = div(out, ref).item() * b
        for k, v in vals.items():
            sums[k] = sums.get(k, 0.0) + v
        n += b
    return {k: v / n for k, v in sums.items()}


@torch.no_grad()
def zeroed_target(target: nn.Module, modules: list[str]) -> nn.Module:
    out = copy.deepcopy(target)
    named = target_modules(out)
    for m in modules:
        named[m].weight.zero_()
    return out


# ---- unit (neuron / head) baseline ---------------------------------------------------------------------
def unit_scores(
    target: nn.Module, units: list[Unit], forget: Any, retain: Any, threshold: float, batch_size: int,
    prefix: FixedPrefix | None = None,
) -> Scores:  # fmt: skip
    ef = unit_effects(target, units, forget, batch_size, prefix)
    er = unit_effects(target, units, retain, batch_size, prefix)
    scale = torch.cat([ef, er]).amax(0).clamp_min(1e-30)
    return Scores([u.label for u in units], firing(ef / scale, threshold), firing(er / scale, threshold))


# ---- the study -----------------------------------------------------------------------------------------
@dataclass
class Study:
    """The report (plain JSON data), the edited target and the baselines' edited targets."""

    report: dict[str, Any]
    edited: nn.Module
    baselines: dict[str, nn.Module] = field(default_factory=dict)


def unlearning_study(
    model: Any,
    forget: Any,
    retain: Any,
    selection: Selection | None = None,
    rule: Rule | EffectRule | None = None,
    grouping: Grouping | None = None,
    metrics: TaskMetrics | None = None,
    output_loss: str = "mse",
    baselines: bool = True,
    neuron_modules: str | None = None,
    neuron_inputs: bool = False,
    ga_lr: float = 1e-3,
    ga_max_steps: int = 2000,
    batch_size: int = 4096,
    cap_at_zero: bool = True,
) -> Study:
    """Ablate `selection` (default: what `rule` selects on the forget/retain selection halves, over subcomponents,
    or over `grouping`'s mechanisms: an importance `Rule` or an `EffectRule`), measure it, and run the baselines at
    the same held-out forget loss (capped at the zero-ablation level unless `cap_at_zero` is False).
    `neuron_modules`: glob over decomposed modules whose output units (with `neuron_inputs`, input units: an MLP
    output matrix's hidden neurons) the neuron baseline may zero (default all)."""
    rule = rule or Rule()
    f_sel, f_eval = halves(forget)
    r_sel, r_eval = halves(retain)
    original: nn.Module = model.target
    key = "loss" if metrics is not None else f"{output_loss}_to_original"
    # every model below differs from the original only in the decomposed matrices: replay what runs before them
    prefix = FixedPrefix(original, list(model.module_names))

    def score(t: nn.Module, x: Any) -> float:  # the loss alone: what the effect rule and the matching read
        return measure(t, original, x, metrics, output_loss, batch_size, divergence=False, prefix=prefix)[key]

    if selection is None and isinstance(rule, EffectRule):
        selection, _ = select_by_effect(model, f_sel, r_sel, rule, score, grouping, batch_size)
    elif selection is None:
        selection, _ = select_by_data(model, f_sel, r_sel, rule, grouping, batch_size)

    def on(t: nn.Module, x: Any) -> dict[str, float]:
        return measure(t, original, x, metrics, output_loss, batch_size, prefix=prefix)

    def forget_score(t: nn.Module) -> float:  # the matched quantity only (baselines evaluate it every step)
        return score(t, f_eval)

    def entry(t: nn.Module, **extra: Any) -> dict[str, Any]:
        stats = edit_stats(original, t)
        return {"forget": on(t, f_eval), "retain": on(t, r_eval), "parameters_changed": stats["parameters_changed"],
                "relative_edit_norm": stats["relative_norm"], "tensors_changed": stats["tensors"], **extra}  # fmt: skip

    edited = edited_target(model, selection.members)
    zero = on(zeroed_target(original, list(model.module_names)), f_eval)
    methods: dict[str, Any] = {
        "original": entry(original),
        "components": entry(edited, units=len(selection.members), unit="subcomponents"),
    }
    with torch.no_grad():
        x0 = take(f_eval, slice(0, min(batch_size, batch_len(f_eval))))
        masked = model(x0, *member_masks(model, selection.members))
        gap = (masked - target_output(edited, x0)).abs().max().item()
    # the baselines must reach the component edit's forget loss, or knowing nothing (zero-ablation), if lower
    target_loss = methods["components"]["forget"][key]
    if cap_at_zero:
        target_loss = min(target_loss, zero[key])
    out_models: dict[str, nn.Module] = {}
    if baselines and target_loss > methods["original"]["forget"][key]:
        mods = [m for m in model.module_names if neuron_modules is None or fnmatch.fnmatchcase(m, neuron_modules)]
        if not mods:
            raise ValueError(f"--neurons {neuron_modules!r} matches no decomposed module ({list(model.module_names)})")
        units = target_units(original, mods, neuron_inputs)
        if not units:
            raise ValueError(f"the unit baseline found no neurons or heads in {mods}")
        if isinstance(rule, EffectRule):
            scores: Scores = effect_scores(
                original, [u.label for u in units], [unit_remover(u) for u in units], score, f_sel, r_sel
            )
        else:
            scores = unit_scores(original, units, f_sel, r_sel, rule.threshold, batch_size, prefix)
        t, info = _neurons_matched(original, mods, units, scores, scores.passing(rule), forget_score, target_loss)
        info["rule"] = rule.describe()
        methods["neurons"], out_models["neurons"] = entry(t, **info), t
        obj = _objective(original, metrics, output_loss, prefix)
        t, info = _gradient_ascent(original, list(model.module_names), f_sel, obj, forget_score,
                                   target_loss, ga_lr, ga_max_steps, batch_size)  # fmt: skip
        methods["gradient_ascent"], out_models["gradient_ascent"] = entry(t, **info), t
    for m in methods.values():
        m["forget_vs_zero"] = m["forget"][key] / zero[key] if zero[key] > 0 else float("nan")
        base = methods["original"]["retain"][key]
        m["retain_change"] = (m["retain"][key] - base) / base if base > 0 else float("nan")
    report = {
        "selection": {"members": [f"{m}:{c}" for m, c in selection.members], **selection.how},
        "measure": key,
        "zero_ablation": zero,
        "edit_vs_masked_pass_max_abs_diff": gap,
        "n_inputs": {
            "forget_select": batch_len(f_sel),
            "forget_eval": batch_len(f_eval),
            "retain_select": batch_len(r_sel),
            "retain_eval": batch_len(r_eval),
        },  # fmt: skip
        "matched_forget": target_loss,
        "matched_capped_at_zero": cap_at_zero,
        "methods": methods,
        "baselines_skipped": None
        if "neurons" in methods or not baselines
        else "the component edit does not raise the forget loss, so there is no forget effect to match",
    }
    return Study(report, edited, out_models)


def _objective(
    original: nn.Module, metrics: TaskMetrics | None, output_loss: str, prefix: FixedPrefix | None = None
) -> Callable[[nn.Module, Any], Tensor]:
    div = DIVERGENCES[output_loss]

    def objective(t: nn.Module, x: Any) -> Tensor:
        out = run_target(t, x, prefix)
        if metrics is not None:
            return metrics(x, out)["loss"].mean()
        with torch.no_grad():
            ref = run_target(original, x, prefix)
        return div(out, ref)

    return objective


def _neurons_matched(
    original: nn.Module, modules: list[str], units: list[Unit], scores: Scores, passing: list[int],
    forget_loss: Callable[[nn.Module], float], target_loss: float,
) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """Zero units in the rule's order (`passing` first) until the forget loss reaches `target_loss`; if it never
    does, the prefix of that order with the highest forget loss."""
    order = passing + [i for i in scores.ranked() if i not in passing]
    t = copy.deepcopy(original)
    done: list[int] = []
    best, best_n, matched = -float("inf"), 0, False
    for i in order:
        zero_units(t, [units[i]])
        done.append(i)
        loss = forget_loss(t)
        if loss > best:
            best, best_n = loss, len(done)
        if loss >= target_loss:
            matched = True
            break
    if not matched:
        done = done[:best_n]
        t = copy.deepcopy(original)
        zero_units(t, [units[i] for i in done])
    return t, {
        "units": len(done),
        "unit": kinds_text([units[i] for i in done]),
        "matched": matched,
        "selected_by_rule": len(passing),
        "candidates": len(units),
        "modules": modules,
        "ablated": [scores.row(i) for i in done][:50],
    }


def _gradient_ascent(
    original: nn.Module, modules: list[str], f_sel: Any, objective: Callable[[nn.Module, Any], Tensor],
    forget_loss: Callable[[nn.Module], float], target_loss: float, lr: float, max_steps: int, batch_size: int,
) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    t = copy.deepcopy(original)
    named = target_modules(t)
    params = list({id(named[m].weight): named[m].weight for m in modules}.values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    batches = chunks(f_sel, batch_size)
    step, matched, prev = 0, False, [p.detach().clone() for p in params]
    with torch.enable_grad():
        while True:
            matched = forget_loss(t) >= target_loss
            if matched or step == max_steps:
                break
            prev = [p.detach().clone() for p in params]
            loss = -objective(t, batches[step % len(batches)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    for p in params:
        p.requires_grad_(False)
    if matched and step > 0:
        _interpolate_last_step(params, prev, forget_loss, t, target_loss)
    return t, {"units": step, "unit": "steps", "matched": matched, "lr": lr, "optimizer": "Adam"}


@torch.no_grad()
def _interpolate_last_step(
    params: list[Tensor], prev: list[Tensor], forget_loss: Callable[[nn.Module], float], t: nn.Module, target: float
) -> None:
    """Move the weights back along the last step, to the first point whose forget loss reaches `target` (bisection,
    12 halvings), so that one large step does not overshoot the match."""
    new = [p.clone() for p in params]
    lo, hi = 0.0, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        for p, a, b in zip(params, prev, new, strict=True):
            p.copy_(a + mid * (b - a))
        lo, hi = (lo, mid) if forget_loss(t) >= target else (mid, hi)
    for p, a, b in zip(params, prev, new, strict=True):
        p.copy_(a + hi * (b - a))


# ---- files ---------------------------------------------------------------------------------------------
METHOD_NAMES = {"original": "original", "components": "ablate components", "neurons": "ablate neurons/heads",
                "gradient_ascent": "gradient ascent"}  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    key = report["measure"]
    sel = report["selection"]
    acc = "accuracy" in report["zero_ablation"]
    n = len(sel["members"])
    lines = [f"# Ablation: {n} subcomponent{'s' * (n != 1)}", ""]
    if sel.get("kind") == "data":
        lines += [f"Chosen by data over {sel['units']}: {sel['rule_text']}.", ""]
    elif sel.get("kind"):
        lines += [f"Chosen by {sel['kind']}: {', '.join(sel.get('names', sel['members']))}.", ""]
    lines += [
        f"Measured on held-out halves ({report['n_inputs']['forget_eval']} forget, {report['n_inputs']['retain_eval']}"
        f" retain inputs). Forget {key} with every decomposed matrix zeroed: {report['zero_ablation'][key]:.4g}. "
        f"Baselines are run to the same forget {key} as the component edit"
        + (" (capped at that zero-ablation level)" if report.get("matched_capped_at_zero", True) else "")
        + f": {report['matched_forget']:.4g}. Edit norm: ||W' - W|| / ||W|| over all weights.",
        "",
        f"| method | units | parameters changed | edit norm | forget {key} | forget / zero-ablation | retain {key} |"
        f" retain change | retain divergence |" + (" forget acc | retain acc |" if acc else ""),
        "|---" * (9 + 2 * acc) + "|",
    ]
    for name, m in report["methods"].items():
        units = "" if m.get("unit") is None else f"{m.get('units')} {m['unit']}" + ("" if m.get("matched", True)
                                                                                  else " (not matched)")  # fmt: skip
        div = next(k for k in m["retain"] if k.endswith("_to_original"))
        row = (f"| {METHOD_NAMES.get(name, name)} | {units} | {m['parameters_changed']} | "
               f"{m['relative_edit_norm']:.3g} | {m['forget'][key]:.4g} | "
               f"{m['forget_vs_zero']:.3f} | {m['retain'][key]:.4g} | {m['retain_change']:+.2%} | "
               f"{m['retain'][div]:.3g} |")  # fmt: skip
        if "accuracy" in m["forget"]:
            row += f" {m['forget']['accuracy']:.3f} | {m['retain']['accuracy']:.3f} |"
        lines.append(row)
    if report.get("baselines_skipped"):
        lines += ["", f"Baselines not run: {report['baselines_skipped']}."]
    gap = report["edit_vs_masked_pass_max_abs_diff"]
    lines += ["", f"The edited model equals the in-library masked pass to {gap:.2g} (max abs difference of outputs)."]
    if "honest_scale" in report:
        from spd.honest import markdown as honest_markdown

        lines += ["", "On the training distribution (not the forget or retain slices):", "",
                  honest_markdown(report["honest_scale"]).rstrip()]  # fmt: skip
    return "\n".join(lines) + "\n"


def figure(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in report["methods"] if n != "original"]
    labels = [METHOD_NAMES.get(n, n) for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
    axes[0].barh(labels, [report["methods"][n]["forget_vs_zero"] for n in names], color="tab:red")
    axes[0].axvline(1.0, color="k", lw=0.8, ls="--")
    axes[0].axvline(report["methods"]["original"]["forget_vs_zero"], color="gray", lw=0.8, ls=":", label="original")
    axes[0].legend(fontsize=7, loc="lower right")
    axes[0].set_xlabel(f"forget {report['measure']} / zero-ablation (higher: more forgotten)")
    axes[1].barh(labels, [100 * report["methods"][n]["retain_change"] for n in names], color="tab:blue")
    axes[1].axvline(0.0, color="k", lw=0.8)
    axes[1].set_xlabel(f"retain {report['measure']} change, % (0: kept)")
    axes[1].set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_study(
    study: Study, out_dir: Path, architecture: dict[str, Any] | None, force: bool = False
) -> dict[str, Path]:
    """out_dir/{ablation.json, ablation.md, ablation.png, edited/}; refuses a non-empty out_dir unless `force`."""
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} already holds results; nothing was overwritten (pass --force or --out)")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "ablation.json", "md": out_dir / "ablation.md", "edited": out_dir / "edited"}
    save_edited(study.edited, paths["edited"], architecture, {"selection": study.report["selection"]["members"]})
    io.write_json(paths["json"], study.report)
    paths["md"].write_text(markdown(study.report))
    try:
        figure(study.report, out_dir / "ablation.png")
        paths["png"] = out_dir / "ablation.png"
    except ImportError:
        pass  # matplotlib is an optional extra
    return paths


# ---- data from the command line -------------------------------------------------------------------------
def load_data(spec: str, subsets: Any, n: int, seed: int) -> Any:
    """A forget/retain set: a .safetensors file (one tensor, or tokenizer output with `input_ids`), or a slice of
    the target's data that its task names (`Task.subsets`, e.g. "only:3" for the sparse-feature toys)."""
    if spec.endswith(".safetensors"):
        tensors = io.load_tensors(Path(spec))
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        if "input_ids" in tensors:
            return tensors
        if "x" in tensors:
            return tensors["x"]
        raise ValueError(f"{spec}: expected one tensor, `x`, or tokenizer output with `input_ids`; has {list(tensors)}")
    if subsets is None:
        raise ValueError(f"data {spec!r}: this target names no data subsets; give a .safetensors file of inputs")
    return subsets(spec, n, torch.Generator().manual_seed(seed))
