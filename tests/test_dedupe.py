import pytest
import torch
from torch import nn

from spd.ci import CIConfig
from spd.dedupe import merge_duplicates
from spd.model import ComponentModel, ModuleSpec


def _model(hidden: int = 1) -> ComponentModel:
    """fc: 3 -> 2 with four subcomponents; 0 and 1 read e0 (1 as -2 e0), 2 reads e1, 3 reads e2. The CI
    networks' first hidden unit is set by hand, the others (`hidden` > 1) are left as initialised, writing 0."""
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(3, 2, bias=False))
    model = ComponentModel(target, [ModuleSpec(pattern="0", C=4)], CIConfig(type="mlp", hidden=[hidden]))
    comp = model.comp("0")
    with torch.no_grad():
        comp.V.copy_(torch.tensor([[1.0, -2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
        comp.U.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.25], [0.5, 0.5], [0.0, 1.0]]))
        net = model.ci_fn.nets["0"]
        # logit_c = gelu(w_in_c h_c) for the scalar inner activation h_c = x . V_c: fires where w_in_c h_c > 0
        net.w_in[:, 0] = torch.tensor([10.0, -5.0, 10.0, 10.0])  # pieces 0 and 1 both fire where x0 > 0
        net.b_in.zero_()
        net.w_out.zero_()
        net.w_out[:, 0] = 1.0
        net.b_out.zero_()
    return model


def test_merge_folds_a_parallel_co_firing_piece_into_the_larger_one():
    model = _model()
    comp = model.comp("0")
    before = comp.weight().clone()
    x = torch.randn(512, 3, generator=torch.Generator().manual_seed(1))
    assert merge_duplicates(model, x) == {"0": [(0, 1)]}  # |V||U|: piece 0 1.0, piece 1 0.5
    # V_0 U_0 + V_1 U_1 = e0 [1, 0] + (-2 e0) [0, 0.25] = e0 [1, -0.5]: the sum is unchanged, all in piece 0
    assert torch.allclose(comp.U[0], torch.tensor([1.0, -0.5]))
    assert torch.allclose(comp.weight(), before)
    # piece 1 is a spare: its read minus -2 x piece 0's is nothing, and it is never important
    assert torch.allclose(comp.V[:, 1], torch.zeros(3))
    assert (model.causal_importances(x).lower["0"][:, 1] == 0).all()
    # the others are untouched
    assert torch.equal(comp.U[2:], torch.tensor([[0.5, 0.5], [0.0, 1.0]]))


def test_reads_are_compared_on_the_data_and_the_rest_of_the_read_stays_in_the_spare():
    model = _model()
    comp = model.comp("0")
    with torch.no_grad():
        comp.V[:, 1] = torch.tensor([-2.0, 0.0, 3.0])  # vector |cos| with e0 0.55, but the data has no x2
    before = comp.weight().clone()
    x = torch.randn(512, 3, generator=torch.Generator().manual_seed(1))
    x[:, 2] = 0.0
    assert merge_duplicates(model, x) == {"0": [(0, 1)]}
    assert torch.allclose(comp.U[0], torch.tensor([1.0, -0.5]))
    assert torch.allclose(comp.V[:, 1], torch.tensor([0.0, 0.0, 3.0]))  # the part no input reads
    assert torch.allclose(comp.weight(), before)


def test_pieces_that_fire_apart_or_read_apart_are_kept():
    model = _model()
    with torch.no_grad():
        model.ci_fn.nets["0"].w_in[1] = 5.0  # piece 1 now fires where x0 < 0: same read, other inputs
    x = torch.randn(512, 3, generator=torch.Generator().manual_seed(1))
    assert merge_duplicates(model, x) == {"0": []}
    assert merge_duplicates(model, x, min_overlap=0.0, fit_steps=0) == {"0": [(0, 1)]}  # a sign split, on request
    model = _model()
    with torch.no_grad():
        model.comp("0").V[:, 1] = torch.tensor([-2.0, 2.5, 0.0])  # reads x1 too: |cos| about 0.6 on this data
    assert merge_duplicates(model, x, max_cos=0.9) == {"0": []}
    # one feature per input: pieces 2 and 3 each leak 0.1% onto the other's feature, so on each one's inputs the
    # other's read is proportional to its own (cosine 1 both ways); but each sees the other's inputs with 0.1% of
    # its own strength: kept
    model = _model()
    with torch.no_grad():
        model.comp("0").V[:, 2:] = torch.tensor([[0.0, 0.0], [1.0, 0.001], [0.001, 1.0]])
    one = torch.randn(512, 3, generator=torch.Generator().manual_seed(2))
    one *= torch.nn.functional.one_hot(torch.arange(512) % 3, 3)
    assert merge_duplicates(model, one, min_overlap=0.0, fit_steps=0) == {"0": [(0, 1)]}  # not (2, 3)
    with pytest.raises(ValueError, match="max_cos"):
        merge_duplicates(model, x, max_cos=1.0)


def test_after_a_sign_split_merge_the_kept_piece_is_refitted_to_fire_on_both_halves():
    model = _model(hidden=4)
    with torch.no_grad():
        model.ci_fn.nets["0"].w_in[1, 0] = 5.0  # piece 0 fires where x0 > 0, piece 1 where x0 < 0
    x = torch.randn(2048, 3, generator=torch.Generator().manual_seed(1))
    before = model.causal_importances(x).lower["0"]
    assert merge_duplicates(model, x, min_overlap=0.0) == {"0": [(0, 1)]}
    after = model.causal_importances(x).lower["0"]
    clear = x[:, 0].abs() > 0.3  # CI 1 on one of the two before
    assert (before[clear, 0] == 1).sum() < 0.6 * clear.sum() and (before[clear, :2].amax(-1) == 1).all()
    assert after[clear, 0].min() > 0.9  # now piece 0 alone, on both signs
    assert (after[:, 1] == 0).all()
    assert (after[:, 2:] - before[:, 2:]).abs().max() < 0.05  # the others keep their CIs


@pytest.mark.parametrize("ci_type", ["mlp", "vector_mlp", "shared_mlp", "global_shared_mlp"])
def test_silence_makes_one_subcomponent_unimportant_everywhere(ci_type: str):
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model = ComponentModel(target, [ModuleSpec(pattern="*", C=3)], CIConfig(type=ci_type, hidden=[5]))
    with torch.no_grad():
        for name in model.module_names:
            w, b, off = model.ci_fn.output_layer(name)
            b[off : off + 3] = 2.0  # every subcomponent important before
    model.ci_fn.silence("2", 1)
    ci = model.causal_importances(torch.randn(64, 3)).lower
    assert (ci["2"][:, 1] == 0).all()
    assert (ci["2"][:, [0, 2]] > 0).any() and (ci["0"] > 0).any()


def _merge_cfg(**merge):
    from spd.config import load_config

    return load_config(
        {
            "target": {"factory": "toy_models.tms:tms_task"},
            "decomposition": {"modules": [{"pattern": "0", "C": 4}], "ci_fn": {"type": "mlp", "hidden": [1]}},
            "losses": [{"name": "stochastic_recon", "coeff": 1.0}, {"name": "importance_minimality", "coeff": 1e-3}],
            "train": {
                "steps": 2,
                "batch_size": 64,
                "lr": {"peak": 1e-6},
                "faithfulness_warmup": {"steps": 0},
                "merge": {"at": [1], "fit_steps": 0, **merge},
            },
            "eval": {"alive_min_density": 0.0},
        }
    )


def test_training_merges_duplicates_at_the_configured_step():
    from spd.train import train

    model, rows = _model(), []
    train(
        model,
        lambda b, g: torch.randn(b, 3, generator=g),
        _merge_cfg(),
        log=lambda s, r: rows.append((s, r)),
        progress=False,
    )
    assert (1, {"merge/pairs/0": 1.0}) in rows and not any("merge/pairs/0" in r for s, r in rows if s != 1)
    x = torch.randn(256, 3, generator=torch.Generator().manual_seed(2))
    ci = model.importances(x, model.clean_pass(x)).lower["0"]
    assert (ci[:, 1] == 0).all() and (ci[:, 0] > 0).any()  # piece 1 folded into 0 and silenced
    unmerged, rows = _model(), []
    cfg = _merge_cfg().model_copy(update={"train": _merge_cfg().train.model_copy(update={"merge": None})})
    train(
        unmerged, lambda b, g: torch.randn(b, 3, generator=g), cfg, log=lambda s, r: rows.append((s, r)), progress=False
    )
    assert not any(k.startswith("merge/") for _, r in rows for k in r)
    assert (unmerged.importances(x, unmerged.clean_pass(x)).lower["0"][:, 1] > 0).any()


def test_merge_config_names_bad_steps():
    from spd.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="train.merge.at"):
        _merge_cfg(at=[2])


def _three_feature_model() -> tuple[ComponentModel, torch.Tensor]:
    """fc: 3 -> 2, one feature active per input (positive values). Pieces 0, 1 and 3 read features 0, 1 and 2;
    piece 2 reads e0 - e1 and fires on both features 0 and 1 (it repeats piece 0 there and -piece 1 here)."""
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(3, 2, bias=False))
    model = ComponentModel(target, [ModuleSpec(pattern="0", C=4)], CIConfig(type="mlp", hidden=[2]))
    comp = model.comp("0")
    with torch.no_grad():
        comp.V.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, -1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
        comp.U.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.3], [1.0, 1.0]]))
        net = model.ci_fn.nets["0"]
        net.w_in.copy_(torch.tensor([[10.0, 0.0], [10.0, 0.0], [10.0, -10.0], [10.0, 0.0]]))  # piece 2: |h|
        net.b_in.zero_()
        net.w_out.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]))
        net.b_out.zero_()
    g = torch.Generator().manual_seed(1)
    which = torch.randint(3, (3000,), generator=g)
    x = torch.zeros(3000, 3)
    x[torch.arange(3000), which] = 0.2 + 0.8 * torch.rand(3000, generator=g)
    return model, x


def test_a_piece_repeating_two_pieces_on_their_own_inputs_is_folded_into_both():
    model, x = _three_feature_model()
    comp = model.comp("0")
    before = comp.weight().clone()
    assert merge_duplicates(model, x, fit_steps=0) == {"0": [(0, 2), (1, 2)]}
    assert torch.allclose(comp.weight(), before, atol=1e-6)
    assert torch.allclose(comp.U[0], torch.tensor([1.3, 0.3])) and torch.allclose(comp.U[1], torch.tensor([-0.3, 0.7]))
    assert torch.allclose(comp.V[:, 2], torch.zeros(3), atol=1e-6)  # nothing left to read: a spare


def test_after_a_fold_into_two_pieces_each_takes_importance_only_on_its_own_inputs():
    model, x = _three_feature_model()
    assert merge_duplicates(model, x) == {"0": [(0, 2), (1, 2)]}
    ci = model.causal_importances(x).lower["0"]
    on0, on1 = x[:, 0] > 0.3, x[:, 1] > 0.3
    assert ci[on0, 0].min() > 0.9 and ci[on1, 1].min() > 0.9
    assert ci[on1, 0].max() < 0.1 and ci[on0, 1].max() < 0.1  # not piece 2's union of both
    assert (ci[:, 2] == 0).all()
