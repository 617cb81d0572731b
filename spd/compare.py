"""`spd compare RUN_DIR ...`: one table for finished runs on the same target (SPD and APD side by side).

Reads each run's eval.json and config.yaml (no re-evaluation): method, ground-truth scores, CI-L0, stochastic and
adversarial reconstruction, alive (sub)components, wall time and peak memory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from spd import io
from spd.base_config import ConfigError, read_yaml


def target_fingerprint(run_dir: Path) -> str:
    """sha256 of the run's target weights (two runs decompose the same target iff these match): of its saved copy,
    or, for targets reloaded from recorded weight files (language models), of those files' recorded hashes."""
    if (run_dir / io.TARGET).is_file():
        return hashlib.sha256((run_dir / io.TARGET).read_bytes()).hexdigest()[:12]
    source = (read_yaml(run_dir / io.CONFIG).get("target") or {}).get("source") or {}
    if not source.get("sha256"):
        raise FileNotFoundError(f"run {str(run_dir)!r} has neither {io.TARGET} nor a recorded target source")
    return hashlib.sha256(json.dumps(source["sha256"], sort_keys=True).encode()).hexdigest()[:12]


def _mean(results: dict[str, Any], prefix: str) -> float | None:
    vals = [v for k, v in results.items() if k.startswith(prefix) and isinstance(v, int | float)]
    return sum(vals) / len(vals) if vals else None


def row(run_dir: Path) -> dict[str, Any]:
    """The comparison numbers of one finished run."""
    if not (run_dir / io.EVAL).is_file():
        raise ConfigError(f"{str(run_dir)!r} has no {io.EVAL}: not a finished run (finish it with `spd resume`)")
    res = json.loads((run_dir / io.EVAL).read_text())
    cfg = read_yaml(run_dir / io.CONFIG)
    method = cfg.get("method", "spd")
    alive = {k.removeprefix("alive/"): v for k, v in res.items() if k.startswith("alive/") and "*" not in k}
    # An APD component spans every matrix, so it is counted once; SPD subcomponents are counted per matrix.
    n_alive = max(alive.values(), default=None) if method == "apd" else sum(alive.values())
    adv = {k: v for k, v in res.items() if k.startswith("recon/adversarial_all@")}
    out: dict[str, Any] = {
        "run": run_dir.name,
        "method": method,
        "target": target_fingerprint(run_dir),
        "mmcs": _mean(res, "gt/mmcs/"),
        "ml2r": _mean(res, "gt/ml2r/"),
        "own_component": _mean(res, "gt/own_component/"),
        "ci_l0": res.get("ci_l0/total"),
        "recon_ci": res.get("recon/ci"),
        "recon_stochastic": res.get("recon/stochastic_all"),
        "recon_adversarial": next(iter(adv.values()), None),
        "adversarial_budget": next(iter(adv), "recon/adversarial_all@-").split("@")[1],
        "alive": n_alive,
        "train_seconds": res.get("train_seconds"),
        "peak_rss_mb": res.get("peak_rss_mb"),
        "peak_cuda_mb": res.get("peak_cuda_mb"),
        "gt_passed": res.get("gt/passed"),
    }
    return out


COLUMNS = [
    ("run", "run", "{}"),
    ("method", "method", "{}"),
    ("mmcs", "MMCS", "{:.4f}"),
    ("ml2r", "ML2R", "{:.3f}"),
    ("own_component", "features with own component", "{:.0f}"),
    ("ci_l0", "L0 (per input, all matrices)", "{:.3f}"),
    ("recon_stochastic", "stochastic recon", "{:.3g}"),
    ("recon_adversarial", "adversarial recon", "{:.3g}"),
    ("alive", "alive", "{}"),
    ("train_seconds", "wall s", "{:.0f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("peak_cuda_mb", "peak CUDA MB", "{:.0f}"),
]


def compare(run_dirs: list[str | Path], any_target: bool = False) -> list[dict[str, Any]]:
    rows = [row(Path(d)) for d in run_dirs]
    targets = {r["target"] for r in rows}
    if len(targets) > 1 and not any_target:
        which = ", ".join(f"{r['run']}: {r['target']}" for r in rows)
        raise ConfigError(
            f"these runs decompose different targets (weights sha256 {which}); compare runs of one target, or "
            "pass --any-target to tabulate them anyway"
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = ["—" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    budgets = sorted({r["adversarial_budget"] for r in rows if r["recon_adversarial"] is not None})
    notes = []
    if budgets:
        notes.append(f"Adversarial recon: all-module PGD, budget {' / '.join(budgets)}" + (
            " (budgets differ: not comparable)" if len(budgets) > 1 else ""))  # fmt: skip
    notes.append("alive: SPD counts subcomponents over all matrices, APD counts components (each spans them all).")
    if any(r.get("peak_rss_mb") is not None for r in rows):
        notes.append("Peak RSS is the training process's, Python and torch baseline included.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
