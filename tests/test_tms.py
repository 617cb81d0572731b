from typing import Any

import pytest
import torch

from spd.ground_truth import score
from toy_models.tms import TMS, ground_truth, represented_features, tms_task, train_tms


def test_recipe_represents_all_five_features():
    task = tms_task(seed=0)  # the full recipe: 10k AdamW steps
    norms = task.target.linear1.weight.norm(dim=0)
    assert norms.min() > 0.9, norms  # the reference recipe left one column at norm 0.011 on seed 0
    assert task.info["n_represented"] == 5 and task.ground_truth.info["n_represented"] == 5
    W, _ = train_tms(5, 2, seed=0, steps=50)  # deterministic for a seed
    W2, _ = train_tms(5, 2, seed=0, steps=50)
    assert torch.equal(W, W2)


def _state_without_feature(f: int) -> dict:
    task = tms_task(seed=0, train_steps=2000)
    state = {k: v.clone() for k, v in task.target.state_dict().items()}
    state["linear1.weight"][:, f] = 0.0
    state["linear2.weight"][f, :] = 0.0
    return state


def test_unrepresented_feature_fails_loudly_and_is_counted():
    state = _state_without_feature(4)
    with pytest.raises(RuntimeError, match="represents only 4 of 5 features"):
        tms_task(seed=0, target_state=state)
    task = tms_task(seed=0, target_state=state, require_all_represented=False)
    assert represented_features(task.target) == [0, 1, 2, 3]
    gt = task.ground_truth
    assert gt.info["n_represented"] == 4 and gt.expected_alive["linear1"] == 4
    assert gt.directions[0].features == [0, 1, 2, 3]


def test_hidden_identity_variant():
    task = tms_task(seed=0, hidden_identity=True, train_steps=500, require_all_represented=False)
    assert torch.equal(task.target.hidden_layers[0].weight, torch.eye(2))
    gt = ground_truth(task.target)
    assert gt.ci_patterns["hidden_layers.0"].k == 2 and gt.expected_alive["hidden_layers.0"] == 2


def _one_subcomponent_per_feature(model: Any) -> None:
    """Set linear1's subcomponents to W's 5 columns, one each (the rest zero): an exact decomposition."""
    comp = model.comp("linear1")
    with torch.no_grad():
        comp.V.zero_()
        comp.U.zero_()
        comp.V[torch.arange(5), torch.arange(5)] = 1.0
        comp.U[:5] = comp.target_weight()


def test_scores_of_hand_built_exact_decomposition():
    """One subcomponent per feature, exactly W's columns: MMCS = ML2R = 1 on both (tied) matrices."""
    from spd.ci import CIConfig
    from spd.model import ComponentModel, ModuleSpec

    task = tms_task(seed=0, train_steps=2000)
    model = ComponentModel(task.target, [ModuleSpec(pattern="linear*", C=7)], CIConfig(), tied=[("linear1", "linear2")])
    _one_subcomponent_per_feature(model)
    assert torch.allclose(model.comp("linear2").weight(), model.comp("linear2").target_weight())
    gt = task.ground_truth
    gt.ci_patterns.clear()
    res = score(model, gt, data_ci=[{"linear1": torch.zeros(1, 7), "linear2": torch.zeros(1, 7)}])
    assert res["mmcs/linear1"] == pytest.approx(1.0) and res["ml2r/linear2"] == pytest.approx(1.0)
    assert not res["passed"] and "alive/linear1 = 0 (CI > 0.1), expected exactly 5" in res["failures"]


def test_criteria_on_matrices_not_decomposed_are_listed_not_failed():
    """Decomposing W alone (not W^T) is scored on W; W^T's criteria are listed under not_scored. A
    decomposition that no criterion applies to fails instead of passing vacuously."""
    from spd.ci import CIConfig
    from spd.ground_truth import GroundTruth
    from spd.model import ComponentModel, ModuleSpec

    task = tms_task(seed=0, train_steps=2000)
    model = ComponentModel(task.target, [ModuleSpec(pattern="linear1", C=7)], CIConfig())
    _one_subcomponent_per_feature(model)
    gt = task.ground_truth
    gt.ci_patterns.clear()
    five_fire = [{"linear1": torch.tensor([[1.0, 1, 1, 1, 1, 0, 0]])}]
    res = score(model, gt, data_ci=five_fire)
    assert res["not_scored"] == ["linear2"] and "mmcs/linear2" not in res and "alive/linear2" not in res
    assert res["mmcs/linear1"] == pytest.approx(1.0) and res["alive/linear1"] == 5
    assert res["passed"], res["failures"]
    res = score(model, GroundTruth(probe_inputs=torch.eye(5), expected_alive={"hidden_layers.*": 2}), five_fire)
    assert not res["passed"] and res["failures"][0].startswith("no ground-truth criterion applies")


def test_tms_forward():
    m = TMS(5, 2)
    x = torch.rand(3, 5)
    W = m.linear1.weight
    assert torch.allclose(m(x), torch.relu(x @ W.T @ m.linear2.weight.T + m.linear2.bias))
