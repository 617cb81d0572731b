"""Which matrices of a language model matter for a token class: zero each one (a whole matrix, e.g. every layer's
MLP output) and measure the next-token loss on the class's positions and on all other positions.

    python benchmarks/lm_zero_scan.py [--config configs/smollm2_cpu_l29.yaml] [--modules 'model.layers.*.mlp.down_proj']
                                      [--cls digits] [--n 32] [--out benchmarks/results/lm_zero_scan_digits.json]

A matrix worth decomposing for an unlearning study of the class is one whose removal raises the class's loss much
more than the rest's: `spd ablate` can only forget, by editing the decomposed matrices, as much as zeroing them
does. Uses the config's target and corpus (`make lm`); the sets are `next:CLASS` and `next-not:CLASS` of
`spd ablate` (--n rows each, seed 0 and 1). Passes replay everything before the zeroed matrix (`spd.replay`).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import time
from pathlib import Path

import torch

from spd.config import load_config
from spd.names import target_modules
from spd.replay import FixedPrefix
from spd.task import build_task
from spd.unlearning import load_data, measure, zeroed_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2_cpu_l29.yaml")
    ap.add_argument("--modules", default="model.layers.*.mlp.down_proj")
    ap.add_argument("--cls", default="digits")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    task = build_task(cfg.target.factory, cfg.target.kwargs, cfg.seed)
    original = task.target.eval()
    forget = load_data(f"next:{args.cls}", task.subsets, args.n, 0)
    retain = load_data(f"next-not:{args.cls}", task.subsets, args.n, 1)
    mods = [m for m in target_modules(original) if fnmatch.fnmatchcase(m, args.modules)]
    if not mods:
        raise SystemExit(f"--modules {args.modules!r} matches no module")
    t0 = time.perf_counter()
    with torch.no_grad():
        base_f = measure(original, original, forget, task.metrics, "kl", 8, divergence=False)["loss"]
        base_r = measure(original, original, retain, task.metrics, "kl", 8, divergence=False)["loss"]
    rows = []
    for m in mods:
        prefix = FixedPrefix(original, [m])
        z = zeroed_target(original, [m])
        f = measure(z, original, forget, task.metrics, "kl", 8, divergence=False, prefix=prefix)["loss"]
        r = measure(z, original, retain, task.metrics, "kl", 8, divergence=False, prefix=prefix)["loss"]
        row = {"module": m, "class_loss": f, "class_increase": f - base_f, "rest_loss": r, "rest_increase": r - base_r}
        row["ratio"] = row["class_increase"] / row["rest_increase"] if row["rest_increase"] > 0 else float("nan")
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append(row)
    out = {
        "config": args.config, "class": args.cls, "n_rows": args.n, "class_loss": base_f, "rest_loss": base_r,
        "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - t0, "zeroed": rows,
    }  # fmt: skip
    path = args.out or Path(f"benchmarks/results/lm_zero_scan_{args.cls}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
