"""Cost of APD's gradient attribution: one backward pass per output dimension (naive) vs batched backward passes.

    python benchmarks/apd_attribution.py [--configs configs/apd_tms_40-10.yaml ...] [--batch-sizes 2048 256]
                                         [--device cpu|cuda] [--repeats 5] [--json-out FILE]

For each config and batch size, times `gradient_attributions` with grad_chunk 1 (the naive loop the APD paper
describes) and with the automatic chunking (all output dimensions in batched backward passes, memory-capped),
checks that both give the same attributions, and times one full APD training step with the automatic chunking.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from spd.apd import gradient_attributions
from spd.config import load_config
from spd.run import build_model
from spd.task import build_task
from spd.train import build_optimizer, train_step


def timed(fn, repeats: int, device: str) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1000


def bench(model, cfg, x, device: str, repeats: int) -> dict:  # type: ignore[no-untyped-def]
    src = cfg.apd.attribution_source
    naive = gradient_attributions(model, x, src, 1)
    batched = gradient_attributions(model, x, src, 0)
    same = torch.allclose(naive, batched, rtol=1e-4, atol=1e-6 * float(naive.abs().max()))
    opt = build_optimizer(model, cfg)
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        loss, _, _ = train_step(model, x, cfg, gen, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.no_grad():
        d_out = model.target(x).shape[-1]
    return {
        "batch": x.shape[0],
        "d_out": d_out,
        "C": model.C,
        "naive_ms": timed(lambda: gradient_attributions(model, x, src, 1), repeats, device),
        "batched_ms": timed(lambda: gradient_attributions(model, x, src, 0), repeats, device),
        "same_attributions": bool(same),
        "train_step_ms": timed(step, repeats, device),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["configs/apd_tms_40-10.yaml", "configs/apd_resid_mlp1.yaml"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2048, 256])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json-out")
    args = p.parse_args()
    rows = []
    for path in args.configs:
        cfg = load_config(path)
        task = build_task(cfg.target.factory, cfg.target.kwargs, cfg.seed)
        model = build_model(cfg, task, args.device)
        for bs in args.batch_sizes:
            x = task.sample_batch(bs, torch.Generator().manual_seed(0)).to(args.device)
            row = {"config": path} | bench(model, cfg, x, args.device, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine()}  # fmt: skip
    print(json.dumps(meta))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
