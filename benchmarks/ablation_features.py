"""Per-feature unlearning on a toy run: for every feature, ablate what the data choose on "only this feature" vs
"this feature off", and compare with the neuron and gradient-ascent baselines at the same forget loss.

    python benchmarks/ablation_features.py RUN_DIR [--grouping RUN_DIR/grouping-alpha2.json] [--neurons GLOB]
        [--features 0 1 2] [--out benchmarks/results/ablation_features_NAME]

Writes NAME.json and NAME.md (the per-feature table; toy_models.unlearning has the criteria).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from spd import io
from spd.ablate import Rule
from spd.mechanisms import load_grouping
from spd.run import load_run
from toy_models.unlearning import feature_study, markdown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--grouping", help="a grouping-alpha*.json: choose among its mechanisms (default: subcomponents)")
    p.add_argument("--neurons", help="glob of decomposed modules whose output units the neuron baseline may zero")
    p.add_argument("--features", type=int, nargs="*")
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--forget-min", type=float, default=0.5)
    p.add_argument("--retain-max", type=float, default=0.05)
    p.add_argument("--min-ratio", type=float, default=10.0)
    p.add_argument("--ga-lr", type=float, default=1e-3, help="Adam learning rate of the gradient-ascent baseline")
    p.add_argument("--out", required=True, help="path stem for .json and .md")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    run = load_run(a.run_dir)
    grouping = load_grouping(a.grouping) if a.grouping else None
    t0 = time.perf_counter()
    res = feature_study(run, grouping, a.features, Rule(a.threshold, a.forget_min, a.retain_max, a.min_ratio),
                        neuron_modules=a.neurons, ga_lr=a.ga_lr)  # fmt: skip
    res |= {
        "run_dir": a.run_dir,
        "grouping": a.grouping,
        "neurons": a.neurons,
        "ga_lr": a.ga_lr,
        "seconds": time.perf_counter() - t0,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    io.write_json(out.with_suffix(".json"), res)
    out.with_suffix(".md").write_text(markdown(res, f"Per-feature unlearning: {Path(a.run_dir).name}"))
    print(markdown(res, Path(a.run_dir).name).split("\n| feature")[0])
    print({k: v for k, v in res["summary"].items()})


if __name__ == "__main__":
    main()
