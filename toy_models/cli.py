"""`spd toy ...`: train toy targets and reproduce the toy-model table.

    spd toy list
    spd toy train NAME [--seed S] [--out FILE]          train a target, save its state dict (safetensors)
    spd toy reproduce [--toys NAME ...] [--seeds 0 1 2 3 4] [--quick] [--device cuda]
                                                         decompose every toy for every seed; write
                                                         figures/toy_results.md, its JSON and CI-pattern figures
    spd toy import RESULTS.json ...                      put per-seed results of benchmarks/recovery.py (runs made
                                                         one seed per process, e.g. on several machines) into
                                                         that table, replacing those toys' rows

Unlike the toy models themselves this module drives the library (spd.config, spd.run); `spd` reaches it only
through `spd toy`, by module name.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from spd import io
from spd.config import load_config
from spd.ground_truth import probe_cis
from spd.run import decompose
from spd.task import build_task
from toy_models import TOYS

ROOT = Path(__file__).resolve().parents[1]
SHOWN = ("not_scored", "mmcs/", "ml2r/", "identity_ci_error/", "dense_ci_error/", "alive/", "neuron_contrib_",
         "previous_token/acc", "previous_token/n_sub", "induction/n_sub", "induction/acc",
         "accuracy/target", "extras/", "with_extras/")  # fmt: skip


def _toy(name: str) -> Any:
    if name not in TOYS:
        raise SystemExit(f"spd toy: unknown toy {name!r}; choose from: {', '.join(TOYS)}")
    return TOYS[name]


def cmd_list(args: argparse.Namespace) -> int:
    for name, toy in TOYS.items():
        print(f"{name:14s} {toy.description}  [configs/{toy.config}]")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    toy = _toy(args.name)
    cfg = load_config(toy.config_path, args.set)
    out = Path(args.out or f"targets/{args.name}-seed{args.seed}.safetensors")
    if out.exists() and not args.force:
        raise SystemExit(f"spd toy: {out} exists; pass --force to replace it or choose another --out")
    t0 = time.perf_counter()
    task = build_task(cfg.target.factory, cfg.target.kwargs, args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    io.save_tensors(out, task.target.state_dict())
    print(f"trained {args.name} (seed {args.seed}) in {time.perf_counter() - t0:.1f} s: {task.info}")
    print(f"saved to {out}; decompose it with: spd train configs/{toy.config} --set target.state_file={out} "
          f"--set seed={args.seed}")  # fmt: skip
    return 0


# ---- reproduce ---------------------------------------------------------------------------------------
def _shown(scores: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The scorer's headline keys (and `extra` ones) of a run's ground-truth scores (without the `gt/` prefix),
    floats rounded."""
    keys = SHOWN + extra
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items() if k.startswith(keys)}


def scores_row(results: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """What a results-table row holds of a run's results: pass/fail, the headline scores (plus `extra` keys),
    CI-L0 and the failures. Shared by `spd toy reproduce` and benchmarks/recovery.py."""
    gt = {k[3:]: v for k, v in results.items() if k.startswith("gt/")}
    row: dict[str, Any] = {"passed": gt.get("passed")} | _shown(gt, extra)
    row["ci_l0_total"] = round(results.get("ci_l0/total", float("nan")), 3)
    row["failures"] = gt.get("failures", [])
    return row


def _row(name: str, seed: int, results: dict[str, Any], wall: float) -> dict[str, Any]:
    row: dict[str, Any] = {"toy": name, "seed": seed, "passed": None, "wall_s": round(wall, 1)}
    return row | scores_row(results)  # existing keys keep their place


def _fmt(v: Any) -> str:
    return f"{v:.4f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


def write_markdown(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    lines = [
        "# Toy models: ground-truth recovery",
        "",
        "Written by `spd toy reproduce` (runs every toy) and `spd toy import` (adds per-seed results of "
        f"`benchmarks/recovery.py`). Total wall time {meta['total_wall_s'] / 60:.1f} min; each toy's section says "
        "how, where and when it ran.",
        "",
        "| toy | seeds passed | paper | wall time per seed (s) |",
        "|---|---|---|---|",
    ]
    by_toy: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_toy.setdefault(r["toy"], []).append(r)
    for name, rs in by_toy.items():
        walls = [r["wall_s"] for r in rs if r["wall_s"] is not None]
        span = f"{min(walls):.0f}–{max(walls):.0f}" if walls else "—"
        passed = f"{sum(bool(r['passed']) for r in rs)} / {len(rs)}"
        if any("with_extras/passed" in r for r in rs):
            passed += f" ({sum(bool(r.get('with_extras/passed')) for r in rs)} with the extra mechanisms allowed)"
        lines.append(f"| {name} | {passed} | {TOYS[name].paper} | {span} |")
    for name, rs in by_toy.items():
        skip = ("toy", "failures", "with_extras/failures", "note")
        keys = [k for k in dict.fromkeys(k for r in rs for k in r) if k not in skip]
        lines += ["", f"## {name}: {TOYS[name].description}", "", f"Config `configs/{TOYS[name].config}`"
                  + (f", overrides `{' '.join(meta['overrides'][name])}`" if meta["overrides"].get(name) else "")
                  + f"; run on {meta['runs_on'][name]}.", "", f"Command: `{meta['commands'][name]}`", "",
                  "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]  # fmt: skip
        for r in rs:
            lines.append("| " + " | ".join(_fmt(r.get(k, "—")) for k in keys) + " |")
        fails = [f"seed {r['seed']}: " + "; ".join(r["failures"]) for r in rs if r["failures"]]
        fails += [f"seed {r['seed']}, with the extra mechanisms allowed: " + "; ".join(r["with_extras/failures"])
                  for r in rs if r.get("with_extras/failures")]  # fmt: skip
        if fails:
            lines += ["", "Failures:", *[f"- {f}" for f in fails]]
        notes = [f"seed {r['seed']}: {r['note']}" for r in rs if r.get("note")]
        if notes:
            lines += ["", "Notes:", *[f"- {n}" for n in notes]]
        if (path.parent / "toy_ci" / f"{name}.png").exists():
            lines += ["", f"![{name} CI patterns](toy_ci/{name}.png)"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def plot_ci_patterns(run: Any, path: Path) -> bool:
    """Probe CIs of every decomposed module (alive subcomponents only), one panel per module."""
    gt = run.task.ground_truth
    if gt is None or gt.probe_inputs is None:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ci = probe_cis(run.model, gt)
    fig, axes = plt.subplots(1, len(ci), figsize=(3.2 * len(ci), 3.2), squeeze=False)
    for ax, (name, g) in zip(axes[0], ci.items(), strict=True):
        alive = (g > 0.1).any(0)
        shown = g[:, alive]
        order = shown.argmax(0).argsort(stable=True)  # columns sorted by the probe they fire on most
        ax.imshow(shown[:, order].numpy(), vmin=0, vmax=1, cmap="Blues", aspect="auto", interpolation="nearest")
        ax.set_title(f"{name}\n{int(alive.sum())} alive", fontsize=9)
        ax.set_xlabel("subcomponent (alive, sorted)")
        ax.set_ylabel("probe input")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def merge_table(
    out_json: Path, rows: list[dict[str, Any]], meta: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The new rows and meta merged into the table saved at `out_json`: its rows of other toys are kept."""
    if not out_json.is_file():
        return rows, meta
    names = {r["toy"] for r in rows}
    old = json.loads(out_json.read_text())
    kept = [r for r in old["runs"] if r["toy"] not in names]
    before = f"{old['meta']['device']}, torch {old['meta']['torch']}, {old['meta']['date']}"  # tables without runs_on
    meta = dict(meta)
    meta["overrides"] = {k: v for k, v in old["meta"]["overrides"].items() if k not in names} | meta["overrides"]
    meta["runs_on"] = {r["toy"]: old["meta"].get("runs_on", {}).get(r["toy"], before) for r in kept} | meta["runs_on"]
    meta["commands"] = {r["toy"]: old["meta"].get("commands", {}).get(r["toy"], old["meta"].get("command", "?"))
                        for r in kept} | meta["commands"]  # fmt: skip
    meta["total_wall_s"] += sum(r["wall_s"] or 0.0 for r in kept)
    return kept + rows, meta


def write_table(out_md: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """figures/toy_results.md and its JSON, toys in TOYS order."""
    order = list(TOYS)
    rows = sorted(rows, key=lambda r: order.index(r["toy"]))  # stable: seeds keep their order
    write_markdown(out_md, rows, meta)
    out_md.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    print(f"wrote {out_md} ({sum(bool(r['passed']) for r in rows)} of {len(rows)} runs passed)")


def cmd_reproduce(args: argparse.Namespace) -> int:
    names = args.toys or list(TOYS)
    for n in names:
        _toy(n)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    runs_root = Path(args.runs_dir or f"runs/reproduce-{time.strftime('%Y%m%d-%H%M%S')}")
    if runs_root.exists():
        raise SystemExit(f"spd toy: {runs_root} exists; choose another --runs-dir")
    out_md = Path(args.out)
    rows: list[dict[str, Any]] = []
    overrides: dict[str, list[str]] = {}
    t_all = time.perf_counter()
    if args.quick:
        skipped = [n for n in names if not TOYS[n].fast]
        if skipped:
            print(f"--quick: skipping {', '.join(skipped)} (no reduced schedule yet; run them without --quick)")
        names = [n for n in names if TOYS[n].fast]
    for name in names:
        toy = TOYS[name]
        overrides[name] = (toy.fast if args.quick else []) + list(args.set)
        for seed in args.seeds:
            cfg = load_config(toy.config_path, [*overrides[name], f"seed={seed}", f"train.device={device}"])
            t0 = time.perf_counter()
            run, results = decompose(cfg, runs_root / name / f"seed{seed}", progress=False)
            row = _row(name, seed, results, time.perf_counter() - t0)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if seed == args.seeds[0]:
                plot_ci_patterns(run, out_md.parent / "toy_ci" / f"{name}.png")
    dev = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    meta = {
        "commands": {name: "spd toy " + " ".join(args.argv) for name in names},
        "device": dev,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "total_wall_s": time.perf_counter() - t_all,
        "overrides": overrides,
        "runs_on": {name: f"{dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}" for name in names},
        "runs_dir": str(runs_root),
    }
    if args.merge:
        rows, meta = merge_table(out_md.with_suffix(".json"), rows, meta)
    write_table(out_md, rows, meta)
    return 0


# ---- import ------------------------------------------------------------------------------------------
def toy_of_config(config: str) -> str:
    """The toy whose shipped config a results file names (by file name: configs/tms_5-2.yaml -> tms_5-2)."""
    names = [n for n, t in TOYS.items() if t.config == Path(config).name]
    if not names:
        raise SystemExit(
            f"spd toy import: config {config!r} is not a toy's config; toys use: "
            + ", ".join(t.config for t in TOYS.values())
        )
    return names[0]


def read_recovery(path: Path) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """A `benchmarks/recovery.py --json-out` file as (toy, table rows, what to say about where it ran)."""
    try:
        data = json.loads(path.read_text())
        name = toy_of_config(data["config"])
        rows = []
        for r in data["runs"]:
            wall = r.get("wall_s") if r.get("wall_s") is not None else r.get("train_s")  # resumed runs: training
            row: dict[str, Any] = {"toy": name, "seed": r["seed"], "passed": r["passed"], "wall_s": wall}
            row |= _shown(r)
            if "ci_l0_total" in r:  # written by recovery.py since 2026-12-01
                row["ci_l0_total"] = r["ci_l0_total"]
            row["failures"] = r.get("failures", [])
            if r.get("note"):
                row["note"] = r["note"]
            rows.append(row)
    except FileNotFoundError:
        raise SystemExit(f"spd toy import: {path} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise SystemExit(
            f"spd toy import: {path} is not a results file of benchmarks/recovery.py (a JSON object with "
            "'config' and 'runs', each run with 'seed' and 'passed')"
        ) from None
    overrides = list(data.get("overrides", []))
    info = {
        "overrides": overrides,
        "runs_on": data.get("machine", "machine not recorded"),
        "command": data.get("command")
        or " ".join(["python benchmarks/recovery.py", data["config"], *(f"--set {o}" for o in overrides)]),
    }
    return name, rows, info


def cmd_import(args: argparse.Namespace) -> int:
    out_md = Path(args.out)
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {"overrides": {}, "runs_on": {}, "commands": {}, "total_wall_s": 0.0}
    for f in args.results:
        name, rs, info = read_recovery(Path(f))
        if name in meta["overrides"]:
            raise SystemExit(f"spd toy import: two files for toy {name!r}; give one file per toy")
        rows += rs
        meta["overrides"][name] = info["overrides"]
        meta["runs_on"][name] = f"{info['runs_on']} (from {f})"
        meta["commands"][name] = info["command"]
        meta["total_wall_s"] += sum(r["wall_s"] or 0.0 for r in rs)
    meta |= {"device": "see each toy", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    rows, meta = merge_table(out_md.with_suffix(".json"), rows, meta)
    write_table(out_md, rows, meta)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spd toy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="list the toys").set_defaults(fn=cmd_list)
    t = sub.add_parser("train", help="train a toy target and save it")
    t.add_argument("name")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="safetensors file (default targets/NAME-seedS.safetensors)")
    t.add_argument("--force", action="store_true", help="replace an existing file")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    t.set_defaults(fn=cmd_train)
    r = sub.add_parser("reproduce", help="decompose every toy over seeds and write the results table")
    r.add_argument("--toys", nargs="+", help=f"subset of: {', '.join(TOYS)}")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    r.add_argument("--quick", action="store_true", help="only toys with a reduced schedule, on that schedule")
    r.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every toy")
    r.add_argument("--out", default=str(ROOT / "figures" / "toy_results.md"))
    r.add_argument("--runs-dir", help="where the runs go (default runs/reproduce-<timestamp>)")
    r.add_argument("--merge", action="store_true", help="keep other toys' rows of the existing table")
    r.set_defaults(fn=cmd_reproduce)
    i = sub.add_parser("import", help="put results of benchmarks/recovery.py into the results table")
    i.add_argument("results", nargs="+", help="JSON files written by benchmarks/recovery.py --json-out")
    i.add_argument("--out", default=str(ROOT / "figures" / "toy_results.md"))
    i.set_defaults(fn=cmd_import)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    args.argv = argv
    return int(args.fn(args))
