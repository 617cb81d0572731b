import pytest
import torch
import torch.nn.functional as F

from spd.ci import CIConfig, GlobalSharedMLP, PerModuleCI, ScalarMLP, SharedMLP, VectorMLP


def test_scalar_mlp_by_hand():
    net = ScalarMLP(C=2, hidden=[2])
    with torch.no_grad():
        net.w_in.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.0]]))
        net.b_in.copy_(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
        net.w_out.copy_(torch.tensor([[1.0, 1.0], [0.5, 3.0]]))
        net.b_out.copy_(torch.tensor([0.1, -0.1]))
    h = torch.tensor([[0.5, -1.0]])
    # subcomponent 0: gelu(0.5) + gelu(-0.5 + 1) + 0.1; subcomponent 1: 0.5 gelu(-2) + 3 gelu(0) - 0.1
    g = lambda v: F.gelu(torch.tensor(v)).item()
    expected = torch.tensor([[g(0.5) + g(0.5) + 0.1, 0.5 * g(-2.0) - 0.1]])
    assert torch.allclose(net(h), expected, atol=1e-6)


@pytest.mark.parametrize("shape", [(64,), (4, 16)])
def test_fused_scalar_mlp_matches_the_module_in_value_and_every_gradient(shape):
    """The compiled one-hidden-layer path (hand-written backward from the saved gelu and gelu') gives the plain
    module's logits and the gradients wrt the input and all four parameters, for any upstream gradient; without
    gradients it takes the compiled forward only. Leading dims (batch, position) are summed over."""
    torch.manual_seed(0)
    plain, fused = ScalarMLP(C=7, hidden=[5]), ScalarMLP(C=7, hidden=[5])
    fused.load_state_dict(plain.state_dict())
    assert fused.fuse()
    h = torch.randn(*shape, 7) * 2
    up = torch.randn(*shape, 7)
    h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    z1, z2 = plain(h1), fused(h2)
    assert torch.allclose(z1, z2, atol=1e-5)
    (z1 * up).sum().backward()
    (z2 * up).sum().backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-4), name
    with torch.no_grad():
        assert torch.allclose(fused(h), z1, atol=1e-5)


def test_scalar_mlp_subcomponents_are_independent():
    torch.manual_seed(0)
    net = ScalarMLP(C=3, hidden=[4, 5])
    h = torch.randn(8, 3)
    h2 = h.clone()
    h2[:, 1] += 1.0  # changing subcomponent 1's input changes only its output
    d = net(h2) - net(h)
    assert torch.all(d[:, [0, 2]].abs() < 1e-6) and torch.all(d[:, 1].abs() > 0)


def test_vector_and_shared_mlp_shapes_and_independence():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 6)
    v = VectorMLP(C=4, d_in=6, hidden=[3])
    s = SharedMLP(C=4, d_in=6, hidden=[3, 2])
    assert v(x).shape == (2, 7, 4) and s(x).shape == (2, 7, 4)
    # VectorMLP subcomponent c equals a plain MLP with its own weights
    c = 2
    a = F.gelu(x @ v.ws[0][c] + v.bs[0][c])
    assert torch.allclose(v(x)[..., c], a @ v.w_out[c] + v.b_out[c], atol=1e-5)


def test_global_shared_mlp_reads_all_inputs():
    torch.manual_seed(0)
    specs = {"a": (3, 4, "linear"), "b": (5, 2, "linear")}
    g = GlobalSharedMLP(specs, CIConfig(type="global_shared_mlp", hidden=[8]))
    acts = {"a": torch.randn(6, 4), "b": torch.randn(6, 2)}
    out = g(acts, {})
    assert out["a"].shape == (6, 3) and out["b"].shape == (6, 5)
    acts2 = {"a": acts["a"], "b": acts["b"] + 1}
    assert not torch.allclose(g(acts2, {})["a"], out["a"])  # module a's CI depends on module b's input


def test_input_reading_ci_rejects_embeddings():
    with pytest.raises(ValueError, match="embedding.*'mlp'"):
        PerModuleCI({"wte": (4, 10, "embedding")}, CIConfig(type="vector_mlp", hidden=[4]))
