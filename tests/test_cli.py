import json
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import ROOT, tiny_tms_config
from safetensors.torch import load_file

from spd.cli import main


def test_help_explains_itself():
    out = subprocess.run([sys.executable, "-m", "spd.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    for word in ("spd train CONFIG", "spd eval RUN_DIR", "spd resume RUN_DIR", "--json"):
        assert word in out.stdout


def test_help_does_not_import_torch():
    code = "import sys; from spd.cli import parser; parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_train_eval_json_and_refusal(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPD_TARGET_CACHE", str(tmp_path / "cache"))  # the honest scale's compute curve
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_tms_config()))
    out = tmp_path / "run"
    assert main(["train", str(cfg_path), "--out", str(out), "--quiet", "--set", "train.steps=12"]) == 0
    assert "ground-truth recovery:" in capsys.readouterr().out
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in (
        "gt/mmcs/linear1",
        "gt/identity_ci_error/linear1",
        "gt/alive/linear2",
        "gt/passed",
        "recon/ci",
        "faithfulness_rel/linear1",
        "ci_l0/linear1",
        "target/n_represented",
    ):
        assert key in result, key
    hs = result["honest_scale"]
    assert set(hs["rows"]) == {"CI-masked", "rounded-CI-masked", "stochastic-masked"}
    assert "ladder" in hs["compute"]["sources"] and "checkpoint" in hs["compute"]["sources"]
    for row in hs["rows"].values():
        assert row["gap_rel"] == pytest.approx((row["loss"] - hs["target_loss"]) / hs["target_loss"])
        assert row["compute_fraction"] > 0
    assert main(["eval", str(out)]) == 0
    assert "## Honest scale" in capsys.readouterr().out
    assert main(["train", str(cfg_path), "--out", str(out), "--quiet"]) == 2
    assert "already holds files" in capsys.readouterr().err


def test_bad_config_exit_code_and_message(tmp_path, capsys):
    cfg = tiny_tms_config()
    cfg["train"]["stepz"] = 5
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "train.stepz: unknown field" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_degrade_writes_a_target_that_decomposes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPD_TARGET_CACHE", str(tmp_path / "cache"))
    cfg = tiny_tms_config()
    cfg["natural"] = {"n_steps": 200, "burnin": 100, "draw_every": 10, "n_eval": 4096, "rtol": 0.05}
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    from spd.config import load_config
    from spd.task import build_task

    task = build_task(cfg["target"]["factory"], cfg["target"]["kwargs"], 0)
    from spd.natural import task_loss_fn

    loss0 = task_loss_fn(task.metrics)(task.target, task.sample_batch(65536, torch.Generator().manual_seed(5))).item()
    out = tmp_path / "deg"
    assert main(["degrade", str(cfg_path), "--loss", str(1.5 * loss0), "--out", str(out)]) == 0
    assert "natural degradation" in capsys.readouterr().out
    summary = json.loads((out / "degrade.json").read_text())
    assert abs(summary["loss_error_rel"]) < 0.05 and summary["nbeta"] > 0
    saved = load_config(out / "config.yaml")
    assert saved.target.state_file == str(out / "target.safetensors")
    # the degraded target is what the written config decomposes, and it has the degraded loss
    degraded = build_task(saved.target.factory, saved.target.kwargs, 0, load_file(str(out / "target.safetensors")))
    x = task.sample_batch(65536, torch.Generator().manual_seed(6))
    got = task_loss_fn(task.metrics)(degraded.target, x).item()
    assert got == pytest.approx(1.5 * loss0, rel=0.1)
    assert main(["train", str(out / "config.yaml"), "--out", str(tmp_path / "run"), "--quiet",
                 "--set", "train.steps=4"]) == 0  # fmt: skip
    assert main(["degrade", str(cfg_path), "--loss", str(1.5 * loss0), "--out", str(out)]) == 2  # no overwrite
    assert "nothing was overwritten" in capsys.readouterr().err
    assert main(["degrade", str(cfg_path), "--loss", str(0.5 * loss0), "--out", str(tmp_path / "d2")]) == 2
    assert "not above the target's own loss" in capsys.readouterr().err
    # a run directory works as the source too (its saved target), here by compute fraction on the toy's curve
    assert main(["degrade", str(tmp_path / "run"), "--compute-fraction", "0.2", "--out", str(tmp_path / "d3")]) == 0
    request = json.loads((tmp_path / "d3" / "degrade.json").read_text())["request"]
    assert request["compute_fraction"] == 0.2 and request["loss"] > request["target_loss"]


def test_eval_save_rewrites_eval_json_and_keeps_the_old_one(tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_tms_config()))
    out = tmp_path / "run"
    assert main(["train", str(cfg_path), "--out", str(out), "--quiet", "--set", "train.steps=6"]) == 0
    first = json.loads((out / "eval.json").read_text())
    stale = first | {"diagnostics": ["[stale] from an older spd"], "recon/ci": -1.0}
    (out / "eval.json").write_text(json.dumps(stale))
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--no-honest-scale", "--save"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "eval.json").read_text())
    assert saved["recon/ci"] == printed["recon/ci"] == pytest.approx(first["recon/ci"])
    assert saved["diagnostics"] == first["diagnostics"]
    assert saved["train_seconds"] == first["train_seconds"]  # a training fact, carried over
    (kept,) = out.glob("eval.*.json")
    assert json.loads(kept.read_text()) == stale


def test_eval_save_refuses_an_unfinished_run(tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_tms_config()))
    out = tmp_path / "run"
    assert main(["train", str(cfg_path), "--out", str(out), "--quiet", "--set", "train.steps=12"]) == 0
    (out / "eval.json").unlink()  # as if it had crashed after its checkpoint at step 10
    (out / "model.safetensors").unlink()
    assert main(["eval", str(out), "--save"]) == 2
    assert "unfinished" in capsys.readouterr().err
    assert not (out / "eval.json").exists()


def test_eval_loads_a_gpu_run_where_it_can(tmp_path, capsys, monkeypatch):
    """`spd eval/ablate/group` load a run on its train.device when this machine has it (a GPU run evaluated on the
    GPU machine ran on the CPU before and timed out), on the CPU when not, and refuse a --device that is missing."""
    from spd import run as run_mod

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_tms_config()))
    out = tmp_path / "run"
    assert main(["train", str(cfg_path), "--out", str(out), "--quiet", "--set", "train.steps=4"]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["train"]["device"] = "cuda"  # as if trained on a GPU
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_mod.run_device("cuda") == "cpu" and run_mod.run_device("cpu") == "cpu"
    assert run_mod.run_device("cuda", "cpu") == "cpu"
    assert run_mod.load_run(out, "auto").device.type == "cpu"
    assert main(["eval", str(out), "--json", "--no-honest-scale"]) == 0
    assert "recon/ci" in json.loads(capsys.readouterr().out)
    assert main(["eval", str(out), "--json", "--device", "cuda"]) == 2
    assert "CUDA is not available here; use --device cpu" in capsys.readouterr().err

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_mod.run_device("cuda") == "cuda" and run_mod.run_device("cuda:1") == "cuda:1"
    assert run_mod.run_device("cuda", "cpu") == "cpu"
