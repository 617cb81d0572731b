"""Stochastic-only vs adversarially trained decompositions, compared at one evaluation budget.

    python benchmarks/adversarial.py configs/tms_5-2.yaml --seeds 0 1 2 --json-out benchmarks/results/adv_tms.json

Variants (each on the same config and seeds):
  stochastic   the config as shipped;
  fresh_pgd    + pgd_recon (all and layerwise), 1 step of size 1 from random init, shared across the batch
               (the reference's training setting);
  persistent   + persistent_pgd_recon (all and layerwise), sign updates of size 0.1 per training step.
Every run is evaluated with the config's eval budget (default PGD 20 steps x 0.1, shared across each batch);
the script prints one JSON line per run and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from spd.base_config import read_yaml
from spd.config import load_config
from spd.run import decompose, load_run

VARIANTS: dict[str, list[dict[str, Any]]] = {
    "stochastic": [],
    "fresh_pgd": [
        {"name": "pgd_recon", "coeff": 1.0, "routing": r, "n_steps": 1, "step_size": 1.0} for r in ("all", "layerwise")
    ],
    "persistent": [
        {"name": "persistent_pgd_recon", "coeff": 1.0, "routing": r, "update": "sign", "lr": 0.1}
        for r in ("all", "layerwise")
    ],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--runs-dir", type=Path, help="keep run directories here; existing finished runs are re-evaluated")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    rows = []
    for variant in args.variants:
        for seed in args.seeds:
            raw = read_yaml(args.config)
            raw["losses"] = list(raw["losses"]) + VARIANTS[variant]
            cfg = load_config(raw, [*args.set, f"seed={seed}"])
            run_dir = args.runs_dir / f"{Path(args.config).stem}-{variant}-seed{seed}" if args.runs_dir else None
            t0 = time.perf_counter()
            if run_dir is not None and (run_dir / "eval.json").is_file():
                res = load_run(run_dir).evaluate()
                res["train_seconds"] = json.loads((run_dir / "eval.json").read_text()).get("train_seconds")
            else:
                _, res = decompose(cfg, run_dir, progress=False)
            row = {"variant": variant, "seed": seed, "train_s": res.get("train_seconds"),
                   "wall_s": round(time.perf_counter() - t0, 1), "budget": res.get("recon/adversarial_budget"),
                   "gt_passed": res.get("gt/passed"), "diagnostics": res.get("diagnostics")}  # fmt: skip
            row |= {k: v for k, v in res.items() if k.startswith(("recon/adversarial_", "recon/stochastic_", "ci_l0/"))
                    and isinstance(v, float)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    adv_keys = sorted({k for r in rows for k in r if k.startswith("recon/adversarial_")})
    print(f"\nbudget: {rows[0]['budget']}\n")
    print(
        "| variant | seed | CI-L0 total | stochastic (all) | "
        + " | ".join(k.removeprefix("recon/adversarial_") for k in adv_keys)
        + " | GT |"
    )
    print("|---|---|---|---|" + "---|" * len(adv_keys) + "---|")
    for r in rows:
        adv = " | ".join(f"{r.get(k, float('nan')):.3g}" for k in adv_keys)
        gt = {True: "pass", False: "fail", None: "—"}[r["gt_passed"]]
        l0, stoch = r["ci_l0/total"], r["recon/stochastic_all"]
        print(f"| {r['variant']} | {r['seed']} | {l0:.3f} | {stoch:.3g} | {adv} | {gt} |")
    if args.json_out:
        summary = {"config": args.config, "set": args.set, "runs": rows}
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
