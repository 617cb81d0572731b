"""Time and memory of grouping at scale, on synthetic co-importance data with planted mechanisms.

    python benchmarks/grouping_scale.py [--sizes 1000 10000] [--samples 20000] [--threads 1] [--naive-max 1000]

Each size runs in its own process (so peak RSS is that size's own). Planted data: mechanisms of 1-6 members, each
firing on 0.5-3% of samples; a member fires with its mechanism with probability 0.95, plus spurious firings at
0.05%. Reported: one full MDL merge history (to a single group), the hierarchical alternative, ARI of both against
the planted labels, and (up to --naive-max columns) a reference that rebuilds the whole k x k cost matrix on every
merge, which is what the incremental lower-bound bookkeeping avoids.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from spd.cluster import (
    adjusted_rand_index,
    coactivation,
    hierarchical_groups,
    mdl_merge,
    merge_cost_matrix,
    planted_mechanisms,
)

RESULTS = Path(__file__).parent / "results" / "grouping_scale.json"


def naive_greedy(active: torch.Tensor, alpha: float) -> list[float]:
    """Greedy merging that rebuilds the full cost matrix every merge (the reference the benchmark compares)."""
    n = active.shape[0]
    A = active.clone()
    ranks = torch.ones(active.shape[1], dtype=torch.float64)
    C = coactivation(A)
    mdl_costs = []
    while A.shape[1] > 1:
        cost = merge_cost_matrix(C, ranks, n, alpha)
        i, j = divmod(int(cost.argmin()), cost.shape[0])
        i, j = min(i, j), max(i, j)
        mdl_costs.append(cost[i, j].item())
        A[:, i] |= A[:, j]
        ranks[i] += ranks[j]
        keep = [x for x in range(A.shape[1]) if x != j]
        A, ranks = A[:, keep], ranks[keep]
        row = (A[:, i : i + 1].T.float() @ A.float()).long()[0]
        C = C[keep][:, keep]
        C[i], C[:, i] = row, row
    return mdl_costs


def one_size(c: int, n: int, alpha: float, naive_max: int) -> dict:
    active, truth = planted_mechanisms(n, c)
    out: dict = {"subcomponents": c, "samples": n, "planted_mechanisms": len(set(truth)), "alpha": alpha}
    t0 = time.perf_counter()
    hist = mdl_merge(active, alpha)
    out["mdl_seconds"] = time.perf_counter() - t0
    out["mdl_merges"] = len(hist.merges)
    out["mdl_found_mechanisms"] = c - hist.best_step
    out["mdl_ari"] = adjusted_rand_index(hist.labels(), truth)
    out["peak_rss_mb_after_mdl"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    hier = hierarchical_groups(active)
    out["hierarchical_seconds"] = time.perf_counter() - t0
    out["hierarchical_ari"] = adjusted_rand_index(hier, truth)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if c <= naive_max:
        t0 = time.perf_counter()
        costs = naive_greedy(active, alpha)
        out["naive_full_matrix_seconds"] = time.perf_counter() - t0
        # the same greedy objective (paths may part at exact ties, which each breaks its own way)
        curve = torch.tensor([hist.mdl[0], *costs], dtype=torch.float64).cumsum(0)
        out["naive_min_mdl_bits"], out["mdl_min_bits"] = curve.min().item(), hist.mdl[hist.best_step]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--naive-max", type=int, default=1000)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one_size(args.one, args.samples, args.alpha, args.naive_max)))
        return
    rows = []
    for c in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(c), "--samples", str(args.samples), "--alpha", str(args.alpha),
               "--threads", str(args.threads), "--naive-max", str(args.naive_max)]  # fmt: skip
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(json.dumps(row))
        rows.append(row)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s)",
        "command": "python " + " ".join(sys.argv),
        "rows": rows,
    }, indent=1) + "\n")  # fmt: skip
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
