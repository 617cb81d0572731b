"""Evaluation of a decomposition: plain functions returning flat {name: number} dicts."""

from __future__ import annotations

from typing import Any

import torch

from spd.adversarial import Budget, attack
from spd.config import EvalConfig
from spd.ground_truth import GroundTruth, alive_counts, score
from spd.lm_metrics import LMTally, summarise, token_ids
from spd.losses import DIVERGENCES, faithfulness_per_module, masked_recon_loss
from spd.masks import delta_masks, make_masks
from spd.model import ComponentModel
from spd.redundancy import PatternTally
from spd.task import BatchSampler, to_device

EVAL_SEED_OFFSET = 1_000_003  # eval batches use their own generator, so evals never disturb training RNG


def ci_l0(ci: dict[str, torch.Tensor], threshold: float) -> dict[str, float]:
    """Mean number of subcomponents with CI > threshold per input, per module."""
    return {n: (g > threshold).sum(-1).float().mean().item() for n, g in ci.items()}


def ci_near_one(ci: dict[str, torch.Tensor], threshold: float, near: float = 0.9) -> dict[str, tuple[int, int]]:
    """Per module, (#CI entries >= near, #CI entries > threshold): how much of the firing CI mass is decisive."""
    return {n: (int((g >= near).sum()), int((g > threshold).sum())) for n, g in ci.items()}


def adversarial_budget(cfg: EvalConfig) -> Budget:
    a = cfg.adversarial
    return Budget(a.n_steps, a.step_size, a.init, a.scope)


def batch_metrics(
    model: ComponentModel,
    x: Any,
    cfg: EvalConfig,
    output_loss: str,
    mask_gen: torch.Generator,
    full: bool = True,
    lm: list[LMTally] | None = None,
    patterns: PatternTally | None = None,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Reconstruction under every mask kind (only stochastic and adversarial unless `full`) and CI-L0 on one
    batch; returns the metrics and the lower CIs. With `lm` (x holds token ids), the batch's per-position KL and
    next-token CE under each all-module mask kind are appended to it as an LMTally; with `patterns`, the batch's
    firing patterns and module inputs are added to it."""
    div = DIVERGENCES[output_loss]
    clean = model.clean_pass(x)
    clean.inner = model.inner_acts(clean.acts)  # masked passes below start from the clean pass (`spd.reuse`)
    target_out = clean.output
    ci = model.importances(x, clean).lower
    if patterns is not None:
        patterns.add(clean.acts, ci)
    tally = LMTally(token_ids(x), target_out) if lm is not None else None
    row: dict[str, float] = {}

    def all_modules(kind: str, masks: dict[str, torch.Tensor], dm: dict[str, torch.Tensor] | None = None) -> float:
        out = model(x, masks, dm, clean=clean)
        if tally is not None:
            tally.add(kind, out)
        return div(out, target_out).item()

    if full:
        for kind in ("ci", "rounded", "ones", "zeros", "random"):
            masks = make_masks(ci, kind, threshold=cfg.ci_threshold, generator=mask_gen)
            row[f"recon/{kind}"] = all_modules(kind, masks)
        # the wrapping itself must not change the target: every module patched, none replaced
        row["check/wrapped_max_abs_diff"] = (model(x, cache={}) - target_out).abs().max().item()
    stoch = make_masks(ci, "stochastic", generator=mask_gen)
    dm = delta_masks(ci, mask_gen) if model.delta_component else None
    row["recon/stochastic_all"] = all_modules("stochastic", stoch, dm)
    row["recon/stochastic_layerwise"] = masked_recon_loss(
        model, x, target_out, stoch, "layerwise", div, dm, clean=clean
    ).item()
    budget = adversarial_budget(cfg)
    if budget.n_steps > 0:
        for routing in cfg.adversarial.routings:
            adv_div = tally.recording(div) if tally is not None and routing == "all" else div
            loss = attack(model, x, target_out, ci, routing, adv_div, budget, mask_gen, clean)
            row[f"recon/adversarial_{routing}@{budget.label}"] = loss.item()
            if adv_div is not div and tally is not None and tally.last is not None:
                tally.add("adversarial", tally.last)
    if tally is not None and lm is not None:
        lm.append(tally)
    row["recon/zero_output_baseline"] = div(torch.zeros_like(target_out), target_out).item()
    for n, v in ci_l0(ci, cfg.ci_threshold).items():
        row[f"ci_l0/{n}"] = v
    row["ci_l0/total"] = sum(v for k, v in row.items() if k.startswith("ci_l0/"))
    return row, ci


@torch.no_grad()
def quick_eval(
    model: ComponentModel, sample_batch: BatchSampler, cfg: EvalConfig, output_loss: str, seed: int, step: int
) -> dict[str, float]:
    """One eval batch (fresh per call, seeded by the step): CI-L0, stochastic and adversarial reconstruction."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET + step)
    mask_gen = torch.Generator(device=device).manual_seed(seed + EVAL_SEED_OFFSET + step)
    x = to_device(sample_batch(cfg.batch_size, gen), device)
    row, _ = batch_metrics(model, x, cfg, output_loss, mask_gen, full=False)
    return row


@torch.no_grad()
def evaluate(
    model: ComponentModel,
    sample_batch: BatchSampler,
    cfg: EvalConfig,
    output_loss: str = "mse",
    seed: int = 0,
    ground_truth: GroundTruth | None = None,
    causal_lm: bool = False,
) -> dict[str, Any]:
    """Faithfulness, CI-L0, alive counts, reconstruction under every mask kind (adversarial included, its
    budget in the key), how decisive the CIs are, firing-pattern redundancy (`spd.redundancy`: redundancy/...,
    redundancy_coverage/..., ...), and ground-truth scores; for a causal LM (inputs are token ids)
    also the `spd.lm_metrics` keys (lm/...), with CI-L0 counted per token."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)  # data (CPU)
    mask_gen = torch.Generator(device=device).manual_seed(seed + EVAL_SEED_OFFSET)
    sums: dict[str, float] = {}
    data_ci = []
    tallies: list[LMTally] | None = [] if causal_lm else None
    patterns = PatternTally(cfg.ci_threshold)
    for _ in range(cfg.n_batches):
        x = to_device(sample_batch(cfg.batch_size, gen), device)
        row, ci = batch_metrics(model, x, cfg, output_loss, mask_gen, lm=tallies, patterns=patterns)
        data_ci.append(ci)
        for k, v in row.items():  # means over batches; check/ values are maxima
            sums[k] = max(sums.get(k, 0.0), v) if k.startswith("check/") else sums.get(k, 0.0) + v / cfg.n_batches
    out: dict[str, Any] = dict(sums)
    if tallies:
        out |= summarise(tallies)
    if cfg.adversarial.n_steps > 0:
        out["recon/adversarial_budget"] = adversarial_budget(cfg).describe()
    near: dict[str, list[int]] = {}
    for ci in data_ci:
        for n, (hi, firing) in ci_near_one(ci, cfg.ci_threshold).items():
            acc = near.setdefault(n, [0, 0])
            acc[0], acc[1] = acc[0] + hi, acc[1] + firing
    for n, (hi, firing) in near.items():
        out[f"ci_near_one/{n}"] = hi / firing if firing else 0.0  # share of firing CIs that are >= 0.9
        out[f"ci_firing/{n}"] = firing
    for n, red in patterns.summary().items():  # spd.redundancy: pieces doing one's work on repeated patterns
        out |= {f"redundancy{'' if k == 'redundancy' else '_' + k}/{n}": v for k, v in red.items()}
    for n, (mse, rel) in faithfulness_per_module(model).items():
        out[f"faithfulness/{n}"], out[f"faithfulness_rel/{n}"] = mse, rel
    for n, v in alive_counts(data_ci, cfg.ci_threshold, cfg.alive_min_density).items():
        out[f"alive/{n}"] = v
    if cfg.alive_min_density > 0:
        for n, v in alive_counts(data_ci, cfg.ci_threshold).items():
            out[f"alive_ever/{n}"] = v
    if ground_truth is not None:
        gt = score(model, ground_truth, data_ci, cfg.ci_threshold, cfg.alive_min_density)
        out |= {f"gt/{k}": v for k, v in gt.items()}
    return out
