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
from spd.scale import ComputeCurve

BatchSampler = Callable[[int, torch.Generator], Any]
# (input batch, the model's output on it) -> per-sample values; "loss" is required, "accuracy" optional
TaskMetrics = Callable[[Any, Tensor], dict[str, Tensor]]
# (spec such as "only:3", number of samples, generator) -> an input batch from that slice of the data
Subsets = Callable[[str, int, torch.Generator], Any]


@dataclass
class Task:
    target: nn.Module
    sample_batch: BatchSampler  # (batch size, generator) -> model input
    ground_truth: GroundTruth | None = None
    info: dict[str, Any] = field(default_factory=dict)  # facts about the target, reported with evals
    metrics: TaskMetrics | None = None  # the target's own task loss (ablation reports; absent: divergence only)
    subsets: Subsets | None = None  # named slices of the data (forget/retain sets of ablation studies)
    # how to rebuild the target's class without spd: {"class": "module:Name", "kwargs": {...}}
    architecture: dict[str, Any] | None = None
    # held-out inputs for evaluation (absent: evaluation draws from `sample_batch` with its own seed)
    sample_eval_batch: BatchSampler | None = None
    # inputs are token ids (B, L) and the output next-token logits: evaluation adds CE and per-position metrics
    causal_lm: bool = False
    # the loss -> compute map of the target's family (spd.scale.ComputeCurve), built on demand (it may train a
    # ladder of models; absent: honest-scale reports leave equivalent compute out, or use a scaling law for LMs)
    compute_curve: Callable[[], ComputeCurve] | None = None
    # names of the parameters the target's training changed (natural degradation samples these; None: all)
    trained_parameters: list[str] | None = None

    @property
    def eval_sampler(self) -> BatchSampler:
        return self.sample_eval_batch or self.sample_batch


def batch_len(x: Any) -> int:
    """Inputs in a batch (a tensor, or a dict of tensors sharing the batch axis)."""
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def held_out(sample: BatchSampler, n: int, batch_size: int, seed: int) -> list[Any]:
    """A fixed set of `n` inputs from `sample`, in batches of at most `batch_size`."""
    g = torch.Generator().manual_seed(seed)
    return [sample(min(batch_size, n - i), g) for i in range(0, n, batch_size)]


def same_inputs(a: Task, b: Task, n: int = 64, seed: int = 0) -> bool:
    """Whether two tasks draw the same inputs from one generator seed (as far as one batch of n shows): two runs
    with equal target weights can still see different data, e.g. a toy whose input basis follows the task's
    seed (toy_models.cyclic) rebuilt with another seed around the same weights."""
    xa, xb = (t.sample_batch(n, torch.Generator().manual_seed(seed)) for t in (a, b))
    if isinstance(xa, dict) and isinstance(xb, dict):
        return xa.keys() == xb.keys() and all(torch.equal(xa[k], xb[k]) for k in xa)
    return isinstance(xa, Tensor) and isinstance(xb, Tensor) and torch.equal(xa, xb)


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
