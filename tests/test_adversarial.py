"""Adversarial masks (PGD) and the smooth-L0 minimality term, against hand-computed cases."""

import pytest
import torch
from torch import nn

from spd.adversarial import Budget, PersistentAdversary, adversarial_masks, attack, pgd_ascend
from spd.ci import CIConfig
from spd.losses import annealed_width, mse, smooth_l0_loss
from spd.model import ComponentModel, ModuleSpec


def _sum_model(delta: bool = False) -> ComponentModel:
    """y = x0 + x1 (Linear 2 -> 1, no bias), decomposed exactly into 'read x0' and 'read x1'."""
    lin = nn.Linear(2, 1, bias=False)
    lin.weight.data = torch.tensor([[1.0, 1.0]])
    target = nn.Sequential(lin)
    m = ComponentModel(target, [ModuleSpec(pattern="0", C=2)], CIConfig(type="mlp", hidden=[2]), delta_component=delta)
    c = m.comp("0")
    c.V.data, c.U.data = torch.eye(2), torch.ones(2, 1)
    return m


def test_pgd_strictly_increases_the_loss_it_attacks_by_hand():
    # g = (0.5, 0) on input (1, 1); target output 2. Masks m = g + (1 - g) s, output m0 + m1.
    # From s = (0.5, 0.5): m = (0.75, 0.5), out 1.25, loss 0.5625. dD/ds < 0 for both, so each step of 0.25
    # lowers both s: s = (0.25, 0.25) -> out 0.875, loss 1.265625; s = (0, 0) -> out 0.5, loss 2.25 (the maximum).
    model = _sum_model()
    x, g = torch.ones(1, 2), {"0": torch.tensor([[0.5, 0.0]])}
    target = model.target(x)

    def loss(s, sd):
        masks, dm = adversarial_masks(g, s, sd)
        return mse(model(x, masks, dm), target)

    s = {"0": torch.tensor([0.5, 0.5])}
    seen = [loss(s, None).item()]
    for _ in range(3):
        pgd_ascend(loss, s, None, Budget(n_steps=1, step_size=0.25))
        seen.append(loss(s, None).item())
    assert seen == pytest.approx([0.5625, 1.265625, 2.25, 2.25])
    assert s["0"].tolist() == [0.0, 0.0]  # projected onto [0, 1]


def test_attack_reaches_the_hand_computed_maximum_for_every_routing_and_is_differentiable():
    model = _sum_model(delta=True)
    x = torch.ones(3, 2)
    target = model.target(x)
    g = torch.tensor([[0.5, 0.0]] * 3, requires_grad=True)
    for routing in ("all", "layerwise", "subset"):
        for scope in ("shared", "per_example"):
            # from random or zeros the maximum 2.25 (s = 0) is reached; the delta is 0, so its mask cannot matter
            for init in ("random", "zeros"):
                budget = Budget(n_steps=4, step_size=0.5, init=init, scope=scope)
                gen = torch.Generator().manual_seed(0)
                loss = attack(model, x, target, {"0": g}, routing, mse, budget, gen)
                assert loss.item() == pytest.approx(2.25), (routing, scope, init)
    loss.backward()
    assert g.grad is not None and g.grad.abs().sum() > 0  # the CIs get trained by the final pass


def test_attack_beats_random_masks_on_average():
    torch.manual_seed(0)
    target = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    model = ComponentModel(
        target, [ModuleSpec(pattern="0", C=4), ModuleSpec(pattern="2", C=4)], CIConfig(type="mlp", hidden=[3])
    )
    x = torch.randn(32, 4)
    with torch.no_grad():
        out, acts = model.forward_with_cache(x)
        ci = model.ci_from_acts(acts).lower
        rand = torch.stack([
            mse(model(x, {n: g + (1 - g) * torch.rand_like(g) for n, g in ci.items()}), out) for _ in range(20)
        ]).mean()  # fmt: skip
        adv = attack(model, x, out, ci, "all", mse, Budget(n_steps=10, step_size=0.1))
    assert adv > rand


def test_persistent_adversary_moves_uphill_and_round_trips(tmp_path):
    model = _sum_model(delta=True)
    x = torch.ones(4, 2)
    target = model.target(x)
    g = {"0": torch.tensor([[0.5, 0.0]] * 4)}
    for update in ("sign", "adam"):
        adv = PersistentAdversary(model.Cs, True, update=update, lr=0.1)
        adv.s = {k: torch.full_like(v, 0.9) for k, v in adv.s.items()}  # near the minimum s = 1
        losses = []
        for _ in range(5):
            masks, dm = adv.masks(g)
            loss = mse(model(x, masks, dm), target)
            loss.backward()
            losses.append(loss.item())
            adv.step()
        assert all(b > a for a, b in zip(losses, losses[1:], strict=False)), (update, losses)
        assert all(float(v.min()) >= 0.0 and float(v.max()) <= 1.0 for v in adv.s.values())
        state = adv.state_dict()
        other = PersistentAdversary(model.Cs, True, update=update)
        other.load_state_dict(state)
        assert other.t == adv.t and all(torch.equal(other.s[k], adv.s[k]) for k in adv.s)


def test_smooth_l0_by_hand_and_width_anneal():
    g = {"a": torch.tensor([[0.0, 0.1, 1.0]]), "b": torch.tensor([[0.1], [0.3]])}
    # a: 0 + 0.1/0.2 + 1/1.1; b: mean(0.5, 0.75)
    expected = 0.5 + 1 / 1.1 + 0.625
    assert smooth_l0_loss(g, 0.1).item() == pytest.approx(expected)
    assert smooth_l0_loss(g, 1e-9).item() == pytest.approx(2 + 1, rel=1e-6)  # -> the L0 count
    assert annealed_width(0.1, 1e-3, 0.0, 1.0, 0.5) == pytest.approx(1e-2)  # geometric midpoint
    assert annealed_width(0.1, 1e-3, 0.2, 0.6, 0.1) == 0.1 and annealed_width(0.1, 1e-3, 0.2, 0.6, 0.9) == 1e-3
    assert annealed_width(0.1, None, 0.0, 1.0, 0.7) == 0.1
