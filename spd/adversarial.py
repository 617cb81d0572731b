"""Adversarial ablation masks: projected gradient ascent (PGD) on how strongly each subcomponent is ablated.

A mask is `m = g + (1 - g) s` with s in [0, 1]: s = 1 keeps a subcomponent, s = 0 ablates it down to its
causal importance g (the most a stochastic mask could ever ablate it). The delta component (W - sum of
subcomponents), which has no CI, gets mask `s_delta` directly. PGD chooses s to *maximise* the output divergence
from the target: `s <- clamp(s + step_size * sign(dD/ds), 0, 1)` for `n_steps` steps from an `init`.

- Fresh PGD (`attack`) starts again on every call: per example (s shaped like g) or shared across the batch
  (one s per subcomponent). Used by the `pgd_recon` loss and by evaluation.
- Persistent PGD (`PersistentAdversary`) keeps one shared s per module across training steps and moves it once
  per step (sign step or Adam ascent) from the gradient the training backward pass already computed; its state is
  saved in checkpoints.

Routing is the stochastic losses': all modules at once, each module alone (a separate attack per module), or a
uniformly random k-subset of modules per position (drawn once, then held fixed while attacking).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, no_type_check

import torch
from jaxtyping import Float
from torch import Tensor

from spd.masks import Routing, subset_routes
from spd.model import CleanPass, ComponentModel

Init = Literal["random", "ones", "zeros"]
Scope = Literal["per_example", "shared"]
Divergence = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Budget:
    """What an adversary may do; stated next to every adversarial number (`label`)."""

    n_steps: int = 20
    step_size: float = 0.1
    init: Init = "random"
    scope: Scope = "shared"

    @property
    def label(self) -> str:
        return f"{self.n_steps}x{self.step_size:g}" + ("-per-example" if self.scope == "per_example" else "")

    def describe(self) -> str:
        where = "shared across the batch" if self.scope == "shared" else "per example"
        return f"PGD {self.n_steps} steps of size {self.step_size:g} from {self.init} init, {where}"


def adversarial_masks(
    ci: dict[str, Float[Tensor, "... C"]], s: dict[str, Tensor], s_delta: dict[str, Tensor] | None
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Masks g + (1 - g) s per module (s broadcast over the batch when shared), and delta masks s_delta."""
    masks = {n: g + (1 - g) * s[n] for n, g in ci.items() if n in s}
    if s_delta is None:
        return masks, None
    return masks, {n: s_delta[n].expand(ci[n].shape[:-1]) for n in masks}


def _init(shape: torch.Size, init: Init, ref: Tensor, generator: torch.Generator | None) -> Tensor:
    if init == "random":
        return torch.rand(shape, generator=generator, dtype=torch.float32, device=ref.device)
    if init == "ones":
        return torch.ones(shape, dtype=torch.float32, device=ref.device)
    if init == "zeros":
        return torch.zeros(shape, dtype=torch.float32, device=ref.device)
    raise ValueError(f"unknown PGD init {init!r}; valid: random, ones, zeros")


def pgd_ascend(
    loss_fn: Callable[[dict[str, Tensor], dict[str, Tensor] | None], Tensor],
    s: dict[str, Tensor],
    s_delta: dict[str, Tensor] | None,
    budget: Budget,
) -> None:
    """`budget.n_steps` signed-gradient ascent steps on loss_fn(s, s_delta), in place, projected onto [0, 1]."""
    leaves = list(s.values()) + (list(s_delta.values()) if s_delta is not None else [])
    for _ in range(budget.n_steps):
        for t in leaves:
            t.requires_grad_(True)
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(s, s_delta), leaves, allow_unused=True)
        with torch.no_grad():
            for t, gr in zip(leaves, grads, strict=True):
                t.requires_grad_(False)
                if gr is not None:
                    t.add_(budget.step_size * gr.sign()).clamp_(0.0, 1.0)


def attack(
    model: ComponentModel,
    x: Any,
    target_out: Tensor,
    ci_lower: dict[str, Tensor],
    routing: Routing,
    divergence: Divergence,
    budget: Budget,
    generator: torch.Generator | None = None,
    clean: CleanPass | None = None,
) -> Tensor:
    """The divergence under fresh PGD masks, differentiable in the CIs and components (for training or eval).

    The attack itself sees detached CIs, so only the final forward, with the chosen s held fixed, trains.
    """
    names = list(ci_lower)
    g_det = {n: g.detach() for n, g in ci_lower.items()}
    attack_clean = None
    if clean is not None:
        inner = None if clean.inner is None else {k: v.detach() for k, v in clean.inner.items()}
        attack_clean = replace(clean, inner=inner)
    any_g = next(iter(ci_lower.values()))
    batch_shape = any_g.shape[:-1]
    routes = subset_routes(names, batch_shape, generator, any_g.device) if routing == "subset" else None

    @no_type_check  # a closure made per call (why unchecked: tests/conftest.py)
    def fresh(ns: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        lead = batch_shape if budget.scope == "per_example" else torch.Size([])
        s = {n: _init(torch.Size([*lead, ci_lower[n].shape[-1]]), budget.init, any_g, generator) for n in ns}
        sd = {n: _init(lead, budget.init, any_g, generator) for n in ns} if model.delta_component else None
        return s, sd

    @no_type_check
    def run(g: dict[str, Tensor], s: dict[str, Tensor], sd: dict[str, Tensor] | None, c: CleanPass | None) -> Tensor:
        masks, dm = adversarial_masks(g, s, sd)
        return divergence(model(x, masks, dm, routes, clean=c), target_out)

    groups = [[n] for n in names] if routing == "layerwise" else [names]
    losses = []
    for ns in groups:
        s, sd = fresh(ns)
        pgd_ascend(lambda s_, sd_, ns=ns: run({n: g_det[n] for n in ns}, s_, sd_, attack_clean), s, sd, budget)
        losses.append(run({n: ci_lower[n] for n in ns}, s, sd, clean))
    return torch.stack(losses).mean()


class PersistentAdversary:
    """Shared adversarial ablation levels that live across training steps (one s per subcomponent, module).

    `masks(ci)` gives the masks for this step with s as a leaf that collects gradients during the training
    backward pass; `step()` then moves s uphill once (sign: s += lr sign(grad); adam: Adam ascent with lr, betas)
    and clears the gradient. Gradient scale does not matter (the loss coefficient multiplies it): the sign and
    Adam's normalised step are invariant to it.
    """

    def __init__(
        self,
        Cs: dict[str, int],
        delta: bool,
        update: Literal["sign", "adam"] = "sign",
        lr: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        init: Init = "random",
        device: str | torch.device = "cpu",
        generator: torch.Generator | None = None,
    ) -> None:
        self.update, self.lr, self.betas, self.delta = update, lr, betas, delta
        ref = torch.empty((), device=device)
        self.s = {n: _init(torch.Size([C]), init, ref, generator) for n, C in Cs.items()}
        if delta:
            self.s |= {f"{n}#delta": _init(torch.Size([]), init, ref, generator) for n in Cs}
        self.m = {k: torch.zeros_like(v) for k, v in self.s.items()}
        self.v = {k: torch.zeros_like(v) for k, v in self.s.items()}
        self.t = 0

    def masks(self, ci_lower: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        for t in self.s.values():
            t.requires_grad_(True)
        s = {n: self.s[n] for n in ci_lower}
        sd = {n: self.s[f"{n}#delta"] for n in ci_lower} if self.delta else None
        return adversarial_masks(ci_lower, s, sd)

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for k, s in self.s.items():
            g = s.grad
            s.requires_grad_(False)
            if g is None:
                continue
            if self.update == "sign":
                s.add_(self.lr * g.sign())
            else:
                self.m[k].mul_(b1).add_(g, alpha=1 - b1)
                self.v[k].mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = self.m[k] / (1 - b1**self.t)
                v_hat = self.v[k] / (1 - b2**self.t)
                s.add_(self.lr * m_hat / (v_hat.sqrt() + 1e-8))
            s.clamp_(0.0, 1.0)
            s.grad = None

    def state_dict(self) -> dict[str, Tensor]:
        out = {f"s.{k}": v.detach() for k, v in self.s.items()}
        out |= {f"m.{k}": v for k, v in self.m.items()} | {f"v.{k}": v for k, v in self.v.items()}
        return out | {"t": torch.tensor(self.t)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k in self.s:
            self.s[k] = state[f"s.{k}"].clone().to(self.s[k].device)
            self.m[k] = state[f"m.{k}"].clone().to(self.m[k].device)
            self.v[k] = state[f"v.{k}"].clone().to(self.v[k].device)
        self.t = int(state["t"])
