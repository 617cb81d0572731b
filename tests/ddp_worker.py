"""Run by tests/test_distributed.py under torchrun (gloo, CPU): train a tiny TMS decomposition data-parallel and
save, per rank, the trained parameters and the first batch that rank drew."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from spd import distributed, io
from spd.config import load_config
from spd.run import build_model
from spd.task import build_task
from spd.train import train
from tests.helpers import tiny_tms_config

out = Path(sys.argv[1])
distributed.init_from_env("cpu")
cfg = load_config(tiny_tms_config(steps=5, threads=1))
task = build_task(cfg.target.factory, cfg.target.kwargs, cfg.seed)
model = build_model(cfg, task)
first: list[torch.Tensor] = []


def sample(batch_size: int, gen: torch.Generator) -> torch.Tensor:
    x = task.sample_batch(batch_size, gen)
    if not first:
        first.append(x)
    return x


train(model, sample, cfg, progress=False)
state = model.trainable_state_dict() | {"first_batch": first[0]}
io.save_tensors(out / f"rank{distributed.rank()}.safetensors", state)
distributed.leave(0)  # a no-op in the single-process comparison run
