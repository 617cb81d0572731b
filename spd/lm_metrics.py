"""Language-model metrics of a decomposition: per-position KL, next-token CE, CE difference and CE unrecovered.

For every mask kind that evaluation runs with all decomposed matrices replaced at once (ci, rounded, stochastic,
ones = "unmasked", zeros, random, adversarial), `LMTally` records the KL to the target at each position and the
next-token cross-entropy. `summarise` turns the tallies of several batches into

- lm/kl/<kind>: mean KL(target || masked) per token; lm/kl_by_position/<kind>: the same at each position;
- lm/ce/<kind>, lm/ce/target: mean next-token CE; lm/ce_diff/<kind> = CE(kind) - CE(target);
- lm/ce_unrecovered/<kind> = CE diff / (CE(baseline) - CE(target)), with the baseline named in
  lm/ce_unrecovered_baseline: the "zeros" masks, every subcomponent of every decomposed matrix ablated and no
  delta component, i.e. those matrices removed from the model. 0 means the target's CE, 1 the baseline's.

Everything over the vocabulary is chunked over positions (`spd.losses.kl_per_position`, `next_token_ce`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from spd.losses import kl_per_position, next_token_ce

BASELINE = "zeros"
BASELINE_TEXT = "zeros: every subcomponent of every decomposed matrix ablated, no delta (the matrices removed)"


def scored_positions(values: Tensor, x: Any) -> Tensor | None:
    """For an LM batch with a `loss_mask` (B, L): the entries of per-position `values` (B, L, ...) at the positions
    whose prediction is scored (position t - 1 for a mark on token t), flattened to (n, ...); else None."""
    if not (isinstance(x, dict) and "loss_mask" in x):
        return None
    return values[:, :-1][x["loss_mask"][:, 1:].bool().to(values.device)]


def token_ids(x: Any) -> Tensor:
    """The (B, L) token ids of an LM batch: the tensor itself, or a tokenizer dict's input_ids."""
    if isinstance(x, dict):
        return x["input_ids"]
    if not isinstance(x, Tensor):
        raise TypeError(f"a causal-LM batch must be a tensor of token ids or a dict with input_ids, not {type(x)}")
    return x


class LMTally:
    """Per-position KL and CE of one batch, per mask kind (sums over the batch; `summarise` averages)."""

    def __init__(self, tokens: Tensor, target_logits: Tensor) -> None:
        self.tokens, self.target = tokens, target_logits
        self.n = tokens.shape[0]
        self.kl: dict[str, Tensor] = {}
        self.ce: dict[str, Tensor] = {"target": next_token_ce(target_logits, tokens).sum(0)}
        self.last: Tensor | None = None

    @torch.no_grad()
    def add(self, kind: str, logits: Tensor) -> None:
        self.kl[kind] = kl_per_position(logits, self.target).sum(0)
        self.ce[kind] = next_token_ce(logits, self.tokens).sum(0)

    def recording(self, divergence: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        """`divergence` that also keeps the last prediction it saw (the adversary's final forward)."""

        def fn(pred: Tensor, target: Tensor) -> Tensor:
            self.last = pred.detach()
            return divergence(pred, target)

        return fn


def summarise(tallies: list[LMTally]) -> dict[str, Any]:
    n = sum(t.n for t in tallies)
    out: dict[str, Any] = {}
    kinds = list(tallies[0].kl)
    ce = {k: float(sum(t.ce[k].sum() for t in tallies)) / (n * tallies[0].ce[k].numel()) for k in tallies[0].ce}
    out["lm/ce/target"] = ce["target"]
    for kind in kinds:
        by_pos = sum(t.kl[kind] for t in tallies) / n
        out[f"lm/kl/{kind}"] = float(by_pos.mean())
        out[f"lm/kl_by_position/{kind}"] = [round(float(v), 6) for v in by_pos]
        out[f"lm/ce/{kind}"] = ce[kind]
        out[f"lm/ce_diff/{kind}"] = ce[kind] - ce["target"]
    if BASELINE in ce:
        gap = ce[BASELINE] - ce["target"]
        for kind in kinds:
            out[f"lm/ce_unrecovered/{kind}"] = (ce[kind] - ce["target"]) / gap if gap > 0 else float("nan")
        out["lm/ce_unrecovered_baseline"] = BASELINE_TEXT
    return out
