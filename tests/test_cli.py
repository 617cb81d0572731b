import json
import subprocess
import sys

import yaml
from helpers import ROOT, tiny_tms_config

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


def test_train_eval_json_and_refusal(tmp_path, capsys):
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
    assert main(["train", str(cfg_path), "--out", str(out), "--quiet"]) == 2
    assert "already holds files" in capsys.readouterr().err


def test_bad_config_exit_code_and_message(tmp_path, capsys):
    cfg = tiny_tms_config()
    cfg["train"]["stepz"] = 5
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "train.stepz: unknown field" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
