"""Ground-truth recovery over seeds: decompose a toy config once per seed and count the runs that pass.

    python benchmarks/recovery.py configs/tms_5-2.yaml --seeds 0 1 2 3 4 [--set train.steps=4000 ...]

A `--set` value may name the seed as {seed}, e.g. `--set train.init_from=runs/resid_mlp2-seed{seed}` (a new
tail on each seed's finished run).

Prints one line per seed and a JSON summary (also written with --json-out; it records the command and the machine,
and `spd toy import FILE` puts it into figures/toy_results.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from spd.config import load_config
from spd.run import decompose
from toy_models.cli import scores_row

# beside the scores `spd toy` shows for every toy (TMS, ResidMLP, cyclic, induction)
INFORMATIONAL = ("dense_ci_entries_below/", "dense_sum_rel")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--json-out", type=Path)
    p.add_argument("--runs-dir", type=Path, help="keep each seed's run directory here (re-score with `spd eval`)")
    args = p.parse_args()
    rows = []
    device = "cpu"
    for seed in args.seeds:
        cfg = load_config(args.config, [*(o.replace("{seed}", str(seed)) for o in args.set), f"seed={seed}"])
        device = cfg.train.device
        t0 = time.perf_counter()
        run_dir = args.runs_dir / f"{Path(args.config).stem}-seed{seed}" if args.runs_dir else None
        _, res = decompose(cfg, run_dir, progress=False)
        wall = time.perf_counter() - t0
        row = {
            "seed": seed,
            "passed": res["gt/passed"],
            "wall_s": round(wall, 1),
            "train_s": round(res["train_seconds"], 1),
        }
        row |= scores_row(res, INFORMATIONAL)
        rows.append(row)
        print(json.dumps(row), flush=True)
    machine = (
        torch.cuda.get_device_name(device)
        if device.startswith("cuda")
        else f"{os.cpu_count()}-core {platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    summary = {
        "config": args.config,
        "overrides": args.set,
        "command": " ".join(["python benchmarks/recovery.py", *sys.argv[1:]]),
        "machine": f"{machine}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
        "passed": sum(r["passed"] for r in rows),
        "of": len(rows),
        "runs": rows,
    }
    line = f"passed {summary['passed']} of {summary['of']}"
    if with_extras := [bool(r["with_extras/passed"]) for r in rows if "with_extras/passed" in r]:
        summary["passed_with_extras"] = sum(with_extras)  # the target's extra mechanisms allowed (see its scorer)
        line += f" ({sum(with_extras)} with the extra mechanisms allowed)"
    print(line)
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
