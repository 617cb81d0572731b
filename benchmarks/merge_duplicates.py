"""Merge duplicate subcomponents of a finished run into a new run directory (spd.dedupe), to score or to train a tail.

    python benchmarks/merge_duplicates.py RUN_DIR OUT_DIR [--max-cos 0.9] [--min-overlap 0.5] [--fit-steps 300]
    spd eval OUT_DIR                                   # the merged decomposition, as it is
    python benchmarks/recovery.py CONFIG --set train.init_from=OUT_DIR ...   # a tail from it

OUT_DIR gets the run's config and target and the merged model; it must not exist yet.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from spd import io
from spd.dedupe import merge_duplicates
from spd.run import load_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--max-cos", type=float, default=0.9, help="|cos| of the inner activations where either fires")
    p.add_argument("--min-overlap", type=float, default=0.5)
    p.add_argument("--min-gain", type=float, default=0.3, help="rms inner activation on the other's inputs / own")
    p.add_argument("--inputs", type=int, default=20_000, help="inputs drawn from the run's task to count firing")
    p.add_argument("--fit-steps", type=int, default=300, help="CI refit steps after the merge (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if a.out_dir.exists():
        raise SystemExit(f"{str(a.out_dir)!r} exists; give a new directory (nothing is overwritten)")
    torch.set_num_threads(a.threads)
    run = load_run(a.run_dir)
    x = run.task.sample_batch(a.inputs, torch.Generator().manual_seed(a.seed))
    ev = run.config.eval  # firing and alive as the run's scores count them
    merged = merge_duplicates(
        run.model,
        x,
        max_cos=a.max_cos,
        min_overlap=a.min_overlap,
        threshold=ev.ci_threshold,
        min_density=ev.alive_min_density,
        min_gain=a.min_gain,
        fit_steps=a.fit_steps,
        seed=a.seed,
    )
    a.out_dir.mkdir(parents=True)
    for f in (io.CONFIG, io.TARGET):
        shutil.copy(a.run_dir / f, a.out_dir / f)
    io.save_tensors(a.out_dir / io.MODEL, run.model.trainable_state_dict())
    for name, pairs in merged.items():
        print(f"{name}: {len(pairs)} merged" + (f" {pairs}" if pairs else ""))
    print(f"wrote {a.out_dir}")


if __name__ == "__main__":
    main()
