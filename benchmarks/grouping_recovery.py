"""Grouping against ground truth over a range of resolutions: ARI of the MDL grouping for each alpha, and of the
hierarchical alternative for each Jaccard cut, on finished runs of toys with ground-truth mechanisms.

    python benchmarks/grouping_recovery.py RUN_DIR... [--alphas 1 1.5 2 2.5 3 4 8] [--out results.json]

One data pass per run (the run's eval batch size x n_batches samples, CI > eval.ci_threshold, alive = firing on
more than eval.alive_min_density of them), then every alpha / cut on the same binarised matrix.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from spd.cluster import adjusted_rand_index, hierarchical_groups, mdl_groups
from spd.ground_truth import mechanism_labels
from spd.mechanisms import binarise, importance_batches, truth_labels
from spd.run import load_run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--alphas", type=float, nargs="+", default=[1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 8.0])
    p.add_argument("--cuts", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for d in args.run_dirs:
        run = load_run(d)
        ev = run.config.eval
        t0 = time.perf_counter()
        ci = importance_batches(run.model, run.task.sample_batch, ev.batch_size * ev.n_batches, ev.batch_size,
                                run.config.seed)  # fmt: skip
        active, members = binarise(ci, ev.ci_threshold, ev.alive_min_density)
        truth, unexplained = truth_labels(members, mechanism_labels(run.model, run.task.ground_truth))
        true = [truth[m] for m in members]
        ari = {}
        for a in args.alphas:
            hist, _ = mdl_groups(active, a, restarts=args.restarts, seed=run.config.seed)
            ari[f"{a:g}"] = round(adjusted_rand_index(hist.labels(), true), 4)
        cut = {f"{t:g}": round(adjusted_rand_index(hierarchical_groups(active, t), true), 4) for t in args.cuts}
        row = {
            "run": str(d), "passed_decomposition": json.loads((Path(d) / "eval.json").read_text()).get("gt/passed"),
            "alive": len(members), "true_mechanisms": len(set(true)), "unexplained_alive": unexplained,
            "mdl_ari_by_alpha": ari, "hierarchical_ari_by_cut": cut, "seconds": round(time.perf_counter() - t0, 1),
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python benchmarks/grouping_recovery.py " + " ".join(
            args.run_dirs), "rows": rows}, indent=1) + "\n")  # fmt: skip
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
