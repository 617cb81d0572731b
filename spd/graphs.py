"""The training step as one CUDA graph (`train.cuda_graph`): captured once, then replayed every step.

On a GPU the toy steps are host-bound: ResidMLP 1 at batch 2048 keeps an H200 busy ~1 ms of a 19.5 ms step (255
kernels launched from Python, 597 aten ops; `benchmarks/bench_step.py --profile`). Replaying the step as a graph
launches it with one call. What a graph needs, and what this module arranges:

- static inputs: each batch is copied into one device buffer the graph reads;
- no host work inside the step: the learning rate is a device tensor (AdamW with `capturable=True`) filled before
  each replay, and the config must not anneal anything by training fraction (`p_final`, `width_final`), since
  a graph replays the fraction it was captured with;
- graph-safe random numbers: the mask generator is registered with the graph, so every replay draws new masks;
- a few eager steps (on a side stream) before the capture, so lazily built state (compiled kernels, cuBLAS
  workspaces, optimizer moments) exists and is not allocated inside it.

If the capture fails (an operation that waits on the host, an old torch), the run says why and continues eagerly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

WARMUP_STEPS = 3  # eager steps on a side stream before the capture

StepOutputs = tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]


def graph_unsupported(cfg: Any) -> str | None:
    """Why `cfg` cannot run its training step as a CUDA graph, or None."""
    if not str(cfg.train.device).startswith("cuda"):
        return f"train.cuda_graph needs train.device cuda (got {cfg.train.device!r}); set train.cuda_graph=false"
    annealed = [
        f"losses.{i} ({c.name})"
        for i, c in enumerate(cfg.losses)
        if getattr(c, "p_final", None) is not None or getattr(c, "width_final", None) is not None
    ]
    if annealed:
        return (
            f"train.cuda_graph: {', '.join(annealed)} anneal by training fraction, which a captured step cannot "
            "follow (it replays the fraction it was captured with); drop p_final/width_final or the graph"
        )
    if cfg.apd is not None and cfg.apd.topk_final is not None:
        return (
            "train.cuda_graph: apd.topk_final anneals top-k by training fraction, which a captured step cannot "
            "follow; drop apd.topk_final or the graph"
        )
    if any(c.name == "persistent_pgd_recon" for c in cfg.losses):
        return "train.cuda_graph does not cover persistent_pgd_recon (its masks step outside the training step)"
    return None


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate, in place where it is a device tensor (a captured optimizer reads it)."""
    for group in opt.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def tensor_lr(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Make every group's learning rate a 0-d tensor on `device` (after a checkpoint restored it as a float)."""
    for group in opt.param_groups:
        if not isinstance(group["lr"], Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)


def _copy_into(dst: Any, src: Any) -> None:
    if isinstance(dst, Tensor):
        dst.copy_(src, non_blocking=True)
    else:  # a dict of tensors (token ids, attention masks)
        for k, v in dst.items():
            v.copy_(src[k], non_blocking=True)


def _clone(x: Any) -> Any:
    return x.clone() if isinstance(x, Tensor) else {k: v.clone() for k, v in x.items()}


class GraphedStep:
    """Runs `body(x)` (forward, backward and optimizer step of one batch, returning the loss, its terms and the
    lower CIs) eagerly for WARMUP_STEPS steps, then captures it and replays the graph from then on.

    `generator`: the generator `body` draws its masks from; it is registered with the graph. `call()` returns
    `body`'s outputs (after a capture, the graph's static outputs, refreshed by each replay)."""

    def __init__(self, body: Callable[[Any], StepOutputs], opt: torch.optim.Optimizer, generator: torch.Generator
                 ) -> None:  # fmt: skip
        self.body, self.opt, self.generator = body, opt, generator
        self.x: Any = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: StepOutputs | None = None
        self.eager = False  # capture failed: every step runs eagerly
        self.steps = 0

    def __call__(self, x: Any) -> StepOutputs:
        if self.eager:
            self.opt.zero_grad(set_to_none=True)
            return self.body(x)
        if self.x is None:
            self.x = _clone(x)
        else:
            _copy_into(self.x, x)
        self.steps += 1
        if self.graph is not None:
            self.graph.replay()
            assert self.out is not None
            return self.out
        if self.steps <= WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.opt.zero_grad(set_to_none=True)
                out = self.body(self.x)
            torch.cuda.current_stream().wait_stream(side)
            return out
        return self._capture()

    def _capture(self) -> StepOutputs:
        graph = torch.cuda.CUDAGraph()
        try:
            if not hasattr(graph, "register_generator_state"):
                raise RuntimeError(f"torch {torch.__version__} cannot register a generator with a CUDA graph")
            graph.register_generator_state(self.generator)
            torch.cuda.synchronize()
            self.opt.zero_grad(set_to_none=True)  # the captured backward then writes the gradients on every replay
            with torch.cuda.graph(graph):
                out = self.body(self.x)
        except Exception as e:  # fall back to eager steps rather than lose the run
            warnings.warn(f"train.cuda_graph: capturing the step failed ({type(e).__name__}: {e}); "
                          "continuing without a graph", stacklevel=3)  # fmt: skip
            self.eager = True
            self.opt.zero_grad(set_to_none=True)
            with contextlib.suppress(RuntimeError):  # an aborted capture may leave an error behind; the step tells
                torch.cuda.synchronize()
            return self.body(self.x)
        self.graph, self.out = graph, out
        graph.replay()  # capturing records the step without running it
        return out
