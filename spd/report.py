"""Compare runs: settled-window values, a Pareto front of adversarial reconstruction vs CI-L0, a table.

A run's value for a metric is the mean over the logged points in the last `window` fraction of its steps
(periodic evals, `train.eval_every`; the final evaluation is logged too), never one last noisy point; the number
of points averaged is reported with it. Runs are labelled by the config values that differ between them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from spd import io
from spd.base_config import read_yaml
from spd.log import read_metrics


def settled(history: list[dict[str, Any]], key: str, window: float) -> tuple[float | None, int]:
    """Mean of `key` over rows in the last `window` fraction of the logged steps, and how many rows that was."""
    rows = [(r["step"], r[key]) for r in history if isinstance(r.get(key), int | float)]
    if not rows:
        return None, 0
    last = rows[-1][0]
    vals = [v for s, v in rows if s >= (1 - window) * last]
    return float(np.mean(vals)), len(vals)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        return {k: v for key, val in d.items() for k, v in _flatten(val, f"{prefix}{key}.").items()}
    if isinstance(d, list):
        return {k: v for i, val in enumerate(d) for k, v in _flatten(val, f"{prefix}{i}.").items()}
    return {prefix[:-1]: d}


def collect(run_dir: Path, window: float = 0.2) -> dict[str, Any]:
    """One row of the report for a run directory."""
    if not (run_dir / io.CONFIG).is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no {io.CONFIG})")
    history = read_metrics(run_dir / io.METRICS)
    final = json.loads((run_dir / io.EVAL).read_text()) if (run_dir / io.EVAL).is_file() else {}
    cfg = read_yaml(run_dir / io.CONFIG)
    adv_keys = sorted({k for r in history for k in r if k.startswith("eval/recon/adversarial_all@")})
    adv_keys = adv_keys or [f"eval/{k}" for k in final if k.startswith("recon/adversarial_all@")]
    row: dict[str, Any] = {"run": str(run_dir), "config": _flatten(cfg), "output_loss": cfg.get("output_loss", "mse")}
    row["losses"] = [_loss_label(loss) for loss in cfg.get("losses", [])]
    for name, key in (("ci_l0", "eval/ci_l0/total"), ("stochastic", "eval/recon/stochastic_all")):
        row[name], row[f"{name}_n"] = settled(history, key, window)
    if adv_keys:
        row["adversarial"], row["adversarial_n"] = settled(history, adv_keys[0], window)
        row["budget"] = adv_keys[0].split("@", 1)[1]
    else:
        row["adversarial"], row["adversarial_n"], row["budget"] = None, 0, None
    row["gt_passed"] = final.get("gt/passed")
    row["diagnostics"] = final.get("diagnostics", [])
    row["finished"] = bool(final)
    return row


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (x, y), both minimised, sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _loss_label(loss: dict[str, Any]) -> str:
    routing = loss.get("routing")
    label = loss.get("name", "?") + (f"/{routing}" if routing not in (None, "all") else "")
    return label + (f"[{loss['modules']}]" if loss.get("modules") is not None else "")


def varying(rows: list[dict[str, Any]]) -> list[str]:
    """Config keys whose values differ between the runs. When the runs' loss lists differ, per-loss keys
    (losses.i.*) are not comparable by position: the pseudo-key `losses` (the extra losses) stands for them."""
    keys = sorted({k for r in rows for k in r["config"]})
    if len({tuple(r["losses"]) for r in rows}) > 1:
        keys = ["losses"] + [k for k in keys if not k.startswith("losses.")]
    return [k for k in keys if k == "losses" or len({json.dumps(r["config"].get(k), default=str) for r in rows}) > 1]


def label(row: dict[str, Any], keys: list[str], rows: list[dict[str, Any]] | None = None) -> str:
    parts = []
    for k in keys:
        if k == "losses":
            common = set.intersection(*(set(r["losses"]) for r in rows or [row]))
            extra = [name for name in row["losses"] if name not in common]
            parts.append("+" + ", +".join(extra) if extra else "base losses")
        else:
            parts.append(f"{k}={row['config'].get(k)}")
    return ", ".join(parts) or Path(row["run"]).name


def _by_seed(keys: list[str]) -> bool:
    """Whether seeds vary beside other settings (the figure then groups each setting's seeds)."""
    return "seed" in keys and len(keys) > 1


def point_labels(points: list[dict[str, Any]], keys: list[str], rows: list[dict[str, Any]]) -> list[str | None]:
    """Annotation per plotted run: when seeds vary beside other settings, each setting is named once (at its
    first run, without the seed; seeds are told apart by marker shape), else every run by its varying keys."""
    if not _by_seed(keys):
        return [label(r, keys, rows) for r in points]
    named: set[str] = set()
    out: list[str | None] = []
    for r in points:
        text = label(r, [k for k in keys if k != "seed"], rows)
        out.append(None if text in named else text)
        named.add(text)
    return out


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(rows: list[dict[str, Any]], out: Path, window: float = 0.2) -> dict[str, Path]:
    """report.md, report.json and (when any run has an adversarial number) report.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    keys = varying(rows)
    budgets = {r["budget"] for r in rows if r["budget"] is not None}
    plotted = [r for r in rows if r["adversarial"] is not None and r["ci_l0"] is not None]
    front = {id(plotted[i]) for i in pareto_front([(r["ci_l0"], r["adversarial"]) for r in plotted])}
    metric = rows[0]["output_loss"] if rows else "mse"
    lines = [
        "# Runs compared",
        "",
        f"Values are means over the last {window:.0%} of each run's steps (n = points averaged). Adversarial "
        f"reconstruction ({metric}) uses fresh PGD masks shared across each eval batch, budget "
        f"{', '.join(sorted(budgets)) or 'none'} (steps x step size).",
        "",
    ]
    if len(budgets) > 1:
        lines += [f"**Warning**: the runs were evaluated with different adversarial budgets ({sorted(budgets)}); "
                  "their adversarial numbers are not comparable.", ""]  # fmt: skip
    lines += [
        "| run | CI-L0 (n) | stochastic recon | adversarial recon (n) | Pareto | ground truth | warnings |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["ci_l0"] is None, r["ci_l0"] or 0.0)):
        gt = {True: "pass", False: "fail", None: "—"}[r["gt_passed"]]
        lines.append(
            f"| {label(r, keys, rows)} | {_fmt(r['ci_l0'])} ({r['ci_l0_n']}) | {_fmt(r['stochastic'])} | "
            f"{_fmt(r['adversarial'])} ({r['adversarial_n']}) | {'yes' if id(r) in front else ''} | {gt} | "
            f"{'; '.join(r['diagnostics']) or 'none'} |"
        )
    paths = {"md": out / "report.md", "json": out / "report.json"}
    paths["md"].write_text("\n".join(lines) + "\n")
    io.write_json(paths["json"], {"window": window, "varying": keys, "runs": rows})
    if plotted:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.5))
        ys = [r["adversarial"] for r in plotted]
        # seeds of one setting sit close together: one marker shape per seed, the setting named once
        by_seed = _by_seed(keys)
        seeds = sorted({str(r["config"].get("seed")) for r in plotted}) if by_seed else [""]
        shapes = "osD^v<>pP*" * (len(seeds) // 10 + 1)
        for seed, marker in zip(seeds, shapes, strict=False):
            group = [r for r in plotted if not by_seed or str(r["config"].get("seed")) == seed]
            ax.scatter([r["ci_l0"] for r in group], [r["adversarial"] for r in group], marker=marker, zorder=3,
                       c=["tab:red" if id(r) in front else "tab:gray" for r in group])  # fmt: skip
        fr = sorted((r for r in plotted if id(r) in front), key=lambda r: r["ci_l0"])
        ax.step([r["ci_l0"] for r in fr], [r["adversarial"] for r in fr], where="post", color="tab:red", lw=1)
        for r, text in zip(plotted, point_labels(plotted, keys, rows), strict=True):
            if text is not None:
                ax.annotate(text, (r["ci_l0"], r["adversarial"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
        if by_seed:  # marker shapes only (colour says Pareto: red on the front, grey off it)
            from matplotlib.lines import Line2D

            ax.legend(handles=[Line2D([], [], marker=m, ls="", color="black", label=f"seed {sd}")
                               for sd, m in zip(seeds, shapes, strict=False)], fontsize=7)  # fmt: skip
        if min(ys) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("CI-L0 per input (all matrices)")
        ax.set_ylabel(f"adversarial reconstruction ({metric}, PGD {', '.join(sorted(budgets))})")
        ax.set_title("Pareto front: fewer important subcomponents vs worst-case faithfulness", fontsize=9)
        fig.tight_layout()
        paths["png"] = out / "report.png"
        fig.savefig(paths["png"], dpi=150)
        plt.close(fig)
    return paths
