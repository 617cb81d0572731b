"""Tiny language models for tests, trained here in about a second each: a transformers Llama saved with
save_pretrained, and a TransformerLens native model (TransformerBridge.boot_native) saved as a state dict.

The corpus is an arithmetic-progression language: each row starts at a random token and steps by 1, 2 or 3 (mod
the vocabulary), so a trained model predicts everything after the first two tokens almost perfectly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from spd import io
from spd.losses import next_token_ce

VOCAB, SEQ = 32, 16
TL_CONFIG: dict[str, Any] = {
    "n_layers": 2, "d_model": 32, "n_heads": 2, "d_head": 16, "d_mlp": 64, "d_vocab": VOCAB, "n_ctx": SEQ,
    "act_fn": "gelu", "seed": 0,
}  # fmt: skip


def progression_corpus(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(SEQ)) % VOCAB


def fit(model: torch.nn.Module, rows: torch.Tensor, steps: int = 200) -> float:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        x = rows[torch.randint(len(rows), (64,))]
        out = model(x)
        loss = next_token_ce(out.logits if hasattr(out, "logits") else out, x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def word_tokenizer() -> Any:
    """A word-level tokenizer over the VOCAB tokens "t0" ... "t31" (t0 doubles as BOS and unknown)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", unk_token="t0", pad_token="t0")


def tiny_llama(n_layers: int = 2) -> Any:
    """An untrained Llama of width 32 over the test vocabulary (eager attention, untied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False,
            attn_implementation="eager",
        )
    )  # fmt: skip


def make_lm_assets(root: Path) -> dict[str, Path]:
    """tokens.safetensors, a trained tiny Llama directory and a trained TL native state dict under `root`."""
    from transformer_lens.model_bridge import TransformerBridge

    rows = progression_corpus(1024)
    io.save_tensors(root / "tokens.safetensors", {"input_ids": rows})
    torch.manual_seed(0)
    llama = tiny_llama()
    fit(llama, rows)
    llama.save_pretrained(root / "llama")
    word_tokenizer().save_pretrained(root / "llama")
    bridge = TransformerBridge.boot_native(dict(TL_CONFIG))
    fit(bridge, rows)
    io.save_tensors(root / "tl_state.safetensors", bridge.state_dict())
    return {"tokens": root / "tokens.safetensors", "llama": root / "llama", "tl_state": root / "tl_state.safetensors"}


def lm_config(target: dict[str, Any], patterns: list[str], C: int = 40, steps: int = 40) -> dict[str, Any]:
    return {
        "seed": 0,
        "target": target,
        "decomposition": {
            "modules": [{"pattern": p, "C": C} for p in patterns],
            "ci_fn": {"type": "mlp", "hidden": [8]},
        },
        "losses": [
            {"name": "stochastic_recon", "coeff": 1.0, "routing": "all"},
            {"name": "stochastic_recon", "coeff": 1.0, "routing": "layerwise"},
            {"name": "importance_minimality", "coeff": 1e-3, "p": 1.0},
        ],
        "output_loss": "kl",
        "train": {"steps": steps, "batch_size": 16, "log_every": 10, "faithfulness_warmup": {"steps": 100}},
        "eval": {"batch_size": 32, "n_batches": 2, "adversarial": {"n_steps": 3}},
        # `spd eval`'s honest scale runs SGLD chains on the target: small ones here (the defaults, 400 steps at
        # batch 1024 on 8192 sequences, took ~130 s of the test suite on this tiny model)
        "natural": {
            "n_steps": 40,
            "burnin": 20,
            "draw_every": 5,
            "batch_size": 32,
            "n_eval": 128,
            "eval_batch_size": 64,
            "max_chains": 6,
            "hessian_iters": 5,
        },
    }
