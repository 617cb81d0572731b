"""Per-step time of a decomposition config (default TMS 5-2: C 20, batch 4096, the shipped config's losses).

    python benchmarks/bench_step.py [--config configs/tms_5-2.yaml] [--set k=v ...] [--steps 200]
                                    [--modes eager compile bf16 compile_bf16] [--device cpu|cuda]

Times `--steps` full training steps (data, CI, all losses, backward, AdamW) after `--warmup` steps, for each
mode, and prints ms/step and steps/s, plus the time to import spd and to answer `spd --help`.
Yardsticks (the public reference implementation, same configs): TMS 5-2 31 ms/step fp32 and 143 ms/step with
its default bf16 autocast on a 2-core CPU, 16.6 ms/step on an H100; ResidMLP 1 220 ms/step fp32 and 3.2 s/step
bf16 on the 2-core CPU, 18 ms/step on an H100.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch

from spd.config import load_config
from spd.run import build_model
from spd.task import build_task
from spd.train import build_optimizer, compile_ci_function, train_step

MODES = ["eager", "compile", "bf16", "compile_bf16"]  # bf16: autocast (train.bf16); compile: the CI function


def time_mode(mode: str, steps: int, warmup: int, device: str, config: str, overrides: list[str]) -> dict[str, float]:
    cfg = load_config(config, overrides)
    task = build_task(cfg.target.factory, cfg.target.kwargs, cfg.seed)
    model = build_model(cfg, task).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    data_gen = torch.Generator().manual_seed(0)
    if mode in ("compile", "compile_bf16"):
        compile_ci_function(model)
    opt = build_optimizer(model, cfg)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=mode.endswith("bf16"))

    def step() -> None:
        x = task.sample_batch(cfg.train.batch_size, data_gen).to(device)
        with autocast:
            loss, _, _ = train_step(model, x, cfg, gen, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    ms = (time.perf_counter() - t0) / steps * 1e3
    return {"ms_per_step": round(ms, 2), "steps_per_s": round(1e3 / ms, 1), "first_step_s": round(first, 2)}


def cli_times() -> dict[str, float]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spd.cli", "--help"], check=True, capture_output=True)
    help_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import spd.run"], check=True, capture_output=True)
    return {"spd_help_s": round(help_s, 2), "import_spd_run_s": round(time.perf_counter() - t0, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tms_5-2.yaml")
    p.add_argument("--set", action="append", default=None, help="config overrides (default for TMS: a short target)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=MODES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    overrides = (
        args.set if args.set is not None else (["target.kwargs.train_steps=2000"] if "tms" in args.config else [])
    )
    out = {
        "config": args.config,
        "overrides": overrides,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for mode in args.modes:
        out[mode] = time_mode(mode, args.steps, args.warmup, args.device, args.config, overrides)
        print(mode, out[mode], flush=True)
    out |= cli_times()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
