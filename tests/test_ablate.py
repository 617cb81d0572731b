"""Ablation as a weight edit, the forget/retain selection rule, the unlearning study with its baselines, the
exported model (reloaded without spd) and `spd ablate`."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from spd.ablate import (
    Rule,
    Scores,
    edit_stats,
    edited_target,
    firing,
    parse_members,
    save_edited,
    select_by_data,
)
from spd.cli import main as spd_main
from spd.config import load_config
from spd.mechanisms import group_model, member_masks
from spd.model import CausalImportances, ComponentModel, ModuleSpec
from spd.run import decompose
from spd.units import Unit, target_units, unit_effects, zero_units
from spd.unlearning import load_data, unlearning_study, write_study
from tests.helpers import ROOT, tiny_tms_config
from toy_models.data import feature_subset
from toy_models.nets import TMS
from toy_models.tms import metrics as tms_metrics


class HandTMS(ComponentModel):
    """TMS 5-2 decomposed exactly into its ground truth: subcomponent c of linear1 is W[:, c] e_c^T and of linear2
    e_c W[c, :]^T; the CI of both is 1 where feature c is on, else 0."""

    def __init__(self, target: TMS) -> None:
        super().__init__(target, [ModuleSpec(pattern="linear*", C=5)], None)
        with torch.no_grad():
            w1 = target.linear1.weight.T  # (5, 2) in x @ W orientation
            self.comp("linear1").V.copy_(torch.eye(5))
            self.comp("linear1").U.copy_(w1)
            self.comp("linear2").V.copy_(w1.T)
            self.comp("linear2").U.copy_(torch.eye(5))

    def importances(self, x, clean):
        on = (x > 0).float()
        return CausalImportances(lower={"linear1": on, "linear2": on}, upper={"linear1": on, "linear2": on})


@pytest.fixture
def hand() -> HandTMS:
    torch.manual_seed(0)
    t = TMS(5, 2)
    with torch.no_grad():
        t.linear2.weight.copy_(t.linear1.weight.T)
        t.linear2.bias.copy_(torch.tensor([-0.1, -0.2, -0.05, -0.3, -0.15]))
    return HandTMS(t)


def _data(spec, n=512, seed=0):
    return feature_subset(spec, n, 5, 0.2, torch.Generator().manual_seed(seed))


# ---- the edit ------------------------------------------------------------------------------------------
def test_edit_subtracts_exactly_the_chosen_subcomponents(cm):
    members = [("fc1", 1), ("fc1", 3), ("fc2", 0)]
    edited = edited_target(cm, members)
    V1, U1, V2, U2 = cm.comp("fc1").V, cm.comp("fc1").U, cm.comp("fc2").V, cm.comp("fc2").U
    want1 = cm.target.fc1.weight - (torch.outer(V1[:, 1], U1[1]) + torch.outer(V1[:, 3], U1[3])).T
    want2 = cm.target.fc2.weight - torch.outer(V2[:, 0], U2[0]).T
    torch.testing.assert_close(edited.fc1.weight, want1)
    torch.testing.assert_close(edited.fc2.weight, want2)
    torch.testing.assert_close(edited.fc1.bias, cm.target.fc1.bias)  # biases untouched
    assert edited is not cm.target and not torch.equal(cm.target.fc1.weight, edited.fc1.weight)  # a copy
    stats = edit_stats(cm.target, edited)
    assert stats["parameters_changed"] == (want1 != cm.target.fc1.weight).sum() + (want2 != cm.target.fc2.weight).sum()
    assert set(stats["tensors"]) == {"fc1.weight", "fc2.weight"}


@pytest.mark.parametrize("rank", [1, 2])
def test_edited_model_equals_the_masked_pass_with_the_delta_kept(two_layer, rank):
    """W' = W - sum(off) is what masks (off at 0, the rest and the delta at 1) compute; rank 2 = APD components."""
    torch.manual_seed(3)
    model = ComponentModel(two_layer, [ModuleSpec(pattern="fc*", C=3)], None, rank=rank)
    x = torch.randn(16, 3)
    off = [("fc1", 0), ("fc2", 2)]
    with torch.no_grad():
        torch.testing.assert_close(model(x, *member_masks(model, off)), edited_target(model, off)(x))


def test_subcomponent_ids_are_checked_with_clear_errors(cm):
    assert parse_members(["fc1:1,3", "fc2:0", "fc1:1"], cm) == [("fc1", 1), ("fc1", 3), ("fc2", 0)]
    with pytest.raises(ValueError, match="MODULE one of"):
        parse_members(["fc9:1"], cm)
    with pytest.raises(ValueError, match="C = 5"):
        parse_members(["fc1:5"], cm)
    with pytest.raises(ValueError, match="integers"):
        parse_members(["fc1:a"], cm)


def test_tied_target_weights_cannot_be_edited_twice(cm):
    cm.target.fc2.weight = cm.target.fc1.weight  # not shape-compatible for a forward, but shares storage
    cm._target_modules["fc2"] = cm.target.fc2
    with pytest.raises(ValueError, match="share one weight tensor"):
        edited_target(cm, [("fc1", 0), ("fc2", 0)])


# ---- the rule ------------------------------------------------------------------------------------------
def test_rule_hand_case():
    imp = torch.tensor([[0.9, 0.0, 0.5], [0.2, 0.05, 0.0], [0.0, 0.3, 0.11], [0.8, 0.0, 0.0]])
    assert firing(imp, 0.1).tolist() == pytest.approx([0.75, 0.25, 0.5])
    s = Scores(["a", "b", "c"], torch.tensor([0.9, 0.6, 0.2]), torch.tensor([0.0, 0.05, 0.0]))
    assert s.passing(Rule(0.1, 0.5, 0.01)) == [0]
    assert s.passing(Rule(0.1, 0.5, 0.1)) == [0, 1]
    assert s.passing(Rule(0.1, 0.5, 0.1, min_ratio=20.0)) == [0]  # 0.6 < 20 x 0.05
    assert s.ranked() == [0, 1, 2]
    with pytest.raises(ValueError, match="forget_min"):
        Rule(forget_min=1.5)


def test_data_choose_the_forgotten_features_pieces(hand):
    sel, scores = select_by_data(hand, _data("only:2"), _data("without:2", seed=1), Rule())
    assert sel.members == [("linear1", 2), ("linear2", 2)]
    assert sel.how["rule"] == {"threshold": 0.1, "forget_min": 0.5, "retain_max": 0.05, "min_ratio": 10.0}
    assert [c["unit"] for c in sel.how["chosen"]] == ["linear1:2", "linear2:2"]


# ---- the study -----------------------------------------------------------------------------------------
def test_study_hand_case_and_baselines(hand):
    """Ablating feature 2's pieces of an exact decomposition: on "only feature 2" the edited TMS outputs ReLU(b),
    exactly what zeroing both matrices gives (ratio 1); on retain data, only output 2 changes, to ReLU(b_2)."""
    forget, retain = _data("only:2", 1024), _data("without:2", 2048, seed=1)
    st = unlearning_study(hand, forget, retain, metrics=tms_metrics, ga_lr=1e-2)
    m = st.report["methods"]
    assert st.report["selection"]["members"] == ["linear1:2", "linear2:2"]
    assert m["components"]["forget_vs_zero"] == pytest.approx(1.0, abs=1e-6)
    t, r_eval = hand.target, retain[1024:]
    with torch.no_grad():
        before = F.relu(r_eval @ t.linear1.weight.T @ t.linear2.weight.T + t.linear2.bias)
        after = before.clone()
        after[:, 2] = F.relu(t.linear2.bias[2])
    base, want = (before - r_eval).pow(2).mean(), (after - r_eval).pow(2).mean()
    assert m["components"]["retain"]["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert m["components"]["retain_change"] == pytest.approx((want / base - 1).item(), rel=1e-4)
    assert st.report["edit_vs_masked_pass_max_abs_diff"] < 1e-6
    # both baselines reach the same forget loss
    target = st.report["matched_forget"]
    for b in ("neurons", "gradient_ascent"):
        assert m[b]["matched"], m[b]
        assert m[b]["forget"]["loss"] >= target - 1e-9
    assert m["gradient_ascent"]["forget"]["loss"] == pytest.approx(target, rel=1e-2)  # interpolated, no overshoot


def test_neuron_importance_is_the_output_change_when_zeroed(hand):
    """Zeroing TMS output unit j (pre-ReLU) sets output j to ReLU(0) = 0: the squared change is out_j^2."""
    x = _data("all", 64)
    eff = unit_effects(hand.target, [Unit("linear2", 0), Unit("linear2", 3)], x, 16)
    with torch.no_grad():
        out = hand.target(x)
    torch.testing.assert_close(eff, out[:, [0, 3]].pow(2))


def test_zeroing_output_units():
    t = TMS(5, 2)
    assert target_units(t, ["linear1", "linear2"]) == [Unit("linear1", 0), Unit("linear1", 1)] + [
        Unit("linear2", j) for j in range(5)
    ]
    zero_units(t, [Unit("linear2", 3)])
    assert t.linear2.weight[3].abs().sum() == 0 and t.linear2.bias[3] == 0 and t.linear2.weight[2].abs().sum() > 0


# ---- export --------------------------------------------------------------------------------------------
def test_exported_model_reloads_without_spd_and_matches(hand, tmp_path):
    forget, retain = _data("only:1", 256), _data("without:1", 256, seed=1)
    st = unlearning_study(hand, forget, retain, baselines=False, metrics=tms_metrics)
    arch = {"class": "toy_models.nets:TMS", "kwargs": {"n_features": 5, "n_hidden": 2}}
    paths = write_study(st, tmp_path / "abl", arch)
    with pytest.raises(FileExistsError, match="nothing was overwritten"):
        write_study(st, tmp_path / "abl", arch)
    x = _data("all", 64, seed=5)
    with torch.no_grad():
        want = hand(x, *member_masks(hand, [("linear1", 1), ("linear2", 1)]))
    save_file({"x": x, "y": want}, str(tmp_path / "io.safetensors"))
    info = json.loads((paths["edited"] / "model.json").read_text())
    script = f"""
import sys
sys.modules["spd"] = None  # importing spd now fails: the model must load without it
from safetensors.torch import load_file
import torch
io = load_file({str(tmp_path / "io.safetensors")!r})
import os
os.chdir({str(paths["edited"])!r})
{info["load"].replace("; ", chr(10))}
assert not any(m == "spd" or m.startswith("spd.") for m in sys.modules if sys.modules[m] is not None)
torch.testing.assert_close(model(io["x"]), io["y"], rtol=0, atol=1e-6)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_save_pretrained_models_are_saved_their_own_way(tmp_path):
    class Pretrained(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def save_pretrained(self, path, safe_serialization=True):
            save_file(self.state_dict(), f"{path}/pretrained.safetensors")

    save_edited(Pretrained(), tmp_path / "e", None, {})
    assert (tmp_path / "e" / "pretrained.safetensors").is_file() and not (tmp_path / "e" / "model.safetensors").exists()
    assert "save_pretrained" in json.loads((tmp_path / "e" / "model.json").read_text())["format"]


# ---- data and the command line -------------------------------------------------------------------------
def test_forget_and_retain_data_forms(tmp_path):
    save_file({"a": torch.ones(4, 5)}, str(tmp_path / "one.safetensors"))
    save_file({"input_ids": torch.ones(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3)},
              str(tmp_path / "tok.safetensors"))  # fmt: skip
    save_file({"p": torch.ones(1), "q": torch.ones(1)}, str(tmp_path / "bad.safetensors"))
    assert load_data(str(tmp_path / "one.safetensors"), None, 0, 0).shape == (4, 5)
    assert set(load_data(str(tmp_path / "tok.safetensors"), None, 0, 0)) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="expected one tensor"):
        load_data(str(tmp_path / "bad.safetensors"), None, 0, 0)
    with pytest.raises(FileNotFoundError):
        load_data(str(tmp_path / "none.safetensors"), None, 0, 0)
    with pytest.raises(ValueError, match="names no data subsets"):
        load_data("only:1", None, 8, 0)
    x = _data("only:3", 100)
    assert (x[:, 3] > 0).all() and (x[:, [0, 1, 2, 4]] == 0).all()
    assert (_data("without:1,4", 200)[:, [1, 4]] == 0).all()
    with pytest.raises(ValueError, match="only:I"):
        _data("only:7")


def test_spd_ablate_writes_report_and_edited_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPD_TARGET_CACHE", str(tmp_path / "cache"))  # the honest scale's compute curve
    run_dir = tmp_path / "run"
    decompose(load_config(tiny_tms_config()), run_dir, progress=False)
    args = [str(run_dir), "--forget", "only:0", "--retain", "without:0", "--n", "256", "--ids", "linear1:0,1"]
    assert spd_main(["ablate", *args]) == 0
    out = run_dir / "ablations" / "only_0-vs-without_0"
    for f in ("ablation.json", "ablation.md", "ablation.png", "edited/model.safetensors", "edited/model.json"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "ablation.json").read_text())
    assert rep["selection"]["members"] == ["linear1:0", "linear1:1"] and rep["selection"]["kind"] == "ids"
    assert "ablate components" in capsys.readouterr().out
    # the honest scale of every edited model, on the training distribution
    hs = rep["honest_scale"]
    assert set(hs["rows"]) == {"ablate components", "ablate neurons/heads", "gradient ascent"}
    for row in hs["rows"].values():
        assert row["gap"] == pytest.approx(row["loss"] - hs["target_loss"])
        assert "compute_fraction" in row and ("natural_nbeta" in row or "natural_note" in row)
    assert "## Honest scale" in (out / "ablation.md").read_text()
    assert spd_main(["ablate", *args]) == 2  # refuses to overwrite
    assert "nothing was overwritten" in capsys.readouterr().err
    assert (
        spd_main(["ablate", str(run_dir), "--forget", "only:99", "--retain", "all", "--out", str(tmp_path / "x")]) == 2
    )
    assert "only:I" in capsys.readouterr().err


# ---- end to end: decomposition -> grouping -> forget one feature ----------------------------------------
def test_forgetting_each_feature_of_a_decomposed_tms(tms_5_2_fast):
    """TMS 5-2 on the reduced schedule: for every feature, the data choose exactly its mechanism and ablating it
    takes the forget loss to >= 90% of zero-ablation. The retain loss rises by 3-8%: each learned piece reads the
    other features' inputs a little (MMCS 0.999 leaves ~4% off-axis weight), and TMS 5-2's retain loss is tiny
    (1.3e-3), so that is checked at 10%, not at the 1% that TMS 40-10 and ResidMLP 1 are held to."""
    from toy_models.unlearning import feature_study

    run, _ = tms_5_2_fast  # the session's run of TMS 5-2 on its reduced schedule (conftest)
    grouping = group_model(run.model, run.task.sample_batch, n_samples=8192, restarts=1)["mdl"]
    res = feature_study(run, grouping, n_forget=1024, n_retain=2048)
    s = res["summary"]
    assert s["chosen_is_truth"] == s["features"] == 5, res["rows"]
    assert s["components"]["min_forget_vs_zero"] >= 0.9, res["rows"]
    assert s["components"]["max_abs_retain_change"] <= 0.1, res["rows"]
    assert s["neurons"]["matched"] == s["gradient_ascent"]["matched"] == 5
