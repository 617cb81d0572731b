"""Data parallelism over torch.distributed, on the CPU with the gloo backend and 2 processes (torchrun)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

from spd import io
from tests.helpers import ROOT, tiny_tms_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port = str(free_port())  # a fixed port can still be held by an earlier run's socket
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_two_ranks_draw_different_data_and_keep_identical_parameters(tmp_path):
    res = torchrun("tests/ddp_worker.py", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    r0 = io.load_tensors(tmp_path / "rank0.safetensors")
    r1 = io.load_tensors(tmp_path / "rank1.safetensors")
    assert not torch.equal(r0.pop("first_batch"), r1.pop("first_batch"))  # seeds diverged per rank
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # gradients averaged: one model on every rank
    # the same run in one process (rank 0's data only) ends elsewhere: rank 1's gradients counted
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    single.mkdir()
    res = subprocess.run([sys.executable, "tests/ddp_worker.py", str(single)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    s0 = io.load_tensors(single / "rank0.safetensors")
    assert torch.equal(s0.pop("first_batch"), io.load_tensors(tmp_path / "rank0.safetensors")["first_batch"])
    assert any(not torch.equal(s0[k], r0[k]) for k in r0)


def test_spd_train_under_torchrun_writes_one_run(tmp_path):
    import yaml

    cfg_path = tmp_path / "tms.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_tms_config(steps=20, threads=1)))
    res = torchrun("-m", "spd.cli", "train", str(cfg_path), "--out", str(tmp_path / "run"), "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("run directory:") == 1 and "data parallel over 2 processes" in res.stdout
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert "recon/stochastic_all" in results
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_0000009", "step_0000019"]
