"""What replaying the unchanged prefix (`spd.replay.FixedPrefix`) saves in an unlearning study's passes over a
language model: time of one forward over a fixed batch by a copy edited in one matrix, plain and replayed, and of
the unit baseline's effects for a few output units of that matrix.

    python benchmarks/replay_study.py [--model smollm2] [--modules model.layers.29.mlp.down_proj ...]
                                      [--rows 8] [--units 8] [--repeats 3] [--out benchmarks/results/replay_study.json]

Needs `make lm`. Every time is the median of --repeats; the replayed forward is timed after its recording pass
(which costs one plain pass). The outputs of the two ways are compared (max |difference| of the logits).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from spd.lm import load_causal_lm, load_corpus, resolve_source
from spd.model import target_output
from spd.replay import FixedPrefix
from spd.units import Unit, unit_effects


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--modules", nargs="+", default=["model.layers.29.mlp.down_proj", "model.layers.3.mlp.down_proj"])
    ap.add_argument("--rows", type=int, default=8, help="rows of 128 tokens in the batch")
    ap.add_argument("--units", type=int, default=8, help="output units whose effects are timed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/replay_study.json"))
    args = ap.parse_args()

    source = resolve_source(args.model)
    lm, tok = load_causal_lm(source)
    lm.eval()
    rows = load_corpus({"text": "stdlib"}, 128, lm, tok, source["sha256"])
    x = {"input_ids": rows[: args.rows]}
    results = []
    with torch.no_grad():
        for name in args.modules:
            edited = copy.deepcopy(lm)
            edited.get_submodule(name).weight.mul_(0.5)
            prefix = FixedPrefix(lm, [name])
            plain_s, want = timed(lambda e=edited: target_output(e, x), args.repeats)
            record_s, _ = timed(lambda p=prefix: p.output(lm, x), 1)
            replay_s, got = timed(lambda e=edited, p=prefix: p.output(e, x), args.repeats)
            units = [Unit(name, j) for j in range(args.units)]
            fresh = FixedPrefix(lm, [name])  # its recording pass is part of the timed effects
            eff_plain_s, e0 = timed(lambda u=units: unit_effects(lm, u, x, args.rows), 1)
            eff_replay_s, e1 = timed(lambda u=units, p=fresh: unit_effects(lm, u, x, args.rows, p), 1)
            r = {
                "module": name,
                "forward_plain_s": plain_s,
                "forward_recording_s": record_s,
                "forward_replayed_s": replay_s,
                "forward_speedup": plain_s / replay_s,
                "max_abs_logit_diff": (got - want).abs().max().item(),
                "unit_effects_plain_s": eff_plain_s,
                "unit_effects_replayed_s": eff_replay_s,
                "unit_effects_speedup": eff_plain_s / eff_replay_s,
                "unit_effects_max_rel_diff": ((e1 - e0).abs().max() / e0.abs().max()).item(),
            }
            print(json.dumps(r))
            results.append(r)
    out = {
        "what": "one forward of an edited SmolLM2 copy over a fixed batch, plain vs with the prefix replayed; unit "
        "effects of --units output units of the module",
        "rows": args.rows,
        "tokens": args.rows * 128,
        "units": args.units,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
