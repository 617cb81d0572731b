"""Choosing what to ablate by the sign and size of its effect (`spd.effects`): the removal hooks equal the weight
edits, relative effects by hand, the rule by hand, the selection on an exact TMS decomposition, and the unlearning
study and `spd ablate` with the effect rule."""

import copy
import json

import pytest
import torch
from torch import nn

from spd.ablate import edited_target
from spd.cli import main as spd_main
from spd.config import load_config
from spd.effects import EffectRule, EffectScores, lone_effects, piece_remover, select_by_effect, unit_remover
from spd.model import ComponentModel, ModuleSpec
from spd.run import decompose
from spd.units import Unit, kinds_text, target_units, zero_units
from spd.unlearning import _neurons_matched, measure, unlearning_study
from tests.helpers import tiny_tms_config
from tests.test_ablate import HandTMS, _data, hand  # noqa: F401  (fixture)
from toy_models.tms import metrics as tms_metrics


def _tms_loss(t, x):
    return measure(t, t, x, tms_metrics, "mse", 4096, divergence=False)["loss"]


@pytest.mark.parametrize("rank", [1, 2])
def test_piece_removal_hook_computes_the_weight_edit(two_layer, rank):
    torch.manual_seed(3)
    model = ComponentModel(two_layer, [ModuleSpec(pattern="fc*", C=3)], None, rank=rank)
    x = torch.randn(16, 3)
    for members in ([("fc1", 0)], [("fc1", 2), ("fc2", 1)]):
        hooks = piece_remover(model, members)(model.target)
        with torch.no_grad():
            hooked = model.target(x)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            torch.testing.assert_close(hooked, edited_target(model, members)(x))
            assert not torch.allclose(hooked, model.target(x))  # hooks removed, and the pieces mattered


def test_piece_removal_hook_on_an_embedding():
    class Emb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 4)

        def forward(self, x):
            return self.emb(x)

    torch.manual_seed(0)
    model = ComponentModel(Emb(), [ModuleSpec(pattern="emb", C=3)], None)
    ids = torch.tensor([[0, 3, 6, 3]])
    hooks = piece_remover(model, [("emb", 1)])(model.target)
    with torch.no_grad():
        hooked = model.target(ids)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(hooked, edited_target(model, [("emb", 1)])(ids))


def test_lone_effects_are_relative_changes_by_hand():
    """W = [[1, 2], [3, 4]], x = [1, 1]: outputs (3, 7), score = their sum = 10. Zeroing output 0 leaves 7
    (-30%), output 1 leaves 3 (-70%). With a base score of 0 the change itself is returned."""
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    t = nn.Sequential(lin)
    x = torch.ones(1, 2)
    removers = [unit_remover(Unit("0", 0)), unit_remover(Unit("0", 1))]
    eff = lone_effects(t, removers, lambda m, xb: m(xb).sum().item(), x)
    torch.testing.assert_close(eff, torch.tensor([-0.3, -0.7]))
    eff0 = lone_effects(t, removers, lambda m, xb: m(xb).sum().item() - 10.0, x)
    torch.testing.assert_close(eff0, torch.tensor([-3.0, -7.0]))
    torch.testing.assert_close(t(x), torch.tensor([[3.0, 7.0]]), check_dtype=False)  # no hook left behind


def test_input_units_are_the_columns_an_mlp_output_matrix_reads(two_layer):
    """fc2 (4 -> 2) reads the 4 hidden neurons: zeroing input unit 1 zeroes column 1 (the bias stays), and the
    removal hook computes the same function."""
    units = target_units(two_layer, ["fc2"], inputs=True)
    assert units == [Unit("fc2", j, "input") for j in range(4)] and units[1].label == "fc2#in1"
    edited = copy.deepcopy(two_layer)
    zero_units(edited, [units[1]])
    assert edited.fc2.weight[:, 1].abs().sum() == 0 and edited.fc2.weight[:, [0, 2, 3]].abs().sum() > 0
    torch.testing.assert_close(edited.fc2.bias, two_layer.fc2.bias)
    x = torch.randn(8, 3)
    hooks = unit_remover(units[1])(two_layer)
    with torch.no_grad():
        hooked = two_layer(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(hooked, edited(x))
        hidden = torch.relu(two_layer.fc1(x))
        torch.testing.assert_close(hooked, two_layer(x) - hidden[:, 1:2] * two_layer.fc2.weight[:, 1])
    assert kinds_text(units) == "input units"


def test_effect_rule_hand_case():
    s = EffectScores(list("abcde"), torch.tensor([0.5, 0.002, 0.0005, 0.3, 0.2]),
                     torch.tensor([0.01, -0.1, 0.0, 0.05, 0.03]))  # fmt: skip
    # a: 0.5 >= 10 x 0.01; b: retain improves; c: below forget_min; d: 0.3 < 10 x 0.05; e: 0.2 < 10 x 0.03
    assert s.passing(EffectRule()) == [0, 1]
    assert s.passing(EffectRule(min_ratio=5.0)) == [0, 3, 4, 1]  # d: 0.3 >= 5 x 0.05, e: 0.2 >= 5 x 0.03; by rank
    assert s.passing(EffectRule(forget_min=0.0)) == [0, 1, 2]
    assert s.ranked() == [0, 3, 4, 1, 2]
    with pytest.raises(ValueError, match="min_ratio"):
        EffectRule(min_ratio=0.5)
    with pytest.raises(ValueError, match="candidate_min"):
        EffectRule(candidate_min=2.0)


def test_effect_selection_reads_the_sign(hand):  # noqa: F811
    """On an exact TMS decomposition, removing feature 2's pieces alone raises the loss on "only feature 2" inputs
    and leaves other inputs nearly alone: both are chosen, with effects equal to the edited models' losses. A
    score that rewards forgetting (the negated loss) reads the same pieces as helping: none is chosen, though the
    importance rule would choose both."""
    forget, retain = _data("only:2", 256), _data("without:2", 256, seed=1)
    rule = EffectRule(candidate_min=0.5)
    sel, scores = select_by_effect(hand, forget, retain, rule, _tms_loss)
    assert sorted(sel.members) == [("linear1", 2), ("linear2", 2)]  # in the rule's order (larger effect first)
    assert scores.units == ["linear1:2", "linear2:2"]  # candidates: important on >= 50% of forget inputs
    assert sel.how["by"] == "effect" and sel.how["candidates"] == 2
    f0 = _tms_loss(hand.target, forget)
    for i, u in enumerate(scores.units):
        mod, _, c = u.partition(":")
        want = _tms_loss(edited_target(hand, [(mod, int(c))]), forget) / f0 - 1
        assert scores.forget[i].item() == pytest.approx(want, rel=1e-4)
        assert scores.forget[i] > 0.1 and scores.retain[i] < 0.1 * scores.forget[i]
    flipped, _ = select_by_effect(hand, forget, retain, rule, lambda t, x: -_tms_loss(t, x) + 10.0)
    assert flipped.members == []


def test_study_with_the_effect_rule_and_uncapped_matching(hand):  # noqa: F811
    forget, retain = _data("only:2", 512), _data("without:2", 1024, seed=1)
    st = unlearning_study(hand, forget, retain, rule=EffectRule(candidate_min=0.5), metrics=tms_metrics,
                          ga_lr=1e-2, cap_at_zero=False)  # fmt: skip
    rep, m = st.report, st.report["methods"]
    assert sorted(rep["selection"]["members"]) == ["linear1:2", "linear2:2"] and rep["selection"]["by"] == "effect"
    assert rep["matched_forget"] == m["components"]["forget"]["loss"] and rep["matched_capped_at_zero"] is False
    assert "removing the unit alone" in m["neurons"]["rule"]  # the baseline's units chosen by the same rule
    for b in ("neurons", "gradient_ascent"):
        assert m[b]["matched"], m[b]
        assert m[b]["forget"]["loss"] >= rep["matched_forget"] - 1e-9


def test_unmatched_neuron_search_keeps_the_best_prefix():
    """forget "loss" = out_1 - out_0 with outputs (3, 7): 4; zeroing output 0 gives 7, then output 1 gives 0.
    A target of 100 is never reached: the first unit alone (7) is kept, reported as not matched."""
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    t = nn.Sequential(lin)
    x = torch.ones(1, 2)

    def loss(m: nn.Module) -> float:
        with torch.no_grad():
            out = m(x)[0]
        return (out[1] - out[0]).item()

    units = [Unit("0", 0), Unit("0", 1)]
    scores = EffectScores(["0#0", "0#1"], torch.tensor([0.5, 0.1]), torch.tensor([0.0, 0.0]))
    edited, info = _neurons_matched(t, ["0"], units, scores, [], loss, 100.0)
    assert info["units"] == 1 and info["matched"] is False and loss(edited) == pytest.approx(7.0)
    want = nn.Sequential(nn.Linear(2, 2, bias=False))
    want.load_state_dict(t.state_dict())
    zero_units(want, [units[0]])
    torch.testing.assert_close(edited[0].weight, want[0].weight)
    edited, info = _neurons_matched(t, ["0"], units, scores, [], loss, 5.0)
    assert info["units"] == 1 and info["matched"] is True


def test_spd_ablate_by_effect(tmp_path, capsys):
    run_dir = tmp_path / "run"
    decompose(load_config(tiny_tms_config()), run_dir, progress=False)
    out = tmp_path / "abl"
    args = [str(run_dir), "--forget", "only:0", "--retain", "without:0", "--n", "256", "--by", "effect",
            "--effect-ratio", "3", "--no-cap", "--no-honest-scale", "--ga-steps", "50", "--out", str(out)]  # fmt: skip
    assert spd_main(["ablate", *args]) == 0
    rep = json.loads((out / "ablation.json").read_text())
    assert rep["selection"]["by"] == "effect" and rep["selection"]["rule"]["min_ratio"] == 3.0
    assert rep["matched_capped_at_zero"] is False
    assert "removing the unit alone" in (out / "ablation.md").read_text()
    assert spd_main(["ablate", str(run_dir), "--forget", "only:0", "--retain", "all", "--by", "effect",
                     "--effect-ratio", "0.5", "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "min_ratio" in capsys.readouterr().err
