"""Trained toy targets: looked up before training, keyed by toy, recipe and seed.

Two places are searched: `toy_models/targets/` (small targets shipped in the repository, made by the same
recipe with `spd toy train`, so CI and new users skip minutes of target training) and, when the environment
variable SPD_TARGET_CACHE names a directory, that directory (written after training; `spd toy reproduce` uses
one per reproduction). The key includes a hash of every recipe argument, so a changed recipe never picks up a
stale target.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

SHIPPED = Path(__file__).resolve().parent / "targets"
CACHE_ENV = "SPD_TARGET_CACHE"


def target_key(toy: str, seed: int, recipe: dict[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{toy}-{digest}-seed{seed}.safetensors"


def trained_target(toy: str, seed: int, recipe: dict[str, Any], train: Callable[[], dict[str, Tensor]]
                   ) -> tuple[dict[str, Tensor], str]:  # fmt: skip
    """The state dict for (toy, recipe, seed) and where it came from: "shipped", "cache" or "trained"."""
    key = target_key(toy, seed, recipe)
    if (SHIPPED / key).is_file():
        return load_file(str(SHIPPED / key)), "shipped"
    cache = os.environ.get(CACHE_ENV)
    if cache and (Path(cache) / key).is_file():
        return load_file(str(Path(cache) / key)), "cache"
    state = train()
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(cache) / key))
    return state, "trained"
