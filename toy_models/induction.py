"""The induction-head toy: a 2-layer, attention-only, 1-head transformer that completes "... S M ... S" with M.

Data (as in the reference implementation's InductionDataset): id 0 is BOS, ids 1..vocab are normal tokens and
S = vocab + 1 is the induction token. A sequence is [BOS] T* S M T* S: random tokens with S placed at a random
position and the memorised token M right after it, and S again at the end. The label is M, predicted at the
last position. Chance accuracy is 1 / vocab.

Model: token embedding with no positional embedding on the residual stream; sinusoidal positions added to the
inputs of Q and K only (Shortformer style); causal attention; bias-free q/k/v/out projections; no LayerNorm, no
MLPs; an unembedding. The model returns the logits at the last position.

Expected mechanism: layer 1 (blocks.0) a previous-token head that writes M's predecessor (S) into M's position;
layer 2 (blocks.1) an induction head whose query (the final S) matches that key and copies M to the output.
The ground-truth check is by ablation: the alive subcomponents of each layer are necessary (ablating them drops
accuracy to chance) and sufficient (keeping only them, with the rest of that layer's weights removed, keeps the
accuracy).

The reference trains d_model 16, vocab 128, length 64 for 100k steps; the default here is smaller (vocab 24,
length 16) so the target trains in about a minute on a CPU. Both are settings of `induction_task`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from spd.ground_truth import GroundTruth
from spd.task import Task

PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")


def sinusoidal(seq_len: int, d: int) -> Tensor:
    pos = torch.arange(seq_len)[:, None]
    div = torch.exp(torch.arange(0, d, 2) * (-math.log(10_000.0) / d))
    pe = torch.zeros(seq_len, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return pe


class Attention(nn.Module):
    n_heads = 1  # read by spd.units (the head-ablation baseline)

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, pe: Tensor) -> Tensor:
        q, k, v = self.q_proj(x + pe), self.k_proj(x + pe), self.v_proj(x)
        return self.out_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class Block(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.attn = Attention(d_model)

    def forward(self, x: Tensor, pe: Tensor) -> Tensor:
        return x + self.attn(x, pe)


class InductionTransformer(nn.Module):
    def __init__(self, vocab: int, seq_len: int, d_model: int = 16, n_layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab + 2, d_model)
        self.blocks = nn.ModuleList([Block(d_model) for _ in range(n_layers)])
        self.unembed = nn.Linear(d_model, vocab + 2, bias=False)
        self.register_buffer("pe", sinusoidal(seq_len, d_model))

    def forward(self, tokens: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch vocab"]:
        x = self.embed(tokens)
        pe = self.pe[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x, pe)
        return self.unembed(x[:, -1])


def sample_sequences(batch_size: int, vocab: int, seq_len: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """[BOS] T* S M T* S and the label M."""
    S = vocab + 1
    body = torch.randint(1, vocab + 1, (batch_size, seq_len - 2), generator=g)
    pos = torch.randint(1, seq_len - 4, (batch_size,), generator=g)  # S at pos, M at pos + 1, inside the body
    rows = torch.arange(batch_size)
    body[rows, pos] = S
    label = body[rows, pos + 1].clone()
    tokens = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), body, torch.full((batch_size, 1), S)], dim=1)
    return tokens, label


def train_induction(model: InductionTransformer, vocab: int, seq_len: int, seed: int, steps: int,
                    batch_size: int = 256, lr: float = 3e-3) -> float:  # fmt: skip
    """AdamW (weight decay 0.01) with linear warm-up, cross-entropy at the last position. Returns the accuracy."""
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    for _ in range(steps):
        tokens, label = sample_sequences(batch_size, vocab, seq_len, g)
        loss = F.cross_entropy(model(tokens), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.requires_grad_(False)
    return accuracy(model, vocab, seq_len, torch.Generator().manual_seed(seed + 2))


@torch.no_grad()
def accuracy(fn: Any, vocab: int, seq_len: int, g: torch.Generator, n: int = 4096) -> float:
    tokens, label = sample_sequences(n, vocab, seq_len, g)
    return (fn(tokens).argmax(-1) == label).float().mean().item()


def layer_modules(layer: int) -> list[str]:
    return [f"blocks.{layer}.attn.{p}" for p in PROJ]


def ablation_check(vocab: int, seq_len: int, n_layers: int, threshold: float = 0.1, n: int = 2048) -> Any:
    """Per layer: which subcomponents are alive on induction data, and the accuracy (a) of the target, (b) with
    those subcomponents ablated (W -> W - their sum; everything else unchanged), (c) with only them kept in that
    layer (the rest of the layer's weights removed). Necessary: (b) <= chance + 0.1; sufficient: (c) >= 0.9 (a)."""

    def check(model: Any) -> tuple[dict[str, Any], list[str]]:
        device = next(model.parameters()).device
        tokens, label = sample_sequences(n, vocab, seq_len, torch.Generator().manual_seed(777))
        tokens, label = tokens.to(device), label.to(device)
        ci = model.causal_importances(tokens).lower
        alive = {m: (g.flatten(0, -2) > threshold).any(0) for m, g in ci.items()}
        chance = 1.0 / vocab
        out: dict[str, Any] = {"chance_accuracy": chance}
        fails: list[str] = []
        with torch.no_grad():
            base = (model(tokens).argmax(-1) == label).float().mean().item()
            out["accuracy/target"] = base
            for layer in range(n_layers):
                mods = layer_modules(layer)
                ablate = {m: (~alive[m]).float().expand(1, 1, -1) for m in mods}
                keep = {m: alive[m].float().expand(1, 1, -1) for m in mods}
                delta_on = {m: torch.ones(1, 1, device=device) for m in mods}
                delta_off = {m: torch.zeros(1, 1, device=device) for m in mods}
                acc_ablated = (model(tokens, ablate, delta_on).argmax(-1) == label).float().mean().item()
                acc_kept = (model(tokens, keep, delta_off).argmax(-1) == label).float().mean().item()
                name = "previous_token" if layer == 0 else "induction" if layer == n_layers - 1 else f"layer{layer}"
                out[f"{name}/n_subcomponents"] = int(sum(int(alive[m].sum()) for m in mods))
                for m in mods:
                    out[f"{name}/alive/{m.split('.')[-1]}"] = int(alive[m].sum())
                out[f"{name}/accuracy_ablated"] = acc_ablated
                out[f"{name}/accuracy_only_these"] = acc_kept
                if acc_ablated > chance + 0.1:
                    fails.append(f"{name}: ablating its {out[f'{name}/n_subcomponents']} subcomponents leaves "
                                 f"accuracy {acc_ablated:.3f} > chance {chance:.3f} + 0.1")  # fmt: skip
                if acc_kept < 0.9 * base:
                    fails.append(f"{name}: keeping only its subcomponents gives accuracy {acc_kept:.3f} "
                                 f"< 0.9 x target {base:.3f}")  # fmt: skip
        return out, fails

    return check


def induction_task(
    seed: int = 0,
    vocab: int = 24,
    seq_len: int = 16,
    d_model: int = 16,
    train_steps: int = 3000,
    train_batch_size: int = 256,
    train_lr: float = 3e-3,
    min_accuracy: float = 0.9,
    target_state: dict[str, Tensor] | None = None,
) -> Task:
    torch.manual_seed(seed)
    model = InductionTransformer(vocab, seq_len, d_model)
    info: dict[str, Any] = {"vocab": vocab, "seq_len": seq_len, "chance_accuracy": 1 / vocab}
    if target_state is not None:
        model.load_state_dict(target_state)
        model.requires_grad_(False)
        info["target_accuracy"] = accuracy(model, vocab, seq_len, torch.Generator().manual_seed(seed + 2))
    else:
        info["target_accuracy"] = train_induction(model, vocab, seq_len, seed, train_steps, train_batch_size, train_lr)
    if info["target_accuracy"] < min_accuracy:
        raise RuntimeError(
            f"induction target (seed {seed}) reaches accuracy {info['target_accuracy']:.3f} < {min_accuracy}: no "
            "induction circuit to decompose. Train longer (target.kwargs.train_steps) or try another seed."
        )

    def sample_batch(batch_size: int, g: torch.Generator) -> Tensor:
        return sample_sequences(batch_size, vocab, seq_len, g)[0]

    def metrics(tokens: Tensor, logits: Tensor) -> dict[str, Tensor]:
        label = memorised_token(tokens, vocab)
        correct = (logits.argmax(-1) == label).float()
        return {"loss": F.cross_entropy(logits, label, reduction="none"), "accuracy": correct}

    gt = GroundTruth(probe_inputs=None, checks=[ablation_check(vocab, seq_len, len(model.blocks))], info=dict(info))
    arch = {"class": "toy_models.induction:InductionTransformer",
            "kwargs": {"vocab": vocab, "seq_len": seq_len, "d_model": d_model}}  # fmt: skip
    return Task(model, sample_batch, gt, info, metrics, None, arch)


def memorised_token(tokens: Int[Tensor, "batch seq"], vocab: int) -> Int[Tensor, " batch"]:
    """The label of each sequence: the token right after the first induction token S (= vocab + 1)."""
    first = (tokens[:, 1:-1] == vocab + 1).int().argmax(-1) + 1
    return tokens[torch.arange(len(tokens)), first + 1]
