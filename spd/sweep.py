"""Grid sweeps on one machine: every point of a grid (times seeds) is an ordinary run in its own directory.

Runs are `spd train` / `spd resume` subprocesses, one at a time or `jobs` at once (each then gets
cpu_count // jobs torch threads unless the grid sets train.threads). A sweep is restartable: finished runs
(eval.json present) are skipped, runs with a checkpoint are resumed, nothing is overwritten. `sweep.json` in the
sweep directory lists every run, its overrides and its outcome.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from spd import io
from spd.config import load_config


@dataclass
class Point:
    name: str
    overrides: list[str]


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """['losses.2.coeff=1e-5,3e-5', 'seed=0,1'] -> [('losses.2.coeff', ['1e-5', '3e-5']), ('seed', ['0', '1'])]."""
    grid = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise ValueError(f"--grid {spec!r} must look like key.path=v1,v2,... (e.g. losses.2.coeff=1e-5,3e-5)")
        grid.append((key.strip(), vals))
    keys = [k for k, _ in grid]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--grid names a key twice: {keys}")
    return grid


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def grid_points(grid: list[tuple[str, list[str]]], seeds: int | None = None) -> list[Point]:
    """The cartesian product of the grid (and seeds 0..seeds-1), each with a directory name built from it."""
    if seeds is not None:
        if any(k == "seed" for k, _ in grid):
            raise ValueError("give seeds either with --seeds or with --grid seed=..., not both")
        grid = [*grid, ("seed", [str(s) for s in range(seeds)])]
    points = []
    for combo in itertools.product(*[[(k, v) for v in vs] for k, vs in grid]):
        overrides = [f"{k}={v}" for k, v in combo]
        points.append(Point(_slug("_".join(overrides)) or "run", overrides))
    return points


def plan(config: str, points: list[Point], out: Path, extra: list[str]) -> list[tuple[Point, str]]:
    """Validate every point's config before anything runs; say for each whether it is done, resumed or new."""
    actions = []
    for p in points:
        load_config(config, [*extra, *p.overrides])  # raises a ConfigError naming the bad field
        d = out / p.name
        if (d / io.EVAL).is_file():
            actions.append((p, "done"))
        elif io.latest_checkpoint(d) is not None:
            actions.append((p, "resume"))
        elif d.exists() and any(d.iterdir()):
            raise io.RunDirError(f"{d} holds files but no checkpoint or result; move it away (nothing was overwritten)")
        else:
            actions.append((p, "train"))
    return actions


def command(config: str, p: Point, action: str, out: Path, extra: list[str], threads: int | None) -> list[str]:
    d = str(out / p.name)
    if action == "resume":
        return [sys.executable, "-m", "spd.cli", "resume", d, "--quiet"]
    sets = [*extra, *p.overrides]
    if threads is not None and not any(s.startswith("train.threads=") for s in sets):
        sets.append(f"train.threads={threads}")
    flags = [a for s in sets for a in ("--set", s)]
    return [sys.executable, "-m", "spd.cli", "train", config, "--out", d, "--quiet", *flags]


def sweep(
    config: str,
    grid: list[str],
    out: Path,
    seeds: int | None = None,
    jobs: int = 1,
    extra: list[str] | None = None,
    echo: bool = True,
) -> list[dict[str, object]]:
    """Run (or finish) every point of the grid; returns and writes (sweep.json) one record per run."""
    extra = extra or []
    points = grid_points(parse_grid(grid), seeds)
    out.mkdir(parents=True, exist_ok=True)
    actions = plan(config, points, out, extra)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    records: dict[str, dict[str, object]] = {
        p.name: {"name": p.name, "overrides": p.overrides, "action": a, "status": "done" if a == "done" else "pending"}
        for p, a in actions
    }

    def save() -> None:
        io.write_json(out / "sweep.json", {"config": config, "grid": grid, "seeds": seeds, "set": extra,
                                           "runs": list(records.values())})  # fmt: skip

    save()
    todo = [(p, a) for p, a in actions if a != "done"]
    if echo:
        print(f"sweep: {len(points)} runs in {out} ({len(points) - len(todo)} already done), {jobs} at a time")
    running: list[tuple[Point, subprocess.Popen[bytes], float]] = []
    while todo or running:
        while todo and len(running) < jobs:
            p, a = todo.pop(0)
            log = (out / f"{p.name}.log").open("ab")
            proc = subprocess.Popen(command(config, p, a, out, extra, threads), stdout=log, stderr=subprocess.STDOUT)
            running.append((p, proc, time.perf_counter()))
            records[p.name]["status"] = "running"
            if echo:
                print(f"  {a:6s} {p.name}")
        time.sleep(0.2)
        for item in list(running):
            p, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            ok = proc.returncode == 0
            records[p.name] |= {"status": "done" if ok else "failed", "returncode": proc.returncode,
                                "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            if echo:
                print(f"  {'done' if ok else 'FAILED':6s} {p.name} ({records[p.name]['seconds']} s)"
                      + ("" if ok else f", see {out / (p.name + '.log')}"))  # fmt: skip
            save()
    save()
    return list(records.values())
