"""Toy model of superposition (Elhage et al. 2022): x_hat = ReLU(W^T W x + b), optionally with a frozen
identity hidden layer between W and W^T (x_hat = ReLU(W^T I W x + b), the SPD paper's "+ID" variant).

Ground truth: feature f's mechanism is the rank-1 piece W[:, f] e_f^T of linear1 (and its transpose in
linear2), causally important exactly when feature f is active; the identity layer is one rank-n_hidden
mechanism (n_hidden rank-1 subcomponents that are important on every input).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from spd.ground_truth import Criteria, DenseCI, FeatureDirections, GroundTruth, IdentityCI
from spd.scale import ComputeCurve
from spd.task import Task
from toy_models.data import feature_subset, sparse_features
from toy_models.ladder import tms_curve
from toy_models.nets import TMS
from toy_models.targets import trained_target

PROBE_VALUE = 0.75  # one-hot probe inputs: x = 0.75 e_f
REPRESENTED_MIN_READOUT = 0.5  # feature f is represented if the target's output at f for x = e_f is >= this


def train_tms(
    n_features: int,
    n_hidden: int,
    seed: int,
    steps: int = 10_000,
    batch_size: int = 1024,
    lr: float = 5e-3,
    weight_decay: float = 0.01,
    feature_prob: float = 0.05,
    on_step: Callable[[int, Tensor, Tensor], None] | None = None,
) -> tuple[Float[Tensor, "n_hidden n_features"], Float[Tensor, " n_features"]]:
    """Train tied TMS weights (W, b) with AdamW on mean((x - x_hat)^2). Deterministic for a seed.
    `on_step(steps_done, W, b)` runs after every step (the loss -> compute curves evaluate checkpoints there)."""
    g = torch.Generator().manual_seed(seed)
    W = nn.Parameter(torch.empty(n_hidden, n_features))
    nn.init.xavier_normal_(W, generator=g)
    b = nn.Parameter(torch.zeros(n_features))
    opt = torch.optim.AdamW([W, b], lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        x = sparse_features(batch_size, n_features, feature_prob, g)
        x_hat = F.relu(x @ W.T @ W + b)
        loss = (x - x_hat).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step + 1, W.detach(), b.detach())
    return W.detach(), b.detach()


def represented_features(model: TMS) -> list[int]:
    """Features whose one-hot input the target reads out at >= REPRESENTED_MIN_READOUT."""
    n = model.linear1.in_features
    with torch.no_grad():
        readout = model(torch.eye(n)).diagonal()
    return [f for f in range(n) if readout[f] >= REPRESENTED_MIN_READOUT]


def ground_truth(model: TMS) -> GroundTruth:
    n_features, n_hidden = model.linear1.in_features, model.linear1.out_features
    rep = represented_features(model)
    patterns: dict[str, IdentityCI | DenseCI] = {
        "linear1": IdentityCI(probes=rep),
        "linear2": IdentityCI(probes=rep),
    }
    alive = {"linear1": len(rep), "linear2": len(rep)}
    if len(model.hidden_layers):
        patterns["hidden_layers.0"] = DenseCI(k=n_hidden)
        alive["hidden_layers.0"] = n_hidden
    return GroundTruth(
        probe_inputs=torch.eye(n_features) * PROBE_VALUE,
        directions=[
            FeatureDirections("linear1", axis="in", features=rep),
            FeatureDirections("linear2", axis="out", features=rep),
        ],
        ci_patterns=patterns,
        expected_alive=alive,
        # ML2R: the paper reports 1.031 ± 0.001 on 40-10+ID, so the larger models get [0.97, 1.04]
        criteria=Criteria(mmcs_min=0.999, ml2r_range=(0.97, 1.03 if n_features <= 5 else 1.04), ci_error_max=0),
        info={"n_features": n_features, "n_represented": len(rep)},
    )


def tms_task(
    seed: int = 0,
    n_features: int = 5,
    n_hidden: int = 2,
    hidden_identity: bool = False,
    feature_prob: float = 0.05,
    train_steps: int = 10_000,
    train_batch_size: int = 1024,
    train_lr: float = 5e-3,
    require_all_represented: bool = True,
    target_state: dict[str, Tensor] | None = None,
) -> Task:
    """Train (or load) a TMS target and return it with its data sampler and ground truth."""
    model = TMS(n_features, n_hidden, hidden_identity)
    if target_state is not None:
        model.load_state_dict(target_state)
    else:
        recipe = {"n_features": n_features, "n_hidden": n_hidden, "feature_prob": feature_prob, "steps": train_steps,
                  "batch_size": train_batch_size, "lr": train_lr}  # fmt: skip

        def fit() -> dict[str, Tensor]:
            W, b = train_tms(
                n_features, n_hidden, seed, train_steps, train_batch_size, train_lr, feature_prob=feature_prob
            )
            return {"W": W, "b": b}

        state, source = trained_target("tms", seed, recipe, fit)
        W, b = state["W"], state["b"]
        with torch.no_grad():
            model.linear1.weight.copy_(W)
            model.linear2.weight.copy_(W.T)
            model.linear2.bias.copy_(b)
            for layer in model.hidden_layers:
                layer.weight.copy_(torch.eye(n_hidden))
    rep = represented_features(model)
    norms = [round(v, 4) for v in model.linear1.weight.norm(dim=0).tolist()]
    if require_all_represented and len(rep) < n_features:
        raise RuntimeError(
            f"TMS target (seed {seed}) represents only {len(rep)} of {n_features} features "
            f"(column norms of W: {norms}); its decomposition could not find the missing ones. "
            "Use another seed or recipe, or set target.kwargs.require_all_represented: false to decompose it anyway."
        )

    def sample_batch(batch_size: int, generator: torch.Generator) -> Tensor:
        return sparse_features(batch_size, n_features, feature_prob, generator)

    def subsets(spec: str, batch_size: int, generator: torch.Generator) -> Tensor:
        return feature_subset(spec, batch_size, n_features, feature_prob, generator)

    info = {"n_features": n_features, "n_represented": len(rep), "W_column_norms": norms}
    if target_state is None:
        info["target_source"] = source
    arch = {"class": "toy_models.nets:TMS",
            "kwargs": {"n_features": n_features, "n_hidden": n_hidden, "hidden_identity": hidden_identity}}  # fmt: skip

    def curve() -> ComputeCurve:
        return tms_curve(seed, n_features, n_hidden, feature_prob, train_steps, train_batch_size, train_lr,
                         target=model)  # fmt: skip

    trained = ["linear1.weight", "linear2.weight", "linear2.bias"]  # the identity layer is frozen
    return Task(model, sample_batch, ground_truth(model), info, metrics, subsets, arch, compute_curve=curve,
                trained_parameters=trained)  # fmt: skip


def metrics(x: Tensor, out: Tensor) -> dict[str, Tensor]:
    """The target's own loss: per-sample MSE against the input it should reconstruct."""
    return {"loss": (out - x).pow(2).mean(-1)}
