"""A layer whose true mechanisms have different ranks: "next day of the week" (a rank-2 rotation) beside
rank-1 feature maps, all in one weight matrix and in a random basis.

Raw variables: n sparse features f_i (each on with probability p, values U[0, 1]) and, with probability p_day,
a day d in 0..6 encoded on the unit circle, (cos 2πd/7, sin 2πd/7). The model sees them in a random orthonormal
basis Q, z = r Q, and computes one linear map z -> z W with

    W = Q^T blockdiag(s_1, ..., s_n, R(2π/7)) Q

i.e. it scales each feature by s_i and advances the day by one (a rotation by 2π/7 of the day plane).
Weights are set to this exact solution (like the APD paper's hand-coded model), so the ground truth is exact:
- feature i: the rank-1 piece s_i q_i^T q_i, important exactly when f_i is on (identity CI pattern);
- "next day": one rank-2 mechanism, two subcomponents spanning the day plane, both needed for almost every day
  (each read direction can be orthogonal to at most one of the 7 days), none needed when no day is present.
A decomposition that splits the rotation into more pieces, or merges it with a feature, fails the check.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn

from spd.ground_truth import Criteria, DenseCI, GroundTruth, IdentityCI
from spd.task import Task
from toy_models.data import sparse_features

N_DAYS = 7
PROBE_VALUE = 0.75


class CyclicLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.layer = nn.Linear(d, d, bias=False)

    def forward(self, z: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return self.layer(z)


def days(n: int = N_DAYS) -> Float[Tensor, "n 2"]:
    a = 2 * math.pi * torch.arange(n) / n
    return torch.stack([a.cos(), a.sin()], dim=-1)


def build(n_features: int, seed: int) -> tuple[CyclicLayer, Tensor, Tensor]:
    """The model, its basis Q ((n+2) x (n+2), rows are the raw variables' directions) and the scales s."""
    g = torch.Generator().manual_seed(seed)
    d = n_features + 2
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    scales = 0.5 + torch.rand(n_features, generator=g)
    a = 2 * math.pi / N_DAYS
    B = torch.zeros(d, d)
    B[range(n_features), range(n_features)] = scales
    B[n_features:, n_features:] = torch.tensor([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    model = CyclicLayer(d)
    with torch.no_grad():
        model.layer.weight.copy_((Q.T @ B @ Q).T)  # nn.Linear stores W^T
    model.requires_grad_(False)
    return model, Q, scales


def cyclic_task(
    seed: int = 0,
    n_features: int = 6,
    feature_prob: float = 0.05,
    day_prob: float = 0.3,
    target_state: dict[str, Tensor] | None = None,
) -> Task:
    model, Q, scales = build(n_features, seed)
    if target_state is not None:
        model.load_state_dict(target_state)

    def raw(batch_size: int, g: torch.Generator) -> Tensor:
        f = sparse_features(batch_size, n_features, feature_prob, g)
        on = (torch.rand(batch_size, 1, generator=g) < day_prob).float()
        day = days()[torch.randint(N_DAYS, (batch_size,), generator=g)] * on
        return torch.cat([f, day], dim=-1)

    def sample_batch(batch_size: int, g: torch.Generator) -> Tensor:
        return raw(batch_size, g) @ Q

    probes = torch.cat([torch.eye(n_features, n_features + 2) * PROBE_VALUE,
                        torch.cat([torch.zeros(N_DAYS, n_features), days()], dim=-1)]) @ Q  # fmt: skip
    feature_probes = list(range(n_features))
    day_probes = list(range(n_features, n_features + N_DAYS))
    gt = GroundTruth(
        probe_inputs=probes,
        ci_patterns={
            # features: one subcomponent each; on day probes, nothing but the rotation (checked by DenseCI below)
            "layer/features": IdentityCI(probes=feature_probes, modules="layer"),
            "layer/next_day": DenseCI(k=2, mechanism="next day", probes=day_probes, modules="layer"),
        },
        expected_alive={"layer": n_features + 2},
        criteria=Criteria(ci_error_max=0),
        info={"n_features": n_features, "rotation_rank": 2},
    )
    return Task(model, sample_batch, gt, {"n_features": n_features, "scales": [round(v, 3) for v in scales.tolist()]})
