"""Training-step throughput of a language-model decomposition: time per step, tokens per second, peak memory and
the fraction of the device's bf16 peak FLOP/s the step achieves.

    python benchmarks/lm_step.py [--config configs/smollm2.yaml] [--set k=v ...] [--steps 20] [--warmup 3]
                                 [--peak-tflops T] [--out benchmarks/results/lm_step_<device>.json] [--profile F]

One training step is timed exactly as `spd train` runs it (data, CI function, every loss, backward, AdamW), under
the config's bf16 setting. FLOPs are counted once with torch.utils.flop_counter.FlopCounterMode over a whole step
(forward and backward; matmuls and attention, which is what the counter sees), and divided by the measured step
time. Peak: --peak-tflops, or the dense bf16 figure of a known GPU (H100 SXM and H200: 989 TFLOP/s; H100 PCIe:
756; A100: 312). On the CPU no fraction is given.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from spd.config import load_config
from spd.run import build_model, peak_memory
from spd.task import build_task, to_device
from spd.train import build_optimizer, faithfulness_warmup, train_step

PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def device_peak(name: str) -> float | None:
    for key, v in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return v
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/smollm2.yaml")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--profile", metavar="FILE", help="then profile one step (bench_step.profile_step); table to FILE")
    args = p.parse_args()

    cfg = load_config(args.config, args.set)
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = torch.device(tc.device)
    t0 = time.perf_counter()
    task = build_task(cfg.target.factory, cfg.target.kwargs, cfg.seed)
    task.target.to(device)
    model = build_model(cfg, task)
    load_s = time.perf_counter() - t0
    faithfulness_warmup(model, tc.faithfulness_warmup.model_copy(update={"steps": 1}))
    opt = build_optimizer(model, cfg)
    data_gen = torch.Generator().manual_seed(0)
    mask_gen = torch.Generator(device=device).manual_seed(1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if tc.bf16 else nullcontext()
    cuda = device.type == "cuda"

    def step() -> int:
        x = to_device(task.sample_batch(tc.batch_size, data_gen), device)
        with autocast:
            loss, _, _ = train_step(model, x, cfg, mask_gen, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return x.numel()

    for _ in range(args.warmup):
        step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tokens = sum(step() for _ in range(args.steps))
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    peak = args.peak_tflops or (device_peak(name) if cuda else None)
    achieved = flops / seconds / 1e12
    out = {
        "config": args.config,
        "overrides": args.set,
        "device": name,
        "threads": torch.get_num_threads(),
        "bf16": tc.bf16,
        "batch_size": tc.batch_size,
        "tokens_per_step": tokens // args.steps,
        "seconds_per_step": seconds,
        "tokens_per_second": tokens / args.steps / seconds,
        "tflop_per_step": flops / 1e12,
        "achieved_tflops": achieved,
        "peak_bf16_tflops": peak,
        "fraction_of_peak": achieved / peak if peak else None,
        "load_seconds": load_s,
        "decomposed": {n: model.Cs[n] for n in model.module_names},
        "torch": torch.__version__,
    } | peak_memory()
    print(json.dumps(out, indent=2))
    dest = Path(args.out or f"benchmarks/results/lm_step_{'cuda' if cuda else 'cpu'}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    if args.profile:  # after the results are written: the profiler's own bookkeeping can be slow on a busy CPU
        from bench_step import profile_step  # benchmarks/ is this script's directory

        out["profile"] = profile_step(step, 1, device.type, args.profile)
        print(json.dumps(out["profile"]))
        dest.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
