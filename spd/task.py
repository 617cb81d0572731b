"""What a target provider hands the trainer, and resolution of "module:function" factories.

A factory is any callable `factory(seed=..., target_state=None, **kwargs) -> Task`. When `target_state` is
given (a state dict saved with an earlier run), the factory must load it instead of training or
downloading, so a saved run reloads offline and bit-identically.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from spd.ground_truth import GroundTruth

BatchSampler = Callable[[int, torch.Generator], Any]


@dataclass
class Task:
    target: nn.Module
    sample_batch: BatchSampler  # (batch size, generator) -> model input
    ground_truth: GroundTruth | None = None
    info: dict[str, Any] = field(default_factory=dict)  # facts about the target, reported with evals


def to_device(x: Any, device: torch.device) -> Any:
    """Move a batch (a tensor, or a dict of tensors such as tokenizer output) to `device`."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def resolve_factory(spec: str) -> Callable[..., Task]:
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as err:
        raise ValueError(
            f"target.factory {spec!r}: cannot import module {mod_name!r} ({err}); run from the repository "
            "root or install the package that provides it"
        ) from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ValueError(f"target.factory {spec!r}: module {mod_name!r} has no callable {attr!r}")
    return fn  # type: ignore[no-any-return]


def build_task(factory: str, kwargs: dict[str, Any], seed: int, target_state: dict[str, Tensor] | None = None) -> Task:
    fn = resolve_factory(factory)
    task = fn(**{"seed": seed, **kwargs}, target_state=target_state)
    if not isinstance(task, Task):
        raise TypeError(f"target.factory {factory!r} returned {type(task).__name__}, expected spd.task.Task")
    return task
