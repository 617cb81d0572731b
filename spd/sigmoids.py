"""Sigmoids that turn CI-function outputs z into causal importances.

Each `sigmoid_type` names a pair (lower, upper): `lower` gives the CI used for masks (never above 1),
`upper` the CI used by the importance-minimality penalty (never below 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

LEAK = 0.01


class _LowerLeakyHard(torch.autograd.Function):
    """Forward clamp(z, 0, 1); backward leaks (slope 0.01) below 0 only where the loss wants z to rise."""

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        return z.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (z,) = ctx.saved_tensors
        # d(loss)/dz = grad on (0, 1]; 0.01*grad on z <= 0 when grad < 0 (gradient descent raises z); 0 above 1.
        # (One where over two cheap branches: 6 elementwise passes instead of 9; it runs once per matrix per step.)
        return torch.where(z > 0, grad * (z <= 1), LEAK * grad.clamp(max=0.0))


def lower_leaky_hard(z: Float[Tensor, "*b"]) -> Float[Tensor, "*b"]:
    """clamp(z, 0, 1) in the forward pass; revives dead CIs in the backward pass (see _LowerLeakyHard)."""
    return _LowerLeakyHard.apply(z)  # type: ignore[no-any-return]


def lower_leaky(z: Float[Tensor, "*b"]) -> Float[Tensor, "*b"]:
    """The SPD paper's lower sigmoid: 0.01 z below 0, z on [0, 1], 1 above (may go slightly negative)."""
    return torch.where(z <= 0, LEAK * z, z.clamp(max=1.0))


def upper_leaky_hard(z: Float[Tensor, "*b"]) -> Float[Tensor, "*b"]:
    """0 below 0, z on [0, 1], 1 + 0.01 (z - 1) above: never negative, keeps a gradient above 1."""
    return torch.where(z > 1, 1 + LEAK * (z - 1), z.clamp(0.0, 1.0))


def hard_sigmoid(z: Float[Tensor, "*b"]) -> Float[Tensor, "*b"]:
    return z.clamp(0.0, 1.0)


SigmoidType = Literal["leaky_hard", "leaky_hard_paper", "hard", "logistic"]

SIGMOIDS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "leaky_hard": (lower_leaky_hard, upper_leaky_hard),
    "leaky_hard_paper": (lower_leaky, upper_leaky_hard),
    "hard": (hard_sigmoid, hard_sigmoid),
    "logistic": (torch.sigmoid, torch.sigmoid),
}
