"""The `spd` command line: a thin layer over spd.run. Heavy imports happen inside the commands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DESCRIPTION = """\
spd: stochastic parameter decomposition of trained networks.

  spd train CONFIG [--out DIR] [--set key.path=value ...]   decompose the target a YAML config names
  spd resume RUN_DIR                                        continue a crashed/stopped run from its last checkpoint
  spd eval RUN_DIR [--json]                                 evaluate a run (ground-truth scores for toy targets)
  spd toy list | train NAME | reproduce                     toy models with known ground truth (`spd toy -h`)

Example (TMS 5-2 on the CPU, about a minute):
  spd train configs/tms_5-2.yaml --out runs/tms && spd eval runs/tms
"""

SUMMARY_KEYS = (
    "mmcs/",
    "ml2r/",
    "identity_ci_error/",
    "dense_ci_error/",
    "alive/",
    "n_represented",
    "n_features",
    "neuron_contrib_",
    "accuracy/",
    "previous_token/",
    "induction/",
)


def _print_summary(results: dict[str, Any], path: Path | None) -> None:
    gt = {k[3:]: v for k, v in results.items() if k.startswith("gt/")}
    print()
    if path is not None:
        print(f"run directory: {path}")
    if "train_seconds" in results:
        print(f"training wall time: {results['train_seconds']:.1f} s")
    print(
        "faithfulness (relative Frobenius error) per matrix: "
        + ", ".join(f"{k.split('/', 1)[1]} {v:.2e}" for k, v in results.items() if k.startswith("faithfulness_rel/"))
    )
    print(
        "CI-L0 per matrix: "
        + ", ".join(
            f"{k.split('/', 1)[1]} {v:.2f}" for k, v in results.items() if k.startswith("ci_l0/") and "total" not in k
        )
    )
    print(
        f"recon MSE: stochastic {results['recon/stochastic_all']:.3g}, CI-masked {results['recon/ci']:.3g}, "
        f"unmasked {results['recon/ones']:.3g}, zero-ablated {results['recon/zeros']:.3g}"
    )
    if gt:
        print("ground truth:")
        for k, v in gt.items():
            if k.startswith(SUMMARY_KEYS):
                print(f"  {k:36s} {v:.4f}" if isinstance(v, float) else f"  {k:36s} {v}")
        verdict = "PASS" if gt["passed"] else "FAIL: " + "; ".join(gt["failures"])
        print(f"ground-truth recovery: {verdict}")


def _default_out(config: str) -> Path:
    base = Path("runs") / f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, i = base, 1
    while out.exists():
        out, i = Path(f"{base}-{i}"), i + 1
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from spd.config import load_config
    from spd.run import decompose

    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else _default_out(args.config)
    print(f"decomposing {cfg.target.factory} into {out}")
    run, results = decompose(cfg, out, progress=not args.quiet)
    _print_summary(results, out)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from spd.run import resume

    run, results = resume(args.run_dir, progress=not args.quiet)
    _print_summary(results, Path(args.run_dir))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from spd.run import load_run

    run = load_run(args.run_dir)
    results = run.evaluate() | {f"target/{k}": v for k, v in run.task.info.items()}
    if args.json:
        json.dump(results, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        _print_summary(results, Path(args.run_dir))
    return 0


def cmd_toy(args: argparse.Namespace) -> int:
    import importlib

    # toy_models is a sibling package (installed with spd from the repository), reached by name only.
    try:
        toy_cli = importlib.import_module("toy_models.cli")
    except ImportError as err:
        print(f"spd toy: the toy_models package is not importable ({err}); install spd from its repository",
              file=sys.stderr)  # fmt: skip
        return 2
    rest = args.toy_args[1:] if args.toy_args[:1] == ["--"] else args.toy_args
    return int(toy_cli.main(rest))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spd", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="decompose the target named in a YAML config")
    t.add_argument("config", help="YAML run config, e.g. configs/tms_5-2.yaml")
    t.add_argument("--out", help="run directory to create (default: runs/<config>-<timestamp>); never overwritten")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=2000 --set losses.0.coeff=2",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)
    r = sub.add_parser("resume", help="continue a run from its last checkpoint")
    r.add_argument("run_dir")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(fn=cmd_resume)
    e = sub.add_parser("eval", help="evaluate a finished run")
    e.add_argument("run_dir")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.set_defaults(fn=cmd_eval)
    t = sub.add_parser("toy", help="toy models: list, train NAME, reproduce", add_help=False)
    t.add_argument("toy_args", nargs=argparse.REMAINDER)
    t.set_defaults(fn=cmd_toy)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["toy"]:  # everything after `toy` (including -h) belongs to the toy CLI
        argv = ["toy", "--", *argv[1:]]
    args = parser().parse_args(argv)
    from spd.base_config import ConfigError
    from spd.io import RunDirError

    try:
        return int(args.fn(args))
    except (ConfigError, RunDirError, FileNotFoundError) as err:
        print(f"spd: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
