import pytest
import torch
from torch import nn

from spd.components import Components, target_weight_io


class Conv1D(nn.Module):
    """Same contract as transformers.pytorch_utils.Conv1D: weight (d_in, d_out), out = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


@pytest.mark.parametrize("make", [lambda: nn.Linear(3, 4), lambda: Conv1D(4, 3)])
def test_linear_like_masked_forward_and_delta(make):
    torch.manual_seed(0)
    m = make()
    c = Components(m, C=6)
    x = torch.randn(5, 3)
    ones = torch.ones(5, 6)
    assert torch.allclose(c.weight(), c.V @ c.U)
    # mask ones without delta = x @ (V U) + b; with delta scaled by 1 = the target exactly
    assert torch.allclose(c(x, ones), x @ c.V @ c.U + m.bias, atol=1e-6)
    assert torch.allclose(c(x, ones, delta_mask=torch.ones(5)), m(x), atol=1e-5)
    # the masked forward equals the per-example masked weight V diag(mask) U
    mask = torch.rand(5, 6)
    expected = torch.stack([x[b] @ (c.V * mask[b]) @ c.U for b in range(5)]) + m.bias
    assert torch.allclose(c(x, mask), expected, atol=1e-6)
    # a partial delta: per example the masked weight plus dm times the delta matrix W - V U (built here, never in
    # the forward), and its gradients match those of that formula
    dm = torch.rand(5)
    W = target_weight_io(m).detach()
    expected = torch.stack([x[b] @ ((c.V * mask[b]) @ c.U + dm[b] * (W - c.V @ c.U)) for b in range(5)]) + m.bias
    got = c(x, mask, delta_mask=dm)
    assert torch.allclose(got, expected, atol=1e-5)
    g = torch.randn_like(got)
    grads = torch.autograd.grad((got * g).sum(), [c.V, c.U])
    want = torch.autograd.grad((expected * g).sum(), [c.V, c.U])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, want, strict=True))


def test_subcomponents_sum_to_weight():
    c = Components(nn.Linear(3, 4), C=7)
    total = sum(c.subcomponent(i) for i in range(7))
    assert torch.allclose(total, c.weight(), atol=1e-6)


def test_embedding():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    c = Components(emb, C=3)
    ids = torch.tensor([[1, 2], [9, 0]])
    assert c.inner(ids).shape == (2, 2, 3)
    assert torch.allclose(c(ids, torch.ones(2, 2, 3), delta_mask=torch.ones(2, 2)), emb(ids), atol=1e-6)
    assert torch.allclose(target_weight_io(emb), emb.weight)


def test_unsupported_module_is_a_clear_error():
    with pytest.raises(TypeError, match="Conv2d.*supported"):
        Components(nn.Conv2d(1, 1, 3), C=2)
