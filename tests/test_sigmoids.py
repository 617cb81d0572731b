import torch

from spd.sigmoids import SIGMOIDS, hard_sigmoid, lower_leaky, lower_leaky_hard, upper_leaky_hard

Z = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 1.5, 3.0])


def test_values_by_hand():
    assert torch.allclose(hard_sigmoid(Z), torch.tensor([0, 0, 0, 0.3, 1, 1, 1.0]))
    assert torch.allclose(lower_leaky_hard(Z), torch.tensor([0, 0, 0, 0.3, 1, 1, 1.0]))
    assert torch.allclose(lower_leaky(Z), torch.tensor([-0.02, -0.005, 0, 0.3, 1, 1, 1.0]))
    assert torch.allclose(upper_leaky_hard(Z), torch.tensor([0, 0, 0, 0.3, 1, 1.005, 1.02]))


def test_lower_leaky_hard_gradient_leaks_only_upwards():
    z = Z.clone().requires_grad_(True)
    # grad of sum(-y) is -1 everywhere: the loss wants every z to rise.
    (-lower_leaky_hard(z)).sum().backward()
    assert torch.allclose(z.grad, torch.tensor([-0.01, -0.01, -0.01, -1, -1, 0, 0]))
    z.grad = None
    # grad +1: the loss wants z to fall; below 0 nothing leaks (dead CIs are not pushed further down).
    lower_leaky_hard(z).sum().backward()
    assert torch.allclose(z.grad, torch.tensor([0, 0, 0, 1, 1, 0, 0.0]))


def test_upper_gradient_above_one_is_leaky():
    z = Z.clone().requires_grad_(True)
    upper_leaky_hard(z).sum().backward()
    # clamp passes the gradient at its boundaries (z = 0 and z = 1)
    assert torch.allclose(z.grad, torch.tensor([0, 0, 1, 1, 1, 0.01, 0.01]))


def test_lower_sigmoids_used_for_masks_stay_in_unit_interval():
    z = torch.randn(10_000) * 5
    for name, (lower, _) in SIGMOIDS.items():
        if name == "leaky_hard_paper":
            continue  # the paper's variant may dip to 0.01 z below zero, by design
        y = lower(z)
        assert y.min() >= 0 and y.max() <= 1, name
    assert upper_leaky_hard(z).min() >= 0
