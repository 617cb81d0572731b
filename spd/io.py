"""Run directories and checkpoints: safetensors for tensors, YAML/JSON for everything else.

A run directory holds:
    config.yaml          the resolved config
    target.safetensors   the target's weights (a toy factory reloads them instead of retraining); absent when
                         the config records the weight files' source and hashes (target.source)
    metrics.jsonl        one JSON object per logged step
    checkpoints/step_NNNNNNN/{state.safetensors, state.json}   for resuming (model, optimizer, RNG)
    model.safetensors    the final decomposition (components + CI function)
    eval.json            the final evaluation
Nothing here unpickles or executes code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

CONFIG, TARGET, MODEL, METRICS, EVAL, CKPTS = (
    "config.yaml", "target.safetensors", "model.safetensors", "metrics.jsonl", "eval.json", "checkpoints",
)  # fmt: skip


class RunDirError(FileExistsError):
    pass


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    # clone() breaks storage sharing (tied weights) so safetensors can write every key.
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return load_file(str(path))


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def prepare_run_dir(path: Path) -> None:
    """Create a fresh run directory; refuse to reuse one that already holds a run."""
    if path.exists() and any(path.iterdir()):
        raise RunDirError(
            f"run directory {str(path)!r} already holds files; nothing was overwritten. Resume it with "
            f"`spd resume {path}`, or pass another --out"
        )
    path.mkdir(parents=True, exist_ok=True)


# ---- checkpoints -------------------------------------------------------------------------------------
def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [  # a captured optimizer (train.cuda_graph) holds its learning rate as a 0-d tensor
        {k: (v.item() if isinstance(v, Tensor) else v) for k, v in g.items()} for g in sd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: Path, step: int, model_state: dict[str, Tensor], opt: torch.optim.Optimizer,
    generators: dict[str, torch.Generator], keep: int, adversaries: dict[int, Any] | None = None,
) -> Path:  # fmt: skip
    ckpts = run_dir / CKPTS
    final = ckpts / f"step_{step:07d}"
    tmp = ckpts / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt_tensors, opt_meta = _optimizer_to_flat(opt)
    tensors = {f"model.{k}": v for k, v in model_state.items()} | opt_tensors
    tensors |= {f"rng.{k}": g.get_state() for k, g in generators.items()}
    for i, adv in (adversaries or {}).items():  # persistent adversarial masks (losses.i), with their optimiser state
        tensors |= {f"adversary.{i}.{k}": v for k, v in adv.state_dict().items()}
    save_tensors(tmp / "state.safetensors", tensors)
    write_json(tmp / "state.json", {"step": step, "optimizer": opt_meta})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a checkpoint directory either exists complete or not at all
    for old in sorted(ckpts.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CKPTS).glob("step_*"))
    return found[-1] if found else None


def load_model_state(model: torch.nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """Load components and CI function (everything but the target, which is stored separately)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("target.")]
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model (missing {missing}, unexpected {unexpected})")


def checkpoint_model_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}


def load_checkpoint(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, generators: dict[str, torch.Generator],
    adversaries: dict[int, Any] | None = None,
) -> int:  # fmt: skip
    tensors = load_tensors(path / "state.safetensors")
    for i, adv in (adversaries or {}).items():
        prefix = f"adversary.{i}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"{path} holds no state for the persistent adversary of losses.{i}")
        adv.load_state_dict(state)
    meta = json.loads((path / "state.json").read_text())
    load_model_state(model, checkpoint_model_state(tensors), path)
    _optimizer_from_flat(opt, tensors, meta["optimizer"])
    for k, g in generators.items():
        g.set_state(tensors[f"rng.{k}"])
    return int(meta["step"])
