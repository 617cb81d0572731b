"""Per-step time of a decomposition config (default TMS 5-2: C 20, batch 4096, the shipped config's losses).

    python benchmarks/bench_step.py [--config configs/tms_5-2.yaml] [--set k=v ...] [--steps 200]
                                    [--modes eager compile compile_unfused bf16 compile_bf16 graph graph_static]
                                    [--device cpu|cuda]

Times `--steps` full training steps (data, CI, all losses, backward, AdamW) after `--warmup` steps, for each
mode, and prints ms/step and steps/s, plus the time to import spd and to answer `spd --help`. With `--rounds R`
every variant is timed R times, interleaved, and the median is reported (`--reuse both` adds each mode without
the clean-pass reuse of `spd.reuse`, for before/after figures on one loaded host). `--profile FILE` then profiles
`--profile-steps` steps of the first variant with torch.profiler (CUDA kernels too on a GPU) and writes its op
table to FILE, with the op and kernel counts per step and the busy fraction of the GPU: where a step waits on the
host (launches, Python) rather than on arithmetic.
`graph` (CUDA only) is the `compile` step as `train.cuda_graph` runs it (spd.graphs.GraphedStep: captured once as
a CUDA graph and replayed; the batch is sampled on the CPU as in training and copied into the graph's input);
`graph_static` feeds the same batch every step (no sampling: about the GPU's own time per step). Each reports the
mean loss over the first and last tenth of its steps (finite, and falling) and whether the capture succeeded (a
failed one falls back to eager steps).
Yardsticks (the public reference implementation, same configs): TMS 5-2 31 ms/step fp32 and 143 ms/step with
its default bf16 autocast on a 2-core CPU, 16.6 ms/step on an H100; ResidMLP 1 220 ms/step fp32 and 3.2 s/step
bf16 on the 2-core CPU, 18 ms/step on an H100.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from spd.config import load_config
from spd.graphs import GraphedStep
from spd.run import build_model
from spd.task import build_task, to_device
from spd.train import build_optimizer, compile_ci_function, train_step

# bf16: autocast (train.bf16); compile: the CI function (spd.train.compile_ci_function); compile_unfused: the CI
# function compiled as a whole module, inductor deriving its backward (what compile did before spd.ci._Kernels)
MODES = ["eager", "compile", "compile_unfused", "bf16", "compile_bf16", "graph", "graph_static"]


def make_step(mode: str, device: str, config: str, overrides: list[str], reuse: bool = True) -> Callable[[], None]:
    """One full training step of `config` in `mode` (reuse: masked passes take clean outputs, the default)."""
    cfg = load_config(config, overrides)
    task = build_task(cfg.target.factory, cfg.target.kwargs, cfg.seed)
    model = build_model(cfg, task).to(device)
    model.reuse_clean = reuse
    gen = torch.Generator(device=device).manual_seed(0)
    data_gen = torch.Generator().manual_seed(0)
    if mode in ("compile", "compile_bf16"):
        compile_ci_function(model)
    elif mode == "compile_unfused":
        nets = getattr(model.ci_fn, "nets", None)
        for net in nets.values() if nets is not None else [model.ci_fn]:
            net.compile(dynamic=False)
    if mode.startswith("graph"):
        return _graph_step(cfg, task, model, device, data_gen, static=mode == "graph_static")
    opt = build_optimizer(model, cfg)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=mode.endswith("bf16"))

    def step() -> None:
        x = to_device(task.sample_batch(cfg.train.batch_size, data_gen), torch.device(device))
        with autocast:
            loss, _, _ = train_step(model, x, cfg, gen, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def _graph_step(cfg: Any, task: Any, model: Any, device: str, data_gen: torch.Generator, static: bool
                ) -> Callable[[], None]:  # fmt: skip
    """The compiled training step as the trainer runs it with train.cuda_graph (spd.graphs.GraphedStep): eager
    warm-up steps, then the captured graph replayed. `static`: the same batch every step (no sampling)."""
    if not device.startswith("cuda"):
        raise ValueError("--modes graph and graph_static need --device cuda")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"cuda_graph": True})})
    compile_ci_function(model)
    opt = build_optimizer(model, cfg)  # capturable, learning rate a device tensor
    gen = torch.Generator(device=device).manual_seed(0)

    def body(x: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        loss, terms, ci = train_step(model, x, cfg, gen, 0.5)
        loss.backward()
        opt.step()
        return loss, terms, ci

    graphed = GraphedStep(body, opt, gen)
    dev = torch.device(device)
    fixed = to_device(task.sample_batch(cfg.train.batch_size, data_gen), dev)
    losses: list[torch.Tensor] = []

    def step() -> None:
        x = fixed if static else to_device(task.sample_batch(cfg.train.batch_size, data_gen), dev)
        loss, _, _ = graphed(x)
        losses.append(loss.detach().clone())
        torch.cuda.synchronize()

    step.losses = losses  # type: ignore[attr-defined]
    step.graphed = graphed  # type: ignore[attr-defined]
    return step


def timed(step: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - t0


def time_variants(variants: dict[str, Callable[[], None]], steps: int, warmup: int, rounds: int
                  ) -> dict[str, dict[str, float]]:  # fmt: skip
    """Time every variant `rounds` times, interleaved (so a change in the host's load hits all of them alike),
    `steps` steps each after `warmup`; report the median round."""
    first = {k: timed(step, 1) for k, step in variants.items()}
    for step in variants.values():
        timed(step, warmup)
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, step in variants.items():
            per_round[k].append(timed(step, steps) / steps * 1e3)
    out = {}
    for k, ms in per_round.items():
        med = statistics.median(ms)
        out[k] = {"ms_per_step": round(med, 2), "steps_per_s": round(1e3 / med, 1), "first_step_s": round(first[k], 2)}
        if rounds > 1:
            out[k]["ms_per_round"] = [round(m, 2) for m in ms]
    return out


def profile_step(step: Callable[[], object], n: int, device: str, path: str) -> dict[str, float]:
    """torch.profiler over `n` steps: ops and kernels per step, host wall per step, and the summed kernel time over
    the wall time (near 1: the GPU is the bottleneck; small: the host is). Also used by lm_step.py."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0  # includes the profiler's own overhead
    ev = prof.key_averages()
    out = {"profile_steps": n, "profiled_ms_per_step": round(wall / n * 1e3, 2),
           "aten_ops_per_step": round(sum(e.count for e in ev if e.key.startswith("aten::")) / n, 1)}  # fmt: skip
    sort = "self_cpu_time_total"
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.time_range.elapsed_us() for e in kernels)
        out |= {"cuda_kernels_per_step": round(len(kernels) / n, 1),
                "gpu_busy_fraction": round(busy_us * 1e-6 / wall, 3)}  # fmt: skip
        sort = "self_device_time_total"
    with open(path, "w") as f:
        f.write(json.dumps(out) + "\n" + ev.table(sort_by=sort, row_limit=40) + "\n")
        f.write(ev.table(sort_by="count", row_limit=25) + "\n")
    return out


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
    p.add_argument("--rounds", type=int, default=1, help="time each variant this many times, interleaved; median")
    p.add_argument("--reuse", choices=["on", "off", "both"], default="on",
                   help="masked passes take the outputs of modules before the first replaced one from the clean "
                   "pass (on, the default), recompute them (off), or time both ('MODE/noreuse')")  # fmt: skip
    p.add_argument("--profile", metavar="FILE", help="also profile the first variant; op table to FILE")
    p.add_argument("--profile-steps", type=int, default=5)
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
    variants = {}
    for mode in args.modes:
        for reuse in {"on": [True], "off": [False], "both": [True, False]}[args.reuse]:
            key = mode if reuse else f"{mode}/noreuse"
            try:
                variants[key] = make_step(mode, args.device, args.config, overrides, reuse)
            except Exception as e:  # a mode this machine cannot run (e.g. a failed capture): say why, time the rest
                if len(args.modes) == 1:
                    raise
                out[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
    out |= time_variants(variants, args.steps, args.warmup, args.rounds)
    for k, step in variants.items():
        if hasattr(step, "losses") and step.losses:  # graph modes: the replayed loss, first and last tenth
            ls = torch.stack(step.losses).float().cpu()
            n = max(1, len(ls) // 10)
            out[k] |= {"loss_first": round(ls[:n].mean().item(), 6), "loss_last": round(ls[-n:].mean().item(), 6),
                       "loss_finite": bool(torch.isfinite(ls).all()),
                       "captured": step.graphed.graph is not None}  # fmt: skip
    if args.profile:
        out["profile"] = profile_step(next(iter(variants.values())), args.profile_steps, args.device, args.profile)
    out |= cli_times()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
