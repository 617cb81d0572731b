"""Figure for the README: TMS causal-importance patterns on one-hot probes, and recovered feature directions.

    python figures/tms_ci_and_weights.py RUN_DIR [--out figures/tms_5-2.png]

Left panels: the CI (lower) of every alive subcomponent for the one-hot probe inputs x = 0.75 e_f, one panel per
decomposed matrix, columns permuted to the best diagonal. Right panel: the target's feature directions W[:, f]
(grey) and each alive linear1 subcomponent's write direction scaled by its read weight (colour).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from spd.ground_truth import permute_to_diagonal
from spd.run import load_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out", default="figures/tms_5-2.png")
    p.add_argument("--threshold", type=float, default=0.1)
    args = p.parse_args()
    run = load_run(args.run_dir)
    model, gt = run.model, run.task.ground_truth
    probes = gt.probe_inputs
    ci = model.causal_importances(probes).lower
    names = model.module_names
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.2 * (len(names) + 1), 3.2))
    for ax, name in zip(axes, names, strict=False):
        g = ci[name]
        alive = (g > args.threshold).any(0)
        shown = permute_to_diagonal(g[:, alive]) if alive.sum() >= g.shape[0] else g[:, alive]
        im = ax.imshow(shown.numpy(), vmin=0, vmax=1, cmap="Blues")
        ax.set_title(f"{name}: CI on one-hot inputs", fontsize=9)
        ax.set_xlabel("alive subcomponent (permuted)")
        ax.set_ylabel("active feature")
    fig.colorbar(im, ax=axes[len(names) - 1], fraction=0.046)
    ax = axes[-1]
    comp = model.comp("linear1")
    W = comp.target_weight().detach()  # (n_features, n_hidden) in x @ W orientation
    alive = (ci["linear1"] > args.threshold).any(0).nonzero().flatten().tolist()
    with torch.no_grad():
        for f in range(W.shape[0]):
            ax.plot([0, W[f, 0]], [0, W[f, 1]], color="0.7", lw=6, solid_capstyle="round")
        for i, c in enumerate(alive):
            f = int(comp.V[:, c].abs().argmax())
            vec = comp.V[f, c] * comp.U[c]
            ax.annotate("", xy=(vec[0], vec[1]), xytext=(0, 0), arrowprops={"arrowstyle": "->", "color": f"C{i}"})
    lim = float(W.abs().max()) * 1.2
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title("W columns (grey) vs subcomponents", fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
