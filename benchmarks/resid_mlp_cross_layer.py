"""How much each later ResidMLP layer reads the earlier layers' MLP output, and whether a decomposition's broad
W_in pieces are that read.

    python benchmarks/resid_mlp_cross_layer.py --layers 2 --seeds 0 1 [--run RUN_DIR ...] [--out F.json]

The paper's ground truth for 2 and 3 layers is one W_in subcomponent per feature in every layer. But layer l > 0
reads the residual stream, which on feature i's probe holds both the embedding W_E[i] x and the earlier layers'
output W_out ReLU(...). ReLU outputs are non-negative, so those outputs share a common direction (their mean m)
across features, and a piece of W_in^l reading m is needed on almost every input: a dense cross-layer mechanism
the per-feature pieces cannot carry (feature i's residual is x (W_E[i] + a_i) for x > 0 and x (W_E[i] - b_i) for
x < 0, two directions, so no rank-1 piece reproduces W_in^l on both signs).

Per target seed and later layer, on the one-hot probes (x = 0.75):
- `read_ratio`: |W_in^l o_i| / |W_in^l W_E[i] x| (o_i: earlier layers' output on probe i), median over features;
- `mean_dir_share`: the share of o_i along m (median), and how many features have more than 0.3 of it;
- `remove_mean_dir`: the target with m projected out of W_in^l: relative output error (median over probes) and
  the change of each probe's own output (median, and how many features change by more than 5%).
With `--run`, for each decomposed `layers.l.mlp_in` the pieces important (lower CI > 0.1) on more than 5 probes:
how many probes, their peak CI, |cos(V_c, m)| and, on the probes where the piece is important, the share of what
it reads that comes from the earlier layers' output: |V_c . o_i| / (|V_c . o_i| + |V_c . W_E[i] x|) (median).
`layer_use` (per target) and `matched_ci_vs_use` (per run): how much each feature's output needs each layer's
read of it, and each feature's matched-piece CI beside it (the features under 0.9 and the least-used ones).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spd.ground_truth import TOL, pattern_rows, permute_to_diagonal, probe_cis
from spd.run import load_run
from toy_models.nets import ResidMLP
from toy_models.resid_mlp import PROBE_VALUE, earlier_output_share, resid_mlp_task, residual_entering

BROAD_MIN_PROBES = 5
CI_ON = 0.1


def _probe_pass(model: ResidMLP) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """The one-hot probes (x = PROBE_VALUE), their embedding, the output and the residual entering each layer."""
    x = torch.eye(model.W_E.shape[0]) * PROBE_VALUE
    y, entering = residual_entering(model, x)
    return x, x @ model.W_E, y, entering


def mean_output_directions(embed: Tensor, entering: list[Tensor]) -> dict[int, Tensor]:
    """Per later layer l, the unit mean over the probes of the earlier layers' output entering layer l."""
    means = {layer: (entering[layer] - embed).mean(0) for layer in range(1, len(entering))}
    return {layer: m / m.norm() for layer, m in means.items()}


@torch.no_grad()
def target_read(model: ResidMLP) -> dict[str, Any]:
    x, embed, y, entering = _probe_pass(model)
    rows: dict[str, Any] = {}
    for layer, m in mean_output_directions(embed, entering).items():
        w = model.layers[layer].mlp_in.weight
        o = entering[layer] - embed
        ratio = (o @ w.T).norm(dim=1) / (embed @ w.T).norm(dim=1)
        share = (o @ m).abs() / o.norm(dim=1)
        y2, _ = residual_entering(model, x, {layer: w - torch.outer(w @ m, m)})
        rel = (y2 - y).pow(2).sum(1) / y.pow(2).sum(1)
        own = (y2 - y).diagonal().abs() / y.diagonal().abs()
        rows[f"layer {layer}"] = {
            "read_ratio_median": round(ratio.median().item(), 3),
            "read_ratio_max": round(ratio.max().item(), 3),
            "mean_dir_share_median": round(share.median().item(), 3),
            "features_with_mean_dir_share_over_0.3": int((share > 0.3).sum()),
            "remove_mean_dir_rel_output_err_median": round(rel.median().item(), 4),
            "remove_mean_dir_own_output_change_median": round(own.median().item(), 4),
            "features_whose_own_output_changes_over_5pct": int((own > 0.05).sum()),
        }
    return rows


@torch.no_grad()
def layer_use(model: ResidMLP) -> Tensor:
    """[n_layers, n_features]: how much feature i's output needs layer l's read of it. On probe i (x = +PROBE_VALUE,
    where the ReLU part of the label is on), the squared change of the whole output when W_in^l loses its
    component along W_E[i], i.e. when the true per-feature piece of layer l is ablated."""
    x, _, y, _ = _probe_pass(model)
    u = model.W_E / model.W_E.norm(dim=1, keepdim=True)
    use = torch.zeros(len(model.layers), len(x))
    for layer in range(len(model.layers)):
        w = model.layers[layer].mlp_in.weight  # [d_mlp, d_embed]
        for i in range(len(x)):
            y2, _ = residual_entering(model, x[i : i + 1], {layer: w - torch.outer(w @ u[i], u[i])})
            use[layer, i] = (y2[0] - y[i]).pow(2).sum()
    return use


def use_summary(use: Tensor) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for layer, u in enumerate(use):
        med = u.median()
        rows[f"layer {layer}"] = {
            "median": round(med.item(), 4),
            "min": round(u.min().item(), 4),
            "features_under_0.1x_median": int((u < 0.1 * med).sum()),
            "features_under_0.25x_median": int((u < 0.25 * med).sum()),
        }
    return rows


def _ranks(v: Tensor) -> Tensor:
    return v.argsort().argsort().float()


@torch.no_grad()
def piece_ci_vs_use(run: Any, cis: dict[str, Tensor]) -> dict[str, Any]:
    """Per decomposed W_in^l: each feature's CI on its matched piece against the target's `layer_use`. The
    matching is the with-extras identity scorer's: the ground truth's extra pieces ("shared read l") are left
    out, then the Hungarian permutation. Lists the features whose matched CI is under 1 - TOL, with the rank of
    their use (0 = the feature that needs this layer least), and the off-diagonal entries over TOL: together the
    with-extras identity-CI error."""
    target = run.task.target
    use = layer_use(target)
    gt = run.task.ground_truth
    extras = frozenset(p for extra in gt.extras for p in extra.find(run.model, cis))
    out: dict[str, Any] = {"run": str(run.path), "seed": run.config.seed}
    for layer in range(len(target.layers)):
        name = f"layers.{layer}.mlp_in"
        if name not in cis:
            continue
        p = permute_to_diagonal(pattern_rows(cis, name, gt.ci_patterns[name], extras)[0])
        n = p.shape[0]
        diag = p.diagonal()
        off = p.clone()
        off[torch.arange(n), torch.arange(n)] = 0.0
        rank = _ranks(use[layer])
        low = torch.nonzero(diag < 1 - TOL).flatten().tolist()
        spearman = torch.corrcoef(torch.stack([_ranks(diag), rank]))[0, 1].item()
        out[name] = {
            "extras_left_out": sorted(c for n_, c in extras if n_ == name),
            "spearman_matched_ci_vs_use": round(spearman, 3),
            "matched_ci_min": round(diag.min().item(), 3),
            "features_under_0.9": [
                {
                    "feature": i,
                    "ci": round(diag[i].item(), 3),
                    "use": round(use[layer, i].item(), 4),
                    "use_rank": int(rank[i]),
                }
                for i in low
            ],
            "off_diagonal_over_0.1": int((off > TOL).sum()),
            "lowest_use_features": [
                {"feature": i, "use": round(use[layer, i].item(), 4), "ci": round(diag[i].item(), 3)}
                for i in use[layer].argsort()[:5].tolist()
            ],
        }
    return out


@torch.no_grad()
def broad_pieces(run: Any, cis: dict[str, Tensor]) -> dict[str, Any]:
    target = run.task.target
    _, embed, _, entering = _probe_pass(target)
    dirs = mean_output_directions(embed, entering)
    out: dict[str, Any] = {"seed": run.config.seed}
    for layer in range(len(target.layers)):
        name = f"layers.{layer}.mlp_in"
        if name not in cis:
            continue
        ci = cis[name]  # [probes, C]
        hit = ci > CI_ON
        on = hit.sum(0)
        V = run.model.comp(name).V.cpu()  # [d_embed, C]
        share = earlier_output_share(target, V, layer)  # [probes, C]
        pieces = []
        for c in torch.nonzero(on > BROAD_MIN_PROBES).flatten().tolist():
            row = {"subcomponent": c, "probes_important": int(on[c]), "peak_ci": round(ci[:, c].max().item(), 3)}
            if layer in dirs:
                row["abs_cos_V_mean_earlier_output"] = round(abs(float(V[:, c] @ dirs[layer] / V[:, c].norm())), 3)
                row["earlier_output_share_of_read_median"] = round(share[hit[:, c], c].median().item(), 3)
            pieces.append(row)
        out[name] = {"broad_pieces": pieces}
        narrow = (on >= 1) & (on <= BROAD_MIN_PROBES)
        if layer in dirs and narrow.any():  # the per-feature pieces, for comparison
            out[name]["narrow_pieces"] = int(narrow.sum())
            out[name]["narrow_earlier_output_share_of_read_median"] = round(
                share[:, narrow][hit[:, narrow]].median().item(), 3
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, choices=[2, 3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--run", nargs="*", default=[], help="decomposition run directories to inspect")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report: dict[str, Any] = {
        "command": "python benchmarks/resid_mlp_cross_layer.py "
        + f"--layers {args.layers} --seeds {' '.join(map(str, args.seeds))}"
        + "".join(f" --run {r}" for r in args.run),
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
        "targets": {},
        "runs": [],
    }
    for seed in args.seeds:
        task = resid_mlp_task(seed=seed, n_layers=args.layers)
        assert isinstance(task.target, ResidMLP)
        report["targets"][f"seed {seed}"] = target_read(task.target)
        report["targets"][f"seed {seed}"]["layer_use"] = use_summary(layer_use(task.target))
    for run_dir in args.run:
        run = load_run(run_dir)
        assert isinstance(run.task.target, ResidMLP), f"{run_dir} is not a ResidMLP run"
        cis = probe_cis(run.model, run.task.ground_truth)
        report["runs"].append(broad_pieces(run, cis) | {"matched_ci_vs_use": piece_ci_vs_use(run, cis)})
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
