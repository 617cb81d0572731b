import pytest
import torch
from torch import nn

from spd.ci import CIConfig
from spd.dedupe import merge_duplicates
from spd.model import ComponentModel, ModuleSpec


def _model() -> ComponentModel:
    """fc: 3 -> 2 with four subcomponents; 0 and 1 read e0 (1 as -2 e0), 2 reads e1, 3 reads e2."""
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(3, 2, bias=False))
    model = ComponentModel(target, [ModuleSpec(pattern="0", C=4)], CIConfig(type="mlp", hidden=[1]))
    comp = model.comp("0")
    with torch.no_grad():
        comp.V.copy_(torch.tensor([[1.0, -2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
        comp.U.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.25], [0.5, 0.5], [0.0, 1.0]]))
        net = model.ci_fn.nets["0"]
        # logit_c = gelu(w_in_c h_c) for the scalar inner activation h_c = x . V_c: fires where w_in_c h_c > 0
        net.w_in.copy_(torch.tensor([[10.0], [-5.0], [10.0], [10.0]]))  # pieces 0 and 1 both fire where x0 > 0
        net.b_in.zero_()
        net.w_out.fill_(1.0)
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
    # piece 1 is a spare: no write, a new read of the same norm, never important
    assert (comp.U[1] == 0).all() and torch.isclose(comp.V[:, 1].norm(), torch.tensor(2.0))
    assert (model.causal_importances(x).lower["0"][:, 1] == 0).all()
    # the others are untouched
    assert torch.equal(comp.U[2:], torch.tensor([[0.5, 0.5], [0.0, 1.0]]))


def test_pieces_that_fire_apart_or_read_apart_are_kept():
    model = _model()
    with torch.no_grad():
        model.ci_fn.nets["0"].w_in[1] = 5.0  # piece 1 now fires where x0 < 0: same direction, other inputs
    x = torch.randn(512, 3, generator=torch.Generator().manual_seed(1))
    assert merge_duplicates(model, x) == {"0": []}
    model = _model()
    with torch.no_grad():
        model.comp("0").V[:, 1] = torch.tensor([-2.0, 2.5, 0.0])  # |cos| 0.62 with e0: not a duplicate at 0.9
    assert merge_duplicates(model, x, max_cos=0.9) == {"0": []}
    with pytest.raises(ValueError, match="max_cos"):
        merge_duplicates(model, x, max_cos=1.0)


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
