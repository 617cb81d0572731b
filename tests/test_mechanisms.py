"""Mechanism and Grouping objects, the run-level grouping, its files and the `spd group` command."""

import json

import pytest
import torch

from spd.ci import CIConfig
from spd.cli import main as spd_main
from spd.mechanisms import (
    Grouping,
    Mechanism,
    binarise,
    compare_groupings,
    from_labels,
    group_model,
    grouping_path,
    load_grouping,
    save_result,
    score_against_truth,
    truth_labels,
)
from spd.model import ComponentModel, ModuleSpec
from tests.helpers import ROOT, tiny_tms_config


def _grouping() -> Grouping:
    mechs = [Mechanism("m0", (("fc1", 1), ("fc2", 0), ("fc1", 3)), 0.5), Mechanism("m1", (("fc2", 4),), 0.1)]
    return Grouping(mechs, {"method": "mdl", "alpha": 2.0})


def test_importance_is_the_max_over_members_across_matrices():
    ci = {
        "fc1": torch.tensor([[0.0, 0.2, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.7, 0.9]]),
        "fc2": torch.tensor([[0.6, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]]),
    }
    g = _grouping()
    assert g["m0"].importance(ci).tolist() == pytest.approx([0.6, 0.7])
    assert g["m1"].importance(ci).tolist() == pytest.approx([0.0, 1.0])
    with pytest.raises(KeyError, match="no mechanism 'm9'"):
        g["m9"]


def test_summed_weight_rank_and_members(cm):
    g = _grouping()
    w = g["m0"].weights(cm)
    assert set(w) == {"fc1", "fc2"}
    assert torch.allclose(w["fc1"], cm.comp("fc1").subcomponent(1) + cm.comp("fc1").subcomponent(3))
    assert torch.allclose(w["fc2"], cm.comp("fc2").subcomponent(0))
    assert g["m0"].rank(cm) == 3 and g["m0"].modules == ["fc1", "fc2"] and g["m0"].indices("fc1") == [1, 3]
    assert g.members == [("fc1", 1), ("fc2", 0), ("fc1", 3), ("fc2", 4)]
    assert g.labels() == ["m0", "m0", "m0", "m1"]


def test_masks_switch_off_exactly_the_mechanism(cm):
    x = torch.randn(7, 3)
    g = _grouping()
    with torch.no_grad():
        masks, deltas = g.masks(cm, [])
        # nothing off, delta kept: components + delta = W, so the target's output
        assert torch.allclose(cm(x, masks, deltas), cm.target(x), atol=1e-5)
        masks, deltas = g.masks(cm, ["m0"])
        assert masks["fc1"].tolist() == [1, 0, 1, 0, 1] and masks["fc2"].tolist() == [0, 1, 1, 1, 1]
        manual = {"fc1": torch.tensor([1.0, 0, 1, 0, 1]), "fc2": torch.tensor([0.0, 1, 1, 1, 1])}
        assert torch.allclose(cm(x, masks, deltas), cm(x, manual, {n: torch.ones(()) for n in manual}))
        assert not torch.allclose(cm(x, masks, deltas), cm.target(x), atol=1e-3)
        assert g.masks(cm, ["m1"], delta=False)[1] is None


def test_grouping_json_round_trip_and_no_silent_overwrite(tmp_path):
    g = _grouping()
    path = tmp_path / "grouping-alpha2.json"
    save_result(path, {"mdl": g, "hierarchical": g, "truth": None})
    back = load_grouping(path)
    assert back.mechanisms == g.mechanisms and back.params == g.params
    with pytest.raises(FileExistsError, match="--force"):
        save_result(path, {"mdl": g})
    save_result(path, {"mdl": g}, force=True)
    with pytest.raises(ValueError, match="no 'hierarchical' grouping"):
        load_grouping(path, "hierarchical")
    assert grouping_path(tmp_path, 2.0).name == "grouping-alpha2.json"


def test_binarise_keeps_alive_columns_across_modules_in_order():
    batches = [
        {"a": torch.tensor([[0.5, 0.0], [0.0, 0.0]]), "b": torch.tensor([[[0.0, 0.2, 0.0]], [[0.0, 0.3, 0.0]]])},
        {"a": torch.tensor([[0.9, 0.0], [0.0, 0.05]]), "b": torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])},
    ]
    active, cols = binarise(batches, 0.1)
    assert cols == [("a", 0), ("b", 0), ("b", 1)]
    assert active.tolist() == [[True, False, True], [False, False, True], [True, True, False], [False, False, False]]
    _, cols = binarise(batches, 0.1, min_density=0.3)  # b.0 fires on 1 of 4 samples
    assert cols == [("a", 0), ("b", 1)]


def test_scores_against_truth_hand_case():
    members = [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2)]
    truth, unexplained = truth_labels(members, {"a": ["f0", "f1"], "b": ["f0", "W", None]})
    assert unexplained == 1 and truth[("b", 2)] == "unexplained b:2"
    active = torch.ones(4, 5, dtype=torch.bool)
    right = from_labels(members, torch.tensor([0, 1, 0, 2, 3]), active, {"method": "mdl"})
    s = score_against_truth(right, truth)
    assert s["ari"] == 1.0 and s["exact"] == 4 and s["multi_member_true"] == 1 and s["multi_member_exact"] == 1
    wrong = from_labels(members, torch.tensor([0, 1, 1, 2, 3]), active, {"method": "mdl"})
    s = score_against_truth(wrong, truth)
    assert s["ari"] < 1.0 and s["exact"] == 2 and s["multi_member_exact"] == 0
    assert right.mechanisms[0].members == (("a", 0), ("b", 0))  # the largest mechanism is m0


def test_a_grouping_compared_with_itself_matches_everything(cm):
    g = _grouping()
    cmp = compare_groupings(g, cm, g, cm, torch.randn(16, 3))
    assert cmp["matched_cos>=0.9"] == 2 and cmp["matched_same_rank"] == 2
    assert cmp["mean_matched_cos"] == pytest.approx(1.0)


def test_decompositions_differing_where_nothing_downstream_reads_are_the_same_mechanisms():
    """Layer 0 writes into 3 hidden dimensions; layer 1 reads the first and the third. Decomposition b adds to piece 0's
    write a large part along hidden dimension 1 (the delta component takes it back): the weights' actions differ
    (cosine 0.2), what each piece does to the output does not."""
    target = torch.nn.Sequential(torch.nn.Linear(2, 3, bias=False), torch.nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        target[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))  # (out, in)
        target[1].weight.copy_(torch.tensor([[1.0, 0.0, 1.0]]))
    models = []
    for extra in (0.0, 5.0):
        m = ComponentModel(target, [ModuleSpec(pattern="0", C=2)], CIConfig(type="mlp", hidden=[2]))
        with torch.no_grad():
            m.comp("0").V.copy_(torch.eye(2))
            m.comp("0").U.copy_(torch.tensor([[1.0, extra, 0.0], [0.0, 0.0, 1.0]]))
        models.append(m)
    g = Grouping([Mechanism("m0", (("0", 0),)), Mechanism("m1", (("0", 1),))], {"method": "mdl", "alpha": 2.0})
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    cmp = compare_groupings(g, models[0], g, models[1], x)
    assert cmp["matched_cos>=0.9"] == 2 and cmp["mean_matched_cos"] == pytest.approx(1.0)
    action = [x @ m.comp("0").weight_of(torch.tensor([0])) for m in models]
    assert torch.nn.functional.cosine_similarity(action[0].flatten(), action[1].flatten(), dim=0) < 0.9


def test_group_model_on_planted_structure(cm):
    """fc1's subcomponents 0 and 1 are made important together, 2 alone; everything else never."""

    class Planted(torch.nn.Module):
        pass

    def sample(b: int, g: torch.Generator) -> torch.Tensor:
        return torch.randint(0, 3, (b,), generator=g)

    def fake_ci(x: torch.Tensor) -> object:
        ci1 = torch.zeros(len(x), 5)
        ci1[x == 1, 0] = ci1[x == 1, 1] = 1.0
        ci1[x == 2, 2] = 0.8
        return type("CI", (), {"lower": {"fc1": ci1, "fc2": torch.zeros(len(x), 5)}})()

    cm.causal_importances = fake_ci
    res = group_model(cm, sample, n_samples=600, batch_size=256, restarts=2)
    assert [m.members for m in res["mdl"].mechanisms] == [(("fc1", 0), ("fc1", 1)), (("fc1", 2),)]
    assert res["mdl"].params["alpha"] == 2.0 and res["truth"] is None
    assert res["mdl"].stats["mdl_bits"] < res["mdl"].stats["mdl_singletons_bits"]


def test_spd_group_stability_compares_only_runs_on_the_same_data(tmp_path, capsys):
    """The cyclic toy's input basis follows the task's seed: a second decomposition seed around the same target
    weights sees other data unless target.kwargs.seed pins it. Such pairs are named and left out."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "cyclic.yaml").read_text())
    cfg["train"].update(steps=20, batch_size=64, log_every=5, checkpoint_every=10, faithfulness_warmup={"steps": 5})
    cfg["eval"] = {"batch_size": 128, "n_batches": 1}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    d0, d1, d2 = (tmp_path / f"d{i}" for i in range(3))
    state = f"target.state_file={d0 / 'target.safetensors'}"
    for out, extra in ((d0, []), (d1, ["seed=1", state]), (d2, ["seed=2", state, "target.kwargs.seed=0"])):
        sets = [a for kv in extra for a in ("--set", kv)]
        assert spd_main(["train", str(tmp_path / "c.yaml"), "--out", str(out), "--quiet", *sets]) == 0
    capsys.readouterr()
    table = tmp_path / "stability.json"
    args = ["--alpha", "2", "--n-samples", "256", "--restarts", "1", "--stability-out", str(table)]
    assert spd_main(["group", str(d0), str(d1), str(d2), *args]) == 0
    out = capsys.readouterr().out
    assert out.count("on different data") == 2, out  # d1 against d0 and d2
    assert [(p["a"], p["b"]) for p in json.loads(table.read_text())] == [(str(d0), str(d2))]


def test_spd_group_writes_scores_and_refuses_to_overwrite(tmp_path, capsys):
    cfg = tiny_tms_config()
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    assert spd_main(["train", str(tmp_path / "c.yaml"), "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert spd_main(["group", str(run), "--alpha", "2", "--n-samples", "512", "--restarts", "2"]) == 0
    out = capsys.readouterr().out
    assert "alpha 2" in out and "ARI" in out and "hierarchical" in out
    saved = json.loads((run / "grouping-alpha2.json").read_text())
    assert saved["mdl"]["params"]["alpha"] == 2.0 and saved["mdl"]["params"]["threshold"] == 0.1
    assert set(saved["truth"]) == {"unexplained_alive", "mdl", "hierarchical"}
    assert spd_main(["group", str(run), "--alpha", "2"]) == 2  # refused: exists
    assert "nothing was overwritten" in capsys.readouterr().err
    assert spd_main(["group", str(run), "--alpha", "2", "--force", "--n-samples", "256"]) == 0
