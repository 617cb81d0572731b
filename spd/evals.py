"""Evaluation of a decomposition: plain functions returning flat {name: number} dicts."""

from __future__ import annotations

from typing import Any

import torch

from spd.config import EvalConfig
from spd.ground_truth import GroundTruth, alive_counts, score
from spd.losses import DIVERGENCES, faithfulness_per_module, masked_recon_loss
from spd.masks import delta_masks, make_masks
from spd.model import ComponentModel
from spd.task import BatchSampler, to_device

EVAL_SEED_OFFSET = 1_000_003  # eval batches use their own generator, so evals never disturb training RNG


def ci_l0(ci: dict[str, torch.Tensor], threshold: float) -> dict[str, float]:
    """Mean number of subcomponents with CI > threshold per input, per module."""
    return {n: (g > threshold).sum(-1).float().mean().item() for n, g in ci.items()}


@torch.no_grad()
def evaluate(
    model: ComponentModel,
    sample_batch: BatchSampler,
    cfg: EvalConfig,
    output_loss: str = "mse",
    seed: int = 0,
    ground_truth: GroundTruth | None = None,
) -> dict[str, Any]:
    """Faithfulness, CI-L0, alive counts, reconstruction under every mask kind, and ground-truth scores."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)  # data (CPU)
    mask_gen = torch.Generator(device=device).manual_seed(seed + EVAL_SEED_OFFSET)
    div = DIVERGENCES[output_loss]
    sums: dict[str, float] = {}
    data_ci = []
    for _ in range(cfg.n_batches):
        x = to_device(sample_batch(cfg.batch_size, gen), device)
        target_out, acts = model.forward_with_cache(x)
        ci = model.ci_from_acts(acts).lower
        data_ci.append(ci)
        row: dict[str, float] = {}
        for kind in ("ci", "rounded", "ones", "zeros", "random"):
            masks = make_masks(ci, kind, threshold=cfg.ci_threshold, generator=mask_gen)
            row[f"recon/{kind}"] = masked_recon_loss(model, x, target_out, masks, "all", div).item()
        stoch = make_masks(ci, "stochastic", generator=mask_gen)
        dm = delta_masks(ci, mask_gen) if model.delta_component else None
        for routing in ("all", "layerwise"):
            row[f"recon/stochastic_{routing}"] = masked_recon_loss(model, x, target_out, stoch, routing, div, dm).item()
        row["recon/zero_output_baseline"] = div(torch.zeros_like(target_out), target_out).item()
        for n, v in ci_l0(ci, cfg.ci_threshold).items():
            row[f"ci_l0/{n}"] = v
        for k, v in row.items():
            sums[k] = sums.get(k, 0.0) + v / cfg.n_batches
    out: dict[str, Any] = dict(sums)
    out["ci_l0/total"] = sum(v for k, v in sums.items() if k.startswith("ci_l0/"))
    for n, (mse, rel) in faithfulness_per_module(model).items():
        out[f"faithfulness/{n}"], out[f"faithfulness_rel/{n}"] = mse, rel
    for n, v in alive_counts(data_ci, cfg.ci_threshold).items():
        out[f"alive/{n}"] = v
    if ground_truth is not None:
        out |= {f"gt/{k}": v for k, v in score(model, ground_truth, data_ci, cfg.ci_threshold).items()}
    return out
