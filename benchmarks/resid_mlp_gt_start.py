"""Plant the ResidMLP ground truth in a decomposition and ask whether the SPD objective prefers it to what training
found: a failure to recover the ground truth is then either the objective's (the planted pieces score worse) or
the optimiser's (they score better, or training started from them keeps them).

    python benchmarks/resid_mlp_gt_start.py RUN_DIR [--compare RUN_DIR ...] [--fit-steps 1500]
        [--variant embedding | dual | dual+earlier ...] [--write-start DIR] [--json-out F.json]

RUN_DIR supplies the config, the target and the decomposition's shape (C, CI function). For each variant the
ground-truth pieces (`toy_models.resid_mlp.ground_truth_pieces`: per-feature W_in pieces reading W_E[i] or its
dual vector, with `dual+earlier` also one W_in^l piece per earlier-layer neuron for what layer l reads from the
earlier layers' output; W_out one piece per neuron) take the first subcomponents of each matrix and the rest are
zeroed. The CI function is then trained alone (components frozen; Adam, the run's peak LR, its batch size) on the
run's losses, and the objective, the run's configured losses on fixed evaluation batches (the same batches and
masks for every model), is printed beside each --compare run's (its final model, else its latest checkpoint),
with which features own a W_in piece in each (`pieces`; `--variant` with no name compares runs only).
`--write-start DIR` saves the first variant, CI fitted, as a finished-run directory: train from it with
`benchmarks/recovery.py CONFIG --set train.init_from=DIR --set train.faithfulness_warmup.steps=0 ...` to see
whether training keeps the planted pieces.
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
from spd.config import Config
from spd.ground_truth import TOL, probe_cis
from spd.model import ComponentModel
from spd.run import Run, load_run
from spd.task import Task
from spd.train import train_step
from toy_models.resid_mlp import ground_truth_pieces

VARIANTS = {"embedding": ("embedding", False), "dual": ("dual", False), "dual+earlier": ("dual", True)}


def objective(model: ComponentModel, cfg: Config, task: Task, n_batches: int, batch_size: int) -> dict[str, float]:
    """Mean of every configured loss term (and the weighted total) over fixed batches and mask draws."""
    g, gm = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    acc: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(n_batches):
            _, terms, _ = train_step(model, task.sample_batch(batch_size, g), cfg, gm, 1.0)
            for k, v in terms.items():
                acc[k] = acc.get(k, 0.0) + float(v) / n_batches
    return {k: float(f"{v:.4g}") for k, v in acc.items()}


@torch.no_grad()
def pieces(run: Run) -> dict[str, dict[str, Any]]:
    """Per W_in matrix, on the one-hot probes: alive pieces (CI > 0.1 on some probe), the features owning a piece
    (important on that probe alone, CI > 0.9 there), the pieces important on several probes and how many each."""
    ci = probe_cis(run.model, run.task.ground_truth)
    out = {}
    for name, c in ci.items():
        if not name.endswith("mlp_in"):
            continue
        important = c > TOL
        n_probes = important.sum(0)
        single = (n_probes == 1).nonzero().flatten()
        owners = {int(important[:, j].nonzero()[0]) for j in single.tolist() if c[important[:, j], j].item() > 1 - TOL}
        out[name] = {"alive_on_probes": int((n_probes > 0).sum()), "features_owning_a_piece": len(owners),
                     "multi_feature_pieces": int((n_probes > 1).sum()),
                     "features_per_multi_piece": sorted(n_probes[n_probes > 1].tolist(), reverse=True)}  # fmt: skip
    return out


@torch.no_grad()
def plant(model: ComponentModel, gt: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The ground-truth pieces as each matrix's first subcomponents, the others zeroed."""
    for name, (V, U) in gt.items():
        comp = model.comp(name)
        k = V.shape[1]
        if k > comp.V.shape[1]:
            raise ValueError(f"{name}: the ground truth has {k} pieces, the decomposition only C={comp.V.shape[1]}")
        comp.V.zero_()
        comp.U.zero_()
        comp.V[:, :k] = V.to(comp.V)
        comp.U[:k] = U.to(comp.U)


def fit_ci(model: ComponentModel, cfg: Config, task: Task, steps: int) -> list[dict[str, float]]:
    """Train the CI function alone (components frozen) on the run's losses; the loss terms every 500 steps."""
    for p in model.parameters():
        p.requires_grad_(False)
    ci_params = [p for n, p in model.named_parameters() if n.startswith("ci_fn.")]
    for p in ci_params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(ci_params, lr=cfg.train.lr.peak)
    g, gm = torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)
    curve = []
    for step in range(steps):
        loss, terms, _ = train_step(model, task.sample_batch(cfg.train.batch_size, g), cfg, gm, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            curve.append({"step": step} | {k: float(f"{float(v):.4g}") for k, v in terms.items()})
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--compare", nargs="*", default=[])
    p.add_argument("--variant", nargs="*", choices=list(VARIANTS), default=["embedding", "dual+earlier"])
    p.add_argument("--fit-steps", type=int, default=1500)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write-start", type=Path)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.write_start is not None and args.write_start.exists():
        raise SystemExit(f"--write-start {str(args.write_start)!r} exists; choose a new directory")
    out: dict[str, Any] = {"command": "python benchmarks/resid_mlp_gt_start.py " + " ".join(
        [args.run_dir, *(["--compare", *args.compare] if args.compare else []), "--variant", *args.variant,
         "--fit-steps", str(args.fit_steps)]),  # fmt: skip
        "machine": f"{platform.machine()} CPU, {args.threads} thread(s), torch {torch.__version__}", "learned": {},
        "planted": {}}  # fmt: skip
    for rd in args.compare:
        run = load_run(rd)
        step = "final" if run.checkpoint_step is None else f"checkpoint {run.checkpoint_step}"
        row = {"objective": objective(run.model, run.config, run.task, args.eval_batches, args.eval_batch_size),
               "pieces": pieces(run)}  # fmt: skip
        out["learned"][f"{rd} ({step})"] = row
        print(json.dumps({rd: row}), flush=True)
    for i, variant in enumerate(args.variant):
        run = load_run(args.run_dir)
        read, earlier = VARIANTS[variant]
        plant(run.model, ground_truth_pieces(run.task.target, read, earlier))
        t0 = time.perf_counter()
        curve = fit_ci(run.model, run.config, run.task, args.fit_steps)
        row = {"objective": objective(run.model, run.config, run.task, args.eval_batches, args.eval_batch_size),
               "pieces": pieces(run), "fit_curve": curve, "fit_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
        out["planted"][variant] = row
        print(json.dumps({variant: row["objective"]}), flush=True)
        if i == 0 and args.write_start is not None:
            args.write_start.mkdir(parents=True)
            io.save_tensors(args.write_start / io.MODEL, run.model.trainable_state_dict())  # as a finished run
            io.save_tensors(args.write_start / io.TARGET, run.task.target.state_dict())
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
