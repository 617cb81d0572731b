"""Honest scale on toy decompositions: the eval section, the loss -> compute curve figure, the natural-degradation
search at requested losses, and the per-feature comparison of a masked decomposition with the natural
degradation at the same loss.

    python benchmarks/honest_scale.py RUN_DIR [RUN_DIR ...] [--factors 1.1 1.5 3] [--seeds 3] [--out DIR]

RUN_DIR: finished TMS or ResidMLP decompositions (`spd train configs/resid_mlp1.yaml`, ...). Writes, per run,
honest_scale_<name>.json / .md and curve_<name>.png into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

from spd.honest import markdown
from spd.masks import make_masks
from spd.model import target_output
from spd.natural import NaturalDegradation, task_loss_fn
from spd.run import Run, load_run
from spd.scale import ComputeCurve

N_PER_FEATURE = 512


def curve_figure(curve: ComputeCurve, rows: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    groups: dict[str, list[Any]] = {}
    for p in curve.points:
        key = "target's own run (checkpoints)" if p.label.startswith("checkpoint") else p.label.split(" steps")[0]
        groups.setdefault(key, []).append(p)
    for key, pts in sorted(groups.items()):
        pts = sorted(pts, key=lambda p: p.compute)
        ax.plot([p.compute for p in pts], [p.loss for p in pts], "o-" if "checkpoint" in key else "s--", ms=3,
                lw=0.8, label=key.replace("ladder ", "ladder, "))  # fmt: skip
    logc, ls = curve.frontier()
    ax.plot(torch.tensor(logc).exp(), ls, color="black", lw=1.6, alpha=0.35, label="family frontier")
    logc, ls = curve.same_model().frontier()
    ax.plot(torch.tensor(logc).exp(), ls, color="black", lw=1.0, ls="--", label="target's size: frontier")
    own = curve.same_model()
    base = own.target_frontier_compute
    ax.axhline(curve.target_loss, color="gray", lw=0.6, ls=":")
    for name, r in rows.items():
        shifted = curve.target_loss + r["gap"]
        c = own.compute_for(shifted)
        fam = f", family {100 * curve.fraction(shifted):.3g}%" if len(curve.models) > 1 else ""
        ax.plot([c], [shifted], "*", ms=10, label=f"{name}: {100 * c / base:.3g}% compute{fam}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"training compute ({curve.unit})")
    ax.set_ylabel("held-out loss (the target's own)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def search_table(nd: NaturalDegradation, factors: list[float], check_seed: int = 99) -> list[dict[str, Any]]:
    """Searches at factor x the target loss; the returned draw is re-measured on an independent held-out set."""
    task_metrics = nd.loss_fn
    rows = []
    g = torch.Generator().manual_seed(check_seed)
    check = [nd.sample_batch(nd.cfg.eval_batch_size, g) for _ in range(max(1, nd.cfg.n_eval // nd.cfg.eval_batch_size))]
    for f in factors:
        t0 = time.perf_counter()
        want = nd.target_loss * f
        d = nd.search(want)
        model = _with_state(nd.target, d.state)
        with torch.no_grad():
            fresh = sum(task_metrics(model, x).item() for x in check) / len(check)
            fresh0 = sum(task_metrics(nd.target, x).item() for x in check) / len(check)
        rows.append({
            "factor": f, "requested": want, "nbeta": d.chain.nbeta, "llc": d.chain.llc, "chain_mean": d.chain.mean_loss,
            "returned_draw": d.achieved_loss, "error_rel": (d.achieved_loss - want) / want,
            "independent_set": fresh, "independent_ratio_vs_target": fresh / fresh0, "chains": len(d.trace),
            "converged": d.converged, "seconds": time.perf_counter() - t0,
        })  # fmt: skip
    return rows


def _with_state(target: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    import copy

    m = copy.deepcopy(target)
    m.load_state_dict(state)
    return m


@torch.no_grad()
def per_feature_losses(forward: Any, run: Run, n_features: int, seed: int = 5) -> torch.Tensor:
    """Mean loss on inputs where only feature i is active, for every i."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n_features)
    for i in range(n_features):
        x = run.task.subsets(f"only:{i}", N_PER_FEATURE, g)
        out[i] = run.task.metrics(x, forward(x))["loss"].mean()
    return out


def feature_comparison(run: Run, nd: NaturalDegradation, losses: dict[str, float], target_loss: float,
                       seeds: int) -> dict[str, Any]:  # fmt: skip
    model = run.model
    n = int(run.task.info.get("n_features") or run.task.ground_truth.info["n_features"])  # type: ignore[union-attr]
    base = per_feature_losses(lambda x: target_output(run.task.target, x), run, n)
    gen = torch.Generator().manual_seed(0)

    def masked(kind: str) -> Any:
        def fwd(x: torch.Tensor) -> torch.Tensor:
            ci = model.importances(x, model.clean_pass(x)).lower
            return model(x, make_masks(ci, kind, threshold=run.config.eval.ci_threshold, generator=gen))

        return fwd

    out: dict[str, Any] = {"target_per_feature": base.tolist()}
    kinds = {"CI-masked": "ci", "stochastic-masked": "stochastic"}
    for name, kind in kinds.items():
        dec = per_feature_losses(masked(kind), run, n) - base
        gap = losses[name] - target_loss
        nats = []
        for s in range(seeds):
            nd_s = NaturalDegradation(run.task.target, nd.loss_fn, nd.sample_batch,
                                      nd.cfg.model_copy(update={"seed": s}), run.task.trained_parameters)  # fmt: skip
            d = nd_s.search(nd_s.target_loss + gap)
            nat_model = _with_state(run.task.target, d.state)
            nats.append(per_feature_losses(lambda x, m=nat_model: target_output(m, x), run, n) - base)
        nat = torch.stack(nats).mean(0)
        rho = spearmanr(dec.numpy(), nat.numpy()).statistic
        k = 10
        top_dec, top_nat = set(dec.topk(k).indices.tolist()), set(nat.topk(k).indices.tolist())
        out[name] = {
            "overall_gap": gap,
            "decomposition_delta": dec.tolist(),
            "natural_delta_mean_over_seeds": nat.tolist(),
            "spearman": float(rho),
            "top10_overlap": len(top_dec & top_nat),
            "decomposition_top10": sorted(top_dec, key=lambda i: -dec[i].item()),
            "natural_top10": sorted(top_nat, key=lambda i: -nat[i].item()),
            "decomposition_delta_max_over_mean": (dec.max() / dec.mean().clamp_min(1e-30)).item(),
            "natural_delta_max_over_mean": (nat.max() / nat.mean().clamp_min(1e-30)).item(),
            "natural_seeds": seeds,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--factors", type=float, nargs="+", default=[1.1, 1.5, 3.0])
    ap.add_argument("--seeds", type=int, default=3, help="natural-degradation seeds averaged per feature")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for d in args.run_dirs:
        t0 = time.perf_counter()
        run = load_run(d)
        name = Path(d).name
        sec = run.honest_scale()
        curve = run.task.compute_curve() if run.task.compute_curve else None
        assert run.task.metrics is not None
        nd = NaturalDegradation(run.task.target, task_loss_fn(run.task.metrics), run.task.eval_sampler,
                                run.config.natural, run.task.trained_parameters)  # fmt: skip
        result: dict[str, Any] = {
            "run": str(d),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "honest_scale": sec,
            "search": search_table(nd, args.factors),
        }
        if run.task.subsets is not None:
            losses = {k: v["loss"] for k, v in sec["rows"].items()}
            result["per_feature"] = feature_comparison(run, nd, losses, sec["target_loss"], args.seeds)
        if curve is not None:
            curve_figure(curve, sec["rows"], out / f"curve_{name}.png", f"{name}: loss -> compute")
            result["curve"] = curve.to_json()
        result["seconds"] = time.perf_counter() - t0
        (out / f"honest_scale_{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        md = [markdown(sec), "## Natural-degradation search", "",
              "| requested (x target) | nβ | LLC | chain mean | returned draw | error | independent set (x target) |"
              " chains |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in result["search"]:
            ind = f"{r['independent_set']:.6g} ({r['independent_ratio_vs_target']:.3f}x)"
            md.append(f"| {r['requested']:.6g} ({r['factor']:g}x) | {r['nbeta']:.4g} | {r['llc']:.4g} | "
                      f"{r['chain_mean']:.6g} | {r['returned_draw']:.6g} | {100 * r['error_rel']:+.2f}% | "
                      f"{ind} | {r['chains']} |")  # fmt: skip
        if "per_feature" in result:
            md += ["", "## Per feature: masked decomposition vs natural degradation at the same loss", "",
                   "| mask | overall gap | Spearman (loss increase per feature) | top-10 overlap | max/mean increase "
                   "(decomposition) | max/mean increase (natural) |", "|---|---|---|---|---|---|"]  # fmt: skip
            for k in ("CI-masked", "stochastic-masked"):
                r = result["per_feature"][k]
                ratios = f"{r['decomposition_delta_max_over_mean']:.2f} | {r['natural_delta_max_over_mean']:.2f}"
                md.append(f"| {k} | {r['overall_gap']:.3g} | {r['spearman']:.3f} | {r['top10_overlap']}/10 | "
                          f"{ratios} |")  # fmt: skip
        (out / f"honest_scale_{name}.md").write_text("\n".join(md) + "\n")
        print("\n".join(md))
        print(f"[{name}: {result['seconds']:.0f} s]")


if __name__ == "__main__":
    main()
