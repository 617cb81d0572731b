import math

import pytest
import torch

from spd.losses import (
    ImportanceMinimalityConfig,
    StepContext,
    annealed_p,
    faithfulness_loss,
    faithfulness_per_module,
    hidden_acts_recon_loss,
    importance_minimality_loss,
    kl,
    masked_recon_loss,
    mse,
    stochastic_recon_loss,
    total_loss,
)
from spd.masks import stochastic_masks
from spd.model import CausalImportances, CleanPass


def fit_exactly(cm):
    """Set V, U so that V @ U == W (SVD; C >= rank)."""
    with torch.no_grad():
        for n in cm.module_names:
            c = cm.comp(n)
            u, s, vh = torch.linalg.svd(c.target_weight(), full_matrices=False)
            r = s.numel()
            c.V.zero_()
            c.U.zero_()
            c.V[:, :r] = u * s
            c.U[:r] = vh


def test_faithfulness_by_hand(cm, two_layer):
    with torch.no_grad():
        for n in cm.module_names:
            cm.comp(n).V.zero_()
    w1, w2 = two_layer.fc1.weight, two_layer.fc2.weight
    expected = (w1.pow(2).sum() + w2.pow(2).sum()) / (12 + 8)
    assert torch.allclose(faithfulness_loss(cm), expected)
    per = faithfulness_per_module(cm)
    assert per["fc1"][1] == pytest.approx(1.0) and per["fc2"][0] == pytest.approx(w2.pow(2).mean().item())


def test_faithfulness_zero_when_components_sum_to_weights(cm):
    fit_exactly(cm)
    assert faithfulness_loss(cm).item() < 1e-12


def test_importance_minimality_by_hand():
    ci = {"a": torch.tensor([[0.5, 0.0], [1.0, 0.5]])}
    assert importance_minimality_loss(ci, p=1.0, eps=0.0).item() == pytest.approx(0.75 + 0.25)
    assert importance_minimality_loss(ci, p=2.0, eps=0.0).item() == pytest.approx(0.625 + 0.125)
    freq = 0.75 * math.log2(1 + 1.5) + 0.25 * math.log2(1 + 0.5)
    assert importance_minimality_loss(ci, p=1.0, beta=1.0, eps=0.0).item() == pytest.approx(1.0 + freq)
    # summed over modules, not averaged; leading dims (batch, position) are averaged together
    two = {"a": ci["a"], "b": ci["a"].reshape(1, 2, 2)}
    assert importance_minimality_loss(two, p=1.0, eps=0.0).item() == pytest.approx(2.0)


def test_importance_minimality_per_module_coefficients(cm):
    """Two importance terms on disjoint globs: each layer pays its own coefficient (hand-computed)."""
    ci = {"fc1": torch.tensor([[0.5, 0.0], [1.0, 0.5]]), "fc2": torch.tensor([[1.0, 1.0]])}
    clean = CleanPass(output=torch.zeros(1, 2), acts={})  # the importance term reads only ci and frac
    ctx = StepContext(cm, None, clean, CausalImportances(lower=ci, upper=ci), mse, None, 0.0)
    cfgs = [
        ImportanceMinimalityConfig(name="importance_minimality", coeff=1e-5, p=1.0, eps=0.0, modules="fc1"),
        ImportanceMinimalityConfig(name="importance_minimality", coeff=1e-4, p=1.0, eps=0.0, modules="fc2"),
    ]
    total, terms = total_loss(ctx, cfgs)
    assert terms["importance_minimality[fc1]"].item() == pytest.approx(1.0)  # 0.75 + 0.25
    assert terms["importance_minimality[fc2]"].item() == pytest.approx(2.0)
    assert total.item() == pytest.approx(1e-5 * 1.0 + 1e-4 * 2.0)
    bad = ImportanceMinimalityConfig(name="importance_minimality", coeff=1.0, modules="fc3")
    with pytest.raises(ValueError, match="importance_minimality.modules 'fc3' matches no decomposed module"):
        total_loss(ctx, [bad])


def test_p_annealing():
    assert annealed_p(2.0, None, 0.0, 1.0, 0.5) == 2.0
    assert annealed_p(2.0, 0.4, 0.0, 1.0, 0.5) == pytest.approx(1.2)
    assert annealed_p(2.0, 0.4, 0.2, 0.6, 0.1) == 2.0
    assert annealed_p(2.0, 0.4, 0.2, 0.6, 0.4) == pytest.approx(1.2)
    assert annealed_p(2.0, 0.4, 0.2, 0.6, 0.9) == pytest.approx(0.4)


def test_divergences_by_hand():
    assert mse(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])).item() == pytest.approx(2.5)
    pred = torch.tensor([[math.log(3.0), 0.0]])  # softmax = (0.75, 0.25)
    target = torch.zeros(1, 2)  # softmax = (0.5, 0.5)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kl(pred, target).item() == pytest.approx(expected, rel=1e-5)
    # averaged over positions, summed over vocab
    assert kl(pred.expand(3, 4, 2), target.expand(3, 4, 2)).item() == pytest.approx(expected, rel=1e-5)


def test_stochastic_recon_with_ci_one_equals_unmasked(cm):
    cm.delta_component = False
    x = torch.randn(16, 3)
    target_out = cm(x)
    ones = {n: torch.ones(16, 5) for n in cm.module_names}
    unmasked = mse(cm(x, ones), target_out)
    for routing in ("all", "layerwise", "subset"):
        s = stochastic_recon_loss(cm, x, target_out, ones, routing, mse, generator=torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(0)
        stochastic_masks(ones, "continuous", gen)  # consume the same draws the stochastic loss made for its masks
        m = masked_recon_loss(cm, x, target_out, ones, routing, mse, generator=gen)
        assert torch.allclose(s, m)
    assert torch.allclose(stochastic_recon_loss(cm, x, target_out, ones, "all", mse), unmasked)


def test_exact_components_have_zero_recon_loss_under_any_mask_with_delta(cm):
    """Components summing to W, masks 1: every routing reproduces the target whatever the delta mask."""
    fit_exactly(cm)
    x = torch.randn(16, 3)
    target_out = cm(x)
    ones = {n: torch.ones(16, 5) for n in cm.module_names}
    gen = torch.Generator().manual_seed(0)
    for routing in ("all", "layerwise", "subset"):
        assert stochastic_recon_loss(cm, x, target_out, ones, routing, mse, generator=gen).item() < 1e-10


def test_layerwise_is_mean_of_one_module_passes(cm):
    x = torch.randn(8, 3)
    target_out = cm(x)
    masks = {n: torch.rand(8, 5) for n in cm.module_names}
    manual = (mse(cm(x, {"fc1": masks["fc1"]}), target_out) + mse(cm(x, {"fc2": masks["fc2"]}), target_out)) / 2
    assert torch.allclose(masked_recon_loss(cm, x, target_out, masks, "layerwise", mse), manual)


def test_hidden_acts_recon(cm):
    fit_exactly(cm)
    x = torch.randn(8, 3)
    _, acts = cm.forward_with_cache(x)
    ones = {n: torch.ones(8, 5) for n in cm.module_names}
    assert hidden_acts_recon_loss(cm, x, acts, ones).item() < 1e-10
    # CI = 1 makes every mask 1; without delta and with random components, fc2's input becomes
    # relu(x V1 U1 + b1) while fc1's input is x itself (no error there)
    torch.manual_seed(3)
    with torch.no_grad():
        for n in cm.module_names:
            cm.comp(n).V.normal_()
    cm.delta_component = False
    c1 = cm.comp("fc1")
    h = torch.relu(x @ c1.V @ c1.U + cm.target.fc1.bias)
    expected = (h - acts["fc2"]).pow(2).sum() / (acts["fc1"].numel() + acts["fc2"].numel())
    assert torch.allclose(hidden_acts_recon_loss(cm, x, acts, ones), expected, atol=1e-6)
