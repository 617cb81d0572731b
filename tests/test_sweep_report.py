"""Sweeps (grid expansion, restartability, never overwriting) and reports (settled windows, Pareto front)."""

import json

import pytest
import yaml
from helpers import tiny_tms_config

from spd import io
from spd.cli import main
from spd.report import collect, pareto_front, point_labels, settled, varying
from spd.sweep import grid_points, parse_grid


def test_grid_expansion_and_names():
    grid = parse_grid(["losses.2.coeff=1e-3,3e-3", "train.steps=10"])
    pts = grid_points(grid, seeds=2)
    assert [p.overrides for p in pts][:2] == [
        ["losses.2.coeff=1e-3", "train.steps=10", "seed=0"],
        ["losses.2.coeff=1e-3", "train.steps=10", "seed=1"],
    ]
    assert len(pts) == 4 and len({p.name for p in pts}) == 4
    with pytest.raises(ValueError, match="key.path=v1,v2"):
        parse_grid(["losses.2.coeff"])
    with pytest.raises(ValueError, match="not both"):
        grid_points(parse_grid(["seed=0,1"]), seeds=2)


def test_settled_window_and_pareto_by_hand():
    hist = [{"step": s, "x": float(s)} for s in range(0, 101, 10)] + [{"step": 100, "y": 1.0}]
    assert settled(hist, "x", 0.2) == (90.0, 3)  # steps 80, 90, 100
    assert settled(hist, "missing", 0.2) == (None, 0)
    pts = [(1.0, 5.0), (2.0, 1.0), (3.0, 2.0), (0.5, 9.0), (2.0, 0.5)]
    assert pareto_front(pts) == [3, 0, 4]


def test_sweep_then_report(tmp_path, capsys):
    cfg = tiny_tms_config(eval_every=10)
    cfg["eval"]["adversarial"] = {"n_steps": 2, "step_size": 0.5}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sweep"
    args = ["sweep", str(path), "--grid", "losses.2.coeff=1e-3,3e-2", "--jobs", "2", "--out", str(out)]
    assert main(args) == 0
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["done", "done"]
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert all((r / io.EVAL).is_file() for r in runs)
    # rerunning finishes nothing new and overwrites nothing
    stamp = [(r / io.EVAL).stat().st_mtime_ns for r in runs]
    assert main(args) == 0
    assert "2 already done" in capsys.readouterr().out
    assert stamp == [(r / io.EVAL).stat().st_mtime_ns for r in runs]

    row = collect(runs[0])
    assert row["budget"] == "2x0.5" and row["adversarial_n"] >= 1 and row["ci_l0"] is not None
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "losses.2.coeff=0.001" in md and "losses.2.coeff=0.03" in md and "budget 2x0.5" in md
    assert (tmp_path / "rep" / "report.png").stat().st_size > 1000


def test_sweep_refuses_a_directory_it_did_not_make(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_tms_config()))
    out = tmp_path / "sweep"
    (out / "losses.2.coeff=1e-3").mkdir(parents=True)
    (out / "losses.2.coeff=1e-3" / "notes.txt").write_text("mine")
    assert main(["sweep", str(path), "--grid", "losses.2.coeff=1e-3", "--out", str(out)]) == 2
    assert (out / "losses.2.coeff=1e-3" / "notes.txt").read_text() == "mine"


def test_sweep_names_a_bad_key_before_running_anything(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_tms_config()))
    assert main(["sweep", str(path), "--grid", "train.stpes=1,2", "--out", str(tmp_path / "s")]) == 2
    assert "stpes" in capsys.readouterr().err
    assert not any((tmp_path / "s").glob("*/config.yaml"))


def test_seeds_of_one_setting_are_named_once_on_the_front_figure():
    def row(seed, coeff):
        return {"config": {"seed": seed, "losses.2.coeff": coeff}, "losses": ["a"], "run": f"r{seed}{coeff}"}

    rows = [row(0, 1e-5), row(1, 1e-5), row(0, 3e-4), row(1, 3e-4)]
    assert point_labels(rows, varying(rows), rows) == ["losses.2.coeff=1e-05", None, "losses.2.coeff=0.0003", None]
    seeds_only = [row(0, 1e-5), row(1, 1e-5)]
    assert point_labels(seeds_only, varying(seeds_only), seeds_only) == ["seed=0", "seed=1"]
