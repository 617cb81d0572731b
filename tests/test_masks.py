import torch

from spd.masks import delta_masks, make_masks, stochastic_mask, subset_masks, subset_routes


def test_continuous_mask_lies_between_ci_and_one():
    g = torch.rand(1000, 7)
    gen = torch.Generator().manual_seed(0)
    m = stochastic_mask(g, "continuous", gen)
    assert torch.all(m >= g) and torch.all(m <= 1)
    assert torch.all(stochastic_mask(torch.ones(5, 3), "continuous", gen) == 1)
    # with g = 0 the mask is U(0, 1): mean 1/2
    assert abs(stochastic_mask(torch.zeros(100_000), "continuous", gen).mean().item() - 0.5) < 0.01


def test_binomial_mask_is_ci_or_one():
    g = torch.full((10_000,), 0.3)
    m = stochastic_mask(g, "binomial", torch.Generator().manual_seed(0))
    assert set(torch.unique(m).tolist()) == {0.30000001192092896, 1.0}
    assert abs((m == 1).float().mean().item() - 0.5) < 0.02


def test_same_generator_state_same_masks():
    g = torch.rand(4, 5)
    a = stochastic_mask(g, "continuous", torch.Generator().manual_seed(3))
    b = stochastic_mask(g, "continuous", torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_delta_masks_shape():
    dm = delta_masks({"a": torch.rand(4, 6, 5)}, torch.Generator().manual_seed(0))
    assert dm["a"].shape == (4, 6)


def test_subset_routes_route_between_one_and_all_modules():
    names = ["a", "b", "c", "d"]
    routes = subset_routes(names, torch.Size([20_000]), torch.Generator().manual_seed(0))
    k = torch.stack([routes[n] for n in names], -1).sum(-1)
    assert k.min() == 1 and k.max() == 4
    # k ~ U{1..4}: each value about a quarter of the time; every module routed with prob (1+2+3+4)/16
    counts = torch.bincount(k, minlength=5)[1:].float() / 20_000
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.02)
    for n in names:
        assert abs(routes[n].float().mean().item() - 10 / 16) < 0.02


def test_named_masks():
    ci = {"a": torch.tensor([[0.0, 0.05, 0.5, 1.0]])}
    assert torch.equal(make_masks(ci, "rounded", threshold=0.1)["a"], torch.tensor([[0.0, 0, 1, 1]]))
    assert torch.equal(make_masks(ci, "ci")["a"], ci["a"])
    assert torch.equal(make_masks(ci, "zeros")["a"], torch.zeros(1, 4))
    assert torch.equal(make_masks(ci, "ones")["a"], torch.ones(1, 4))
    sm = subset_masks({"a": torch.rand(2, 4), "b": torch.rand(2, 3)}, {"a": [1, 3]})
    assert torch.equal(sm["a"], torch.tensor([[0.0, 1, 0, 1]] * 2)) and torch.equal(sm["b"], torch.ones(2, 3))
