"""The `spd` command line: a thin layer over spd.run. Heavy imports happen inside the commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DESCRIPTION = """\
spd: parameter decomposition of trained networks (SPD, and APD with `method: apd` in the config).

  spd train CONFIG [--out DIR] [--set key.path=value ...]   decompose the target a YAML config names
  spd resume RUN_DIR                                        continue a crashed/stopped run from its last checkpoint
  spd eval RUN_DIR [--json] [--save]                        evaluate a run (ground truth, adversarial, diagnostics)
  spd sweep CONFIG --grid KEY=V1,V2 [--seeds N] [--jobs J]  run a grid of configs, each in its own directory
  spd report RUN_DIR... [--out DIR]                         settled-window table and Pareto figure for runs
  spd compare RUN_DIR... [--out DIR]                        one table for runs on one target (SPD vs APD)
  spd group RUN_DIR... [--alpha A]                          group subcomponents into mechanisms (MDL), score them
  spd ablate RUN_DIR --forget DATA --retain DATA            remove what the components do on DATA; export the edit
  spd degrade CONFIG|RUN_DIR --loss L | --compute-fraction F  a naturally degraded (SGLD) target at a chosen loss
  spd toy list | train NAME | reproduce                     toy models with known ground truth (`spd toy -h`)

Example (TMS 5-2 on the CPU, about a minute):
  spd train configs/tms_5-2.yaml --out runs/tms && spd eval runs/tms
"""

SUMMARY_KEYS = (
    "not_scored",
    "mmcs/",
    "ml2r/",
    "identity_ci_error/",
    "dense_ci_error/",
    "alive/",
    "orphaned/",
    "n_represented",
    "n_features",
    "own_component/",
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
        f"recon: stochastic {results['recon/stochastic_all']:.3g}, CI-masked {results['recon/ci']:.3g}, "
        f"unmasked {results['recon/ones']:.3g}, zero-ablated {results['recon/zeros']:.3g}"
    )
    adv = {k: v for k, v in results.items() if k.startswith("recon/adversarial_") and isinstance(v, float)}
    if adv:
        print(
            f"adversarial recon ({results['recon/adversarial_budget']}): "
            + ", ".join(f"{k.removeprefix('recon/adversarial_')} {v:.3g}" for k, v in adv.items())
        )
    if "lm/ce/target" in results:
        kinds = [k.removeprefix("lm/kl/") for k in results if k.startswith("lm/kl/")]
        print(f"language model: target next-token CE {results['lm/ce/target']:.4f} nats; per mask (all matrices):")
        for kind in kinds:
            print(
                f"  {kind:12s} KL {results[f'lm/kl/{kind}']:.4f}  CE diff {results[f'lm/ce_diff/{kind}']:+.4f}  "
                f"CE unrecovered {results.get(f'lm/ce_unrecovered/{kind}', float('nan')):.3f}"
            )
        print(f"  (CE unrecovered baseline: {results.get('lm/ce_unrecovered_baseline')})")
    if gt:
        print("ground truth:")
        for k, v in gt.items():
            if k.startswith(SUMMARY_KEYS):
                print(f"  {k:36s} {v:.4f}" if isinstance(v, float) else f"  {k:36s} {v}")
        verdict = "PASS" if gt["passed"] else "FAIL: " + "; ".join(gt["failures"])
        print(f"ground-truth recovery: {verdict}")
    diagnostics = results.get("diagnostics") or []
    print("diagnostics: " + ("none fired" if not diagnostics else f"{len(diagnostics)} warning(s)"))
    for d in diagnostics:
        print(f"  WARNING {d}")


def _unused(stem: Path, suffix: str = "") -> Path:
    """stem + suffix, or stem-1 + suffix, stem-2 + suffix, ...: the first that does not exist."""
    out, i = Path(f"{stem}{suffix}"), 1
    while out.exists():
        out, i = Path(f"{stem}-{i}{suffix}"), i + 1
    return out


def _default_out(config: str) -> Path:
    return _unused(Path("runs") / f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def cmd_train(args: argparse.Namespace) -> int:
    from spd import distributed
    from spd.config import load_config
    from spd.run import decompose

    cfg = load_config(args.config, args.set)
    parallel = distributed.init_from_env(cfg.train.device)  # under torchrun: data parallel over its processes
    out = Path(args.out) if args.out else _default_out(args.config)
    out = Path(str(distributed.broadcast_object(str(out))))  # one directory, named by rank 0
    if distributed.is_main():
        ranks = f" (data parallel over {distributed.world_size()} processes)" if parallel else ""
        print(f"decomposing {cfg.target.factory} into {out}{ranks}")
    run, results = decompose(cfg, out, progress=not args.quiet)
    if distributed.is_main():
        _print_summary(results, out)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from spd import distributed
    from spd.config import load_config
    from spd.run import resume

    distributed.init_from_env(load_config(Path(args.run_dir) / "config.yaml").train.device)
    run, results = resume(args.run_dir, progress=not args.quiet)
    if distributed.is_main():
        _print_summary(results, Path(args.run_dir))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from spd.run import load_run

    run = load_run(args.run_dir, args.device)
    if args.save and run.checkpoint_step is not None:
        print(
            f"error: {args.run_dir} is unfinished (its latest checkpoint is step {run.checkpoint_step}); --save writes "
            f"only a finished run's eval.json. Finish it with `spd resume {args.run_dir}`",
            file=sys.stderr,
        )
        return 2
    results = run.evaluate() | {f"target/{k}": v for k, v in run.task.info.items()}
    if not args.no_honest_scale and run.task.metrics is not None:
        results["honest_scale"] = run.honest_scale(natural=not args.no_natural)
    if args.save:
        results = _save_eval(Path(args.run_dir), results)
    if args.json:
        json.dump(results, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        _print_summary(results, Path(args.run_dir))
        if "honest_scale" in results:
            from spd.honest import markdown

            print()
            print(markdown(results["honest_scale"]))
    return 0


# facts about training, not the evaluation: carried over when a run is re-evaluated
_TRAINING_KEYS = ("train_seconds", "method", "peak_rss_mb", "peak_cuda_mb")


def _save_eval(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Make `results` the run's eval.json (what `spd report`, `spd compare` and `spd sweep` read), keeping the
    training facts of the previous one; the previous file is kept beside it as eval.<time>.json."""
    from spd import io

    path = run_dir / io.EVAL
    if path.is_file():
        old = json.loads(path.read_text())
        results = {k: old[k] for k in _TRAINING_KEYS if k in old} | results
        kept = _unused(run_dir / time.strftime("eval.%Y%m%d-%H%M%S", time.gmtime(path.stat().st_mtime)), ".json")
        os.replace(path, kept)
        print(f"previous evaluation kept as {kept}", file=sys.stderr)
    io.write_json(path, results)
    return results


def cmd_degrade(args: argparse.Namespace) -> int:
    import torch

    from spd import io
    from spd.config import load_config
    from spd.natural import degrade
    from spd.scale import load_curve
    from spd.task import build_task

    source = Path(args.target)
    config_path = source / io.CONFIG if source.is_dir() else source
    cfg = load_config(config_path, args.set)
    tag = f"loss{args.loss:g}" if args.loss is not None else f"compute{args.compute_fraction:g}"
    out = Path(args.out) if args.out else Path("degraded") / f"{source.stem if source.is_file() else source.name}-{tag}"
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"{out} already holds files; nothing was overwritten (pass --force or --out)")
    if args.threads:
        torch.set_num_threads(args.threads)
    state = None
    if source.is_dir() and (source / io.TARGET).is_file():
        state = io.load_tensors(source / io.TARGET)
    elif cfg.target.state_file is not None:
        state = io.load_tensors(Path(cfg.target.state_file))
    task = build_task(cfg.target.factory, cfg.target.kwargs, cfg.seed, state)
    curve = load_curve(cfg.target.compute_curve) if cfg.target.compute_curve else None
    result, request = degrade(task, cfg.natural, args.loss, args.compute_fraction, curve)
    out.mkdir(parents=True, exist_ok=True)
    io.save_tensors(out / io.TARGET, result.state)
    summary = result.summary() | {"request": request, "source": str(source)}
    io.write_json(out / "degrade.json", summary)
    new_cfg = cfg.model_copy(
        update={"target": cfg.target.model_copy(update={"state_file": str((out / io.TARGET).resolve())})}
    )
    (out / io.CONFIG).write_text(new_cfg.to_yaml())
    verdict = "" if result.converged else " (search did not reach the tolerance: closest chain)"
    print(
        f"natural degradation of {cfg.target.factory}: requested loss {request['loss']:.6g} (target "
        f"{result.target_loss:.6g}); nbeta {result.chain.nbeta:.4g}, LLC {result.chain.llc:.4g}, chain mean "
        f"{result.chain.mean_loss:.6g}; the written draw has loss {result.achieved_loss:.6g} "
        f"({100 * summary['loss_error_rel']:+.2f}% of the request){verdict}"
    )
    print(f"written: {out / io.TARGET}, {out / 'degrade.json'}; decompose it with: spd train {out / io.CONFIG}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from spd.sweep import sweep

    out = Path(args.out) if args.out else Path("runs") / f"sweep-{Path(args.config).stem}"
    records = sweep(args.config, args.grid, out, args.seeds, args.jobs, args.set)
    failed = [r["name"] for r in records if r["status"] != "done"]
    print(f"sweep directory: {out}; compare with `spd report {out}/*/`")
    if failed:
        print(f"spd: error: {len(failed)} run(s) failed: {', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from spd.report import collect, write_report

    dirs = [Path(d) for d in args.run_dirs]
    rows = [collect(d, args.window) for d in dirs if (d / "config.yaml").is_file() or not d.is_dir()]
    if not rows:
        print("spd: error: no run directories (with config.yaml) among the arguments", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(dirs[0]).parent / "report"
    paths = write_report(rows, out, args.window)
    print(paths["md"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from spd.compare import compare, markdown

    rows = compare(args.run_dirs, args.any_target)
    md = markdown(rows)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(md)
        (out / "compare.json").write_text(json.dumps(rows, indent=1))
        print(f"written: {out / 'compare.md'}, {out / 'compare.json'}")
    return 0


def _print_truth(truth: dict[str, Any] | None) -> None:
    if truth is None:
        print("  (the target has no ground-truth mechanisms; nothing to score against)")
        return
    print(f"  against ground truth ({truth['unexplained_alive']} alive subcomponents it does not explain, "
          "each counted as its own mechanism):")  # fmt: skip
    for method in ("mdl", "hierarchical"):
        t = truth[method]
        print(f"    {method:<13} ARI {t['ari']:.4f}; {t['found_mechanisms']} found vs {t['true_mechanisms']} true; "
              f"{t['exact']} true mechanisms found exactly ({t['multi_member_exact']} of the "
              f"{t['multi_member_true']} with several members)")  # fmt: skip


def cmd_ablate(args: argparse.Namespace) -> int:
    import torch

    from spd.ablate import Rule, Selection, mechanism_members, parse_members
    from spd.effects import EffectRule
    from spd.mechanisms import load_grouping
    from spd.run import load_run
    from spd.task import to_device
    from spd.unlearning import load_data, markdown, unlearning_study, write_study

    run_dir = Path(args.run_dir)
    slug = "".join(
        ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{Path(args.forget).stem}-vs-{Path(args.retain).stem}"
    )
    out = Path(args.out) if args.out else run_dir / "ablations" / slug
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"{out} already holds results; nothing was overwritten (pass --force or --out)")
    if args.mechanisms and not args.grouping:
        raise ValueError("--mechanisms needs --grouping FILE (a grouping-alpha*.json written by `spd group`)")
    if args.ids and args.mechanisms:
        raise ValueError("give either --ids or --mechanisms, not both")
    if args.threads:
        torch.set_num_threads(args.threads)
    run = load_run(run_dir, args.device)
    grouping = load_grouping(args.grouping) if args.grouping else None
    selection = None
    if args.ids:
        selection = Selection(parse_members(args.ids, run.model), {"kind": "ids", "names": args.ids})
    elif args.mechanisms:
        assert grouping is not None
        members = mechanism_members(grouping, args.mechanisms)
        selection = Selection(members, {"kind": "mechanisms", "names": args.mechanisms, "grouping": grouping.params})
    forget = load_data(args.forget, run.task.subsets, args.n, run.config.seed)
    retain = load_data(args.retain, run.task.subsets, args.n, run.config.seed + 1)
    forget, retain = to_device(forget, run.device), to_device(retain, run.device)
    threshold = args.threshold if args.threshold is not None else run.config.eval.ci_threshold
    rule: Rule | EffectRule = (
        EffectRule(args.effect_min, args.effect_ratio, threshold, args.candidate_min)
        if args.by == "effect"
        else Rule(threshold, args.forget_min, args.retain_max, args.min_ratio)
    )
    study = unlearning_study(
        run.model, forget, retain, selection, rule, grouping, run.task.metrics, run.config.output_loss,
        baselines=not args.no_baselines, neuron_modules=args.neurons, ga_lr=args.ga_lr, ga_max_steps=args.ga_steps,
        cap_at_zero=not args.no_cap, neuron_inputs=args.neuron_inputs,
    )  # fmt: skip
    study.report["data"] = {"forget": args.forget, "retain": args.retain, "run_dir": str(run_dir)}
    if not args.no_honest_scale and run.task.metrics is not None:
        from spd.honest import section, target_losses
        from spd.unlearning import METHOD_NAMES

        edited = {METHOD_NAMES["components"]: study.edited} | {METHOD_NAMES[k]: m for k, m in study.baselines.items()}
        ev = run.config.eval
        base, losses = target_losses(run.task, edited, ev.batch_size * ev.n_batches, ev.batch_size, run.config.seed)
        study.report["honest_scale"] = section(run.task, base, losses, False if args.no_natural else run.config.natural)
    paths = write_study(study, out, run.task.architecture, args.force)
    print(markdown(study.report))
    for k, p in paths.items():
        print(f"written ({k}): {p}")
    return 0


def cmd_group(args: argparse.Namespace) -> int:
    import torch

    from spd.compare import target_fingerprint
    from spd.mechanisms import compare_groupings, group_model, grouping_path, save_result
    from spd.run import load_run
    from spd.task import same_inputs, to_device

    dirs = [Path(d) for d in args.run_dirs]
    for d in dirs:  # refuse before any work is done
        out = grouping_path(d, args.alpha)
        if out.exists() and not args.force:
            raise FileExistsError(f"{out} exists; nothing was overwritten (pass --force to replace it)")
    done = []
    for d in dirs:
        run = load_run(d, args.device)
        ev = run.config.eval
        t0 = time.perf_counter()
        res = group_model(
            run.model, run.task.sample_batch, alpha=args.alpha,
            threshold=ev.ci_threshold if args.threshold is None else args.threshold,
            min_density=ev.alive_min_density if args.min_density is None else args.min_density,
            n_samples=args.n_samples or ev.batch_size * ev.n_batches, batch_size=ev.batch_size,
            restarts=args.restarts, tolerance=args.tolerance, max_distance=args.max_distance,
            seed=run.config.seed if args.seed is None else args.seed, ground_truth=run.task.ground_truth,
        )  # fmt: skip
        res["seconds"] = time.perf_counter() - t0
        save_result(grouping_path(d, args.alpha), res, args.force)
        p, st = res["mdl"].params, res["mdl"].stats
        print(f"{d}: CI > {p['threshold']} on {p['n_samples']} samples, alive = firing on > {p['min_density']:g} "
              f"of them; {res['seconds']:.1f} s")  # fmt: skip
        if run.checkpoint_step is not None:
            print(f"  NOTE: the run has not finished; grouped its checkpoint at step {run.checkpoint_step}")
        print(res["mdl"].summary())
        print(f"  description length {st['mdl_bits']:.4f} bits/sample (singletons {st['mdl_singletons_bits']:.4f}); "
              f"restart minima {', '.join(f'{v:.4f}' for v in st['restart_minima_bits'])}")  # fmt: skip
        print(res["hierarchical"].summary())
        _print_truth(res["truth"])
        print(f"written: {grouping_path(d, args.alpha)}")
        done.append((d, run, res))
    pairs = []
    for i, (da, ra, a) in enumerate(done):
        for db, rb, b in done[i + 1 :]:
            if target_fingerprint(da) != target_fingerprint(db):
                print(f"stability: {da} and {db} decompose different targets; not compared")
                continue
            if not same_inputs(ra.task, rb.task):
                print(f"stability: {da} and {db} decompose the same target weights on different data (their tasks "
                      "draw different inputs from one seed: a seed-dependent input basis? give both the same "
                      "target.kwargs.seed); not compared")  # fmt: skip
                continue
            x = to_device(ra.task.sample_batch(2048, torch.Generator().manual_seed(0)), ra.device)
            cmp = compare_groupings(a["mdl"], ra.model, b["mdl"], rb.model, x)
            pairs.append({"a": str(da), "b": str(db), **cmp})
            print(f"stability {da.name} vs {db.name}: {cmp['mechanisms_a']} vs {cmp['mechanisms_b']} mechanisms; "
                  f"{cmp['matched_cos>=0.9']} matched at cos >= 0.9 ({cmp['matched_same_rank']} of them with equal "
                  f"rank); mean matched cos {cmp['mean_matched_cos']:.4f}; largest rank "
                  f"{cmp['largest_rank_a']} vs {cmp['largest_rank_b']}")  # fmt: skip
    if args.stability_out and pairs:
        Path(args.stability_out).write_text(json.dumps(pairs, indent=1) + "\n")
        print(f"written: {args.stability_out}")
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


DEVICE_HELP = (
    "where to load the run: cpu, cuda, cuda:1 ... (default auto: the run's train.device if this machine has it, "
    "else cpu)"
)


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
    e.add_argument("--no-honest-scale", action="store_true", help="leave out the honest-scale section")
    e.add_argument("--no-natural", action="store_true", help="honest scale without the SGLD natural degradation")
    e.add_argument(
        "--save", action="store_true",
        help="write the results as the run's eval.json (the one report/compare read); the old one is kept",
    )  # fmt: skip
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.set_defaults(fn=cmd_eval)
    d = sub.add_parser("degrade", help="write a naturally degraded (SGLD) copy of a target at a chosen loss")
    d.add_argument("target", help="a run config (YAML) or a run directory")
    how = d.add_mutually_exclusive_group(required=True)
    how.add_argument("--loss", type=float, help="the loss (the target's own metric) to degrade to")
    how.add_argument(
        "--compute-fraction", type=float, help="degrade to the loss the family reaches with this fraction of compute"
    )
    d.add_argument("--out", help="output directory (default: degraded/<name>-<request>); never overwritten")
    d.add_argument("--force", action="store_true", help="replace an existing output directory's files")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, "
                   "e.g. --set natural.n_steps=800")  # fmt: skip
    d.add_argument("--threads", type=int, help="torch CPU threads")
    d.set_defaults(fn=cmd_degrade)
    s = sub.add_parser("sweep", help="run a grid of configs (sequentially or as parallel local processes)")
    s.add_argument("config")
    s.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2,...",
        help="a config key and its values, e.g. losses.2.coeff=3e-7,1e-5,3e-4 (repeat for a product)",
    )
    s.add_argument("--seeds", type=int, help="also run seeds 0..N-1 of every grid point")
    s.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cpu_count/jobs torch threads)")
    s.add_argument("--out", help="sweep directory (default runs/sweep-<config>); finished runs in it are skipped")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    s.set_defaults(fn=cmd_sweep)
    rp = sub.add_parser("report", help="compare runs: settled values, Pareto figure, table")
    rp.add_argument("run_dirs", nargs="+")
    rp.add_argument("--out", help="where report.md/.json/.png go (default: <parent of the first run>/report)")
    rp.add_argument("--window", type=float, default=0.2, help="last fraction of steps averaged (default 0.2)")
    rp.set_defaults(fn=cmd_report)
    cp = sub.add_parser("compare", help="one table for finished runs on the same target (e.g. SPD vs APD)")
    cp.add_argument("run_dirs", nargs="+")
    cp.add_argument("--out", help="also write compare.md and compare.json here")
    cp.add_argument("--any-target", action="store_true", help="allow runs whose target weights differ")
    cp.set_defaults(fn=cmd_compare)
    g = sub.add_parser("group", help="group a run's subcomponents into mechanisms (MDL) and score the grouping")
    g.add_argument("run_dirs", nargs="+", help="finished runs; several runs of one target are also compared")
    g.add_argument(
        "--alpha",
        type=float,
        default=2.0,
        help="resolution: bits per unit of rank of a firing mechanism (default 2; higher splits more)",
    )
    g.add_argument(
        "--threshold", type=float, help="CI threshold for 'important' (default: the run's eval.ci_threshold)"
    )
    g.add_argument(
        "--min-density",
        type=float,
        help="alive = important on more than this fraction of samples (default: eval.alive_min_density)",
    )
    g.add_argument("--n-samples", type=int, help="samples in the data pass (default: eval batch_size x n_batches)")
    g.add_argument("--restarts", type=int, default=4, help="merge restarts (the first is greedy; default 4)")
    g.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="stochastic restarts pick among merges within this fraction of the best (default 0.05)",
    )
    g.add_argument(
        "--max-distance", type=float, default=0.5, help="Jaccard cut of the hierarchical alternative (default 0.5)"
    )
    g.add_argument("--seed", type=int, help="data and restart seed (default: the run's seed)")
    g.add_argument("--force", action="store_true", help="replace an existing grouping-alpha<A>.json")
    g.add_argument("--stability-out", help="write the pairwise stability table (JSON) here")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.set_defaults(fn=cmd_group)
    a = sub.add_parser(
        "ablate",
        help="ablate components or mechanisms (chosen by id, by mechanism, or by forget/retain data); export the "
        "edited model and a report with baselines",
    )
    a.add_argument("run_dir")
    a.add_argument("--forget", required=True, help="DATA to forget: a .safetensors file of inputs (LMs: input_ids, "
                   "optionally loss_mask), or a slice the target names (toys: only:I, without:I, all; language "
                   "models: next:CLASS, next-not:CLASS with CLASS digits, regex=PATTERN or ids=1,2,3)")  # fmt: skip
    a.add_argument("--retain", required=True, help="DATA to keep (same forms as --forget)")
    a.add_argument("--ids", nargs="+", metavar="MODULE:C", help="ablate these subcomponents (e.g. linear1:3,7)")
    a.add_argument("--grouping", help="a grouping-alpha*.json (`spd group`): choose among its mechanisms")
    a.add_argument("--mechanisms", nargs="+", metavar="NAME", help="ablate these mechanisms of --grouping")
    a.add_argument("--by", choices=["importance", "effect"], default="importance",
                   help="data rule: importance (where a unit matters: --forget-min/--retain-max/--min-ratio) or "
                   "effect (which way: the loss change when it alone is removed: --effect-min/--effect-ratio; "
                   "one pass per candidate; the neuron/head baseline is chosen by the same rule)")  # fmt: skip
    a.add_argument("--threshold", type=float, help="importance threshold of the rule (default: eval.ci_threshold)")
    a.add_argument("--forget-min", type=float, default=0.5,
                   help="choose units important on at least this fraction of forget inputs (default 0.5)")  # fmt: skip
    a.add_argument("--retain-max", type=float, default=0.05,
                   help="... on at most this fraction of retain inputs (default 0.05)")  # fmt: skip
    a.add_argument("--min-ratio", type=float, default=10.0,
                   help="... and at least this many times as often on forget as on retain (default 10)")  # fmt: skip
    a.add_argument("--effect-min", type=float, default=0.001,
                   help="--by effect: removing the unit alone raises the forget loss by at least this fraction "
                   "(default 0.001)")  # fmt: skip
    a.add_argument(
        "--effect-ratio",
        type=float,
        default=10.0,
        help="--by effect: ... and at least this many times the retain loss's relative rise (default 10)",
    )
    a.add_argument("--candidate-min", type=float, default=0.01,
                   help="--by effect: candidates are important on at least this fraction of forget inputs "
                   "(default 0.01)")  # fmt: skip
    a.add_argument("--no-cap", action="store_true",
                   help="match the baselines to the component edit's forget loss even past the zero-ablation level "
                   "(for a model whose decomposed matrices are only part of what computes the answer)")  # fmt: skip
    a.add_argument("--n", type=int, default=4096, help="inputs drawn per named slice (half choose, half measure)")
    a.add_argument("--neurons", help="glob of decomposed modules whose neurons/heads the unit baseline may zero")
    a.add_argument("--neuron-inputs", action="store_true",
                   help="the unit baseline zeroes input units of matrices outside attention (an MLP output "
                   "matrix's hidden neurons) instead of output units")  # fmt: skip
    a.add_argument("--no-baselines", action="store_true", help="skip the neuron/head and gradient-ascent baselines")
    a.add_argument("--ga-lr", type=float, default=1e-3, help="gradient-ascent baseline: Adam learning rate")
    a.add_argument("--ga-steps", type=int, default=2000, help="gradient-ascent baseline: most steps")
    a.add_argument("--threads", type=int, help="torch threads")
    a.add_argument("--device", default="auto", help=DEVICE_HELP)
    a.add_argument("--no-honest-scale", action="store_true", help="leave out the honest-scale section")
    a.add_argument("--no-natural", action="store_true", help="honest scale without the SGLD natural degradation")
    a.add_argument("--out", help="output directory (default RUN_DIR/ablations/<forget>-vs-<retain>)")
    a.add_argument("--force", action="store_true", help="write into an existing output directory")
    a.set_defaults(fn=cmd_ablate)
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
        code = int(args.fn(args))
    except (ConfigError, RunDirError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"spd: error: {err}", file=sys.stderr)
        code = 2
    parallel = sys.modules.get("spd.distributed")
    if parallel is not None:  # a torchrun worker exits here, after all ranks are done
        parallel.leave(code)  # type: ignore[attr-defined]
    return code


if __name__ == "__main__":
    sys.exit(main())
