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


def test_scores_of_hand_built_exact_decomposition():
    """One subcomponent per feature, exactly W's columns: MMCS = ML2R = 1 on both (tied) matrices."""
    from spd.ci import CIConfig
    from spd.model import ComponentModel, ModuleSpec

    task = tms_task(seed=0, train_steps=2000)
    model = ComponentModel(task.target, [ModuleSpec(pattern="linear*", C=7)], CIConfig(), tied=[("linear1", "linear2")])
    comp = model.comp("linear1")
    with torch.no_grad():
        comp.V.zero_()
        comp.U.zero_()
        comp.V[torch.arange(5), torch.arange(5)] = 1.0
        comp.U[:5] = comp.target_weight()
    assert torch.allclose(model.comp("linear2").weight(), model.comp("linear2").target_weight())
    gt = task.ground_truth
    gt.ci_patterns.clear()
    res = score(model, gt, data_ci=[{"linear1": torch.zeros(1, 7), "linear2": torch.zeros(1, 7)}])
    assert res["mmcs/linear1"] == pytest.approx(1.0) and res["ml2r/linear2"] == pytest.approx(1.0)
    assert not res["passed"] and "alive/linear1 = 0 (CI > 0.1), expected exactly 5" in res["failures"]


def test_tms_forward():
    m = TMS(5, 2)
    x = torch.rand(3, 5)
    W = m.linear1.weight
    assert torch.allclose(m(x), torch.relu(x @ W.T @ m.linear2.weight.T + m.linear2.bias))
