"""Data parallelism over torch.distributed (launched by `torchrun`): one process per device, gradients averaged.

Each rank samples its own data and masks (seeds diverged by rank), computes the losses on its batch, and the
gradients of the decomposition (and of persistent adversarial masks) are averaged across ranks before every
optimizer step, so all ranks keep identical parameters; the effective batch is world_size x train.batch_size.
Rank 0 alone writes the run directory, logs, checkpoints and evaluates. Backend: NCCL on CUDA, gloo on the CPU.

The gradients are all-reduced by hand, flattened into one buffer per dtype, rather than through
DistributedDataParallel: the decomposition's forward runs the frozen target with patched modules several times
per step (stochastic, layerwise, adversarial passes), which does not fit DDP's one-forward-one-backward hooks.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

RANK_SEED_OFFSET = 1_000_033  # rank r's data and mask generators start from seed + r * offset


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment); returns whether it did.
    On CUDA each process takes the device LOCAL_RANK, so "cuda" in the config means that device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return active()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def leave(returncode: int) -> None:
    """End a torchrun worker: wait for every rank (rank 0 evaluates after training), leave the process group and
    exit at once. Exiting through interpreter finalisation instead aborts now and then ("terminate called without
    an active exception" from a c10d thread destroyed at exit, seen on CPU/gloo under load), failing the launch."""
    if not active():
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(returncode)


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: object) -> object:
    """Rank 0's value of `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[Tensor]) -> None:
    """Overwrite every rank's tensors with rank 0's."""
    if not active():
        return
    for t in tensors:
        dist.broadcast(t.data, src=0)


@torch.no_grad()
def average_gradients(tensors: Iterable[Tensor]) -> None:
    """Replace each tensor's .grad by its mean over ranks (a missing grad counts as zeros), one all-reduce per
    dtype over a flattened buffer."""
    if not active():
        return
    world = world_size()
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        if t.grad is None:
            t.grad = torch.zeros_like(t)
        by_dtype.setdefault((t.grad.dtype, t.grad.device), []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.grad.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for t in group:
            n = t.grad.numel()
            t.grad.copy_(flat[offset : offset + n].view_as(t.grad))
            offset += n
