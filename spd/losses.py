"""Losses: one pure function and one config class each, dispatched through the LOSSES registry.

Adding a loss means editing this file only: write the function, its config class (with a `name`
Literal) and add both to LOSSES and LossConfig.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from spd.adversarial import Budget, Init, PersistentAdversary, Scope, attack
from spd.base_config import BaseConfig
from spd.masks import Routing, Sampling, delta_masks, stochastic_masks, subset_routes
from spd.model import CausalImportances, CleanPass, ComponentModel

OutputLoss = Literal["mse", "kl"]


# ---- output divergences ------------------------------------------------------------------------------
def mse(pred: Float[Tensor, "... d"], target: Float[Tensor, "... d"]) -> Tensor:
    """Mean over batch (and positions) and output dimensions."""
    return F.mse_loss(pred, target)


CHUNK_ELEMENTS = 1 << 22  # logits entries per chunk of the vocabulary-wide losses (16 MB in float32)


def _kl_rows(pred: Float[Tensor, "n vocab"], target: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    logp = pred.float().log_softmax(-1)
    logq = target.float().log_softmax(-1)
    return (logq.exp() * (logq - logp)).sum(-1)


def _row_chunks(n: int, vocab: int) -> list[slice]:
    rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def kl_per_position(pred_logits: Float[Tensor, "... vocab"], target_logits: Float[Tensor, "... vocab"]) -> Tensor:
    """KL(softmax(target) || softmax(pred)) at every position (shape `...`), in float32.

    Computed over chunks of positions, so no more than one chunk's log-softmax exists beside the logits; with
    gradients, each chunk is recomputed in the backward pass (activation checkpointing) instead of keeping its
    log-probabilities, so memory beyond the logits themselves stays one chunk.
    """
    shape = pred_logits.shape[:-1]
    p, q = pred_logits.flatten(0, -2), target_logits.flatten(0, -2)
    parts = _row_chunks(p.shape[0], p.shape[-1])
    if len(parts) == 1:
        return _kl_rows(p, q).reshape(shape)
    grad = torch.is_grad_enabled() and (p.requires_grad or q.requires_grad)
    out = [
        torch.utils.checkpoint.checkpoint(_kl_rows, p[s], q[s], use_reentrant=False) if grad else _kl_rows(p[s], q[s])
        for s in parts
    ]
    return torch.cat(out).reshape(shape)


def kl(pred_logits: Float[Tensor, "... vocab"], target_logits: Float[Tensor, "... vocab"]) -> Tensor:
    """KL(softmax(target) || softmax(pred)), summed over the vocabulary, averaged over positions (chunked: see
    `kl_per_position`)."""
    return kl_per_position(pred_logits, target_logits).mean()


def _ce_rows(logits: Float[Tensor, "n vocab"], labels: Tensor) -> Float[Tensor, " n"]:
    return F.cross_entropy(logits.float(), labels, reduction="none")


def next_token_ce(logits: Float[Tensor, "... seq vocab"], tokens: Tensor) -> Float[Tensor, "... seq_minus_1"]:
    """Cross-entropy of predicting tokens[..., t+1] from logits[..., t], per position, in chunks over positions."""
    pred = logits[..., :-1, :].flatten(0, -2)
    labels = tokens[..., 1:].flatten()
    parts = _row_chunks(pred.shape[0], pred.shape[-1])
    grad = torch.is_grad_enabled() and pred.requires_grad and len(parts) > 1
    out = [
        torch.utils.checkpoint.checkpoint(_ce_rows, pred[s], labels[s], use_reentrant=False)
        if grad
        else _ce_rows(pred[s], labels[s])
        for s in parts
    ]
    return torch.cat(out).reshape(tokens[..., 1:].shape)


DIVERGENCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": mse, "kl": kl}


# ---- pure loss functions -----------------------------------------------------------------------------
def faithfulness_loss(model: ComponentModel) -> Tensor:
    """sum_l ||W_l - V_l U_l||_F^2 / (number of decomposed weights)."""
    total, n = 0.0, 0
    for name in model.module_names:
        d = model.comp(name).delta()
        total = total + d.pow(2).sum()
        n += d.numel()
    return total / n  # type: ignore[return-value]


def faithfulness_per_module(model: ComponentModel) -> dict[str, tuple[float, float]]:
    """{module: (mean squared error, relative error ||W - VU||_F / ||W||_F)}."""
    out = {}
    with torch.no_grad():
        for name in model.module_names:
            c = model.comp(name)
            d, w = c.delta(), c.target_weight()
            out[name] = (d.pow(2).mean().item(), (d.norm() / w.norm().clamp_min(1e-30)).item())
    return out


def importance_minimality_loss(
    ci_upper: dict[str, Float[Tensor, "... C"]], p: float, beta: float = 0.0, eps: float = 1e-12
) -> Tensor:
    """sum over modules and subcomponents of mean_batch (g + eps)^p, plus the frequency term.

    With beta > 0 each subcomponent's term is multiplied by (1 + beta log2(1 + S_c)), where
    S_c = sum_batch (g + eps)^p: frequently important subcomponents cost more per use.
    """
    total: Tensor = torch.zeros(())
    for g in ci_upper.values():
        gp = (g + eps).pow(p).flatten(0, -2)
        m = gp.mean(0)
        layer = m.sum()
        if beta > 0:
            layer = layer + beta * (m * torch.log2(1 + gp.sum(0))).sum()
        total = total + layer
    return total


def smooth_l0_loss(ci_upper: dict[str, Float[Tensor, "... C"]], width: float) -> Tensor:
    """sum over modules and subcomponents of mean_batch g / (g + width): a smooth count of important
    subcomponents per input that approaches L0 as width -> 0 (anneal it with `annealed_width`)."""
    total: Tensor = torch.zeros(())
    for g in ci_upper.values():
        g = g.clamp_min(0.0).flatten(0, -2)
        total = total + (g / (g + width)).mean(0).sum()
    return total


def annealed_width(width: float, final: float | None, start_frac: float, end_frac: float, frac: float) -> float:
    """Geometric anneal of the smooth-L0 width from `width` to `final` between start_frac and end_frac."""
    if final is None or frac <= start_frac:
        return width
    if frac >= end_frac:
        return final
    t = (frac - start_frac) / (end_frac - start_frac)
    return width ** (1 - t) * final**t


def annealed_p(p: float, p_final: float | None, start_frac: float, end_frac: float, frac: float) -> float:
    """Linear anneal from p to p_final between start_frac and end_frac of training (the Lp exponent; APD's
    top-k)."""
    if p_final is None or frac <= start_frac:
        return p
    if frac >= end_frac:
        return p_final
    return p + (p_final - p) * (frac - start_frac) / (end_frac - start_frac)


def masked_recon_loss(
    model: ComponentModel,
    x: Any,
    target_out: Tensor,
    masks: dict[str, Tensor],
    routing: Routing,
    divergence: Callable[[Tensor, Tensor], Tensor],
    delta_masks_: dict[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    clean: CleanPass | None = None,
) -> Tensor:
    """Divergence of the masked model's output from the target's, routed through `routing`.

    all: every module at once; layerwise: the mean over modules of one-module-at-a-time passes;
    subset: per position a uniformly random k-subset of modules (k ~ U{1..L}).
    `clean` (the clean pass on x) only saves work; the result is the same without it.
    """
    if routing == "all":
        return divergence(model(x, masks, delta_masks_, clean=clean), target_out)
    if routing == "layerwise":
        losses = [
            divergence(
                model(x, {n: masks[n]}, None if delta_masks_ is None else {n: delta_masks_[n]}, clean=clean),
                target_out,
            )
            for n in masks
        ]
        return torch.stack(losses).mean()
    if routing == "subset":
        any_mask = next(iter(masks.values()))
        routes = subset_routes(list(masks), any_mask.shape[:-1], generator, any_mask.device)
        return divergence(model(x, masks, delta_masks_, routes, clean=clean), target_out)
    raise ValueError(f"unknown routing {routing!r}; valid: all, layerwise, subset")


def stochastic_recon_loss(
    model: ComponentModel,
    x: Any,
    target_out: Tensor,
    ci_lower: dict[str, Tensor],
    routing: Routing,
    divergence: Callable[[Tensor, Tensor], Tensor],
    n_mask_samples: int = 1,
    sampling: Sampling = "continuous",
    generator: torch.Generator | None = None,
    clean: CleanPass | None = None,
) -> Tensor:
    """Mean over mask samples of the masked-reconstruction loss with masks g + (1-g) r."""
    total: Tensor = torch.zeros(())
    for _ in range(n_mask_samples):
        masks = stochastic_masks(ci_lower, sampling, generator)
        dm = delta_masks(ci_lower, generator) if model.delta_component else None
        total = total + masked_recon_loss(model, x, target_out, masks, routing, divergence, dm, generator, clean)
    return total / n_mask_samples


def schatten_loss(model: ComponentModel, ci: dict[str, Float[Tensor, "... C"]], p: float, eps: float = 1e-16) -> Tensor:
    """APD's simplicity loss: sum_l sum_c mean_batch(g_c) sum_m (||V_{l,c,m}||^2 ||U_{l,c,m}||^2 + eps)^(p/2),
    divided by the number of decomposed weights.

    ||V_m|| ||U_m|| stands in for the m-th singular value of component c (exact when its r read columns and r
    write rows are each orthogonal), so this is a Schatten-p quasi-norm of the active components without an SVD.
    """
    total: Tensor = torch.zeros(())
    n_params = 0
    for name in model.module_names:
        comp = model.comp(name)
        sv = comp.V.pow(2).sum(0).unflatten(0, (comp.C, comp.rank))
        su = comp.U.pow(2).sum(1).unflatten(0, (comp.C, comp.rank))
        per_c = (sv * su + eps).pow(p / 2).sum(-1)  # (C,)
        total = total + (ci[name].flatten(0, -2).mean(0) * per_c).sum()
        n_params += comp.d_in * comp.d_out
    return total / n_params


def hidden_acts_recon_loss(
    model: ComponentModel,
    x: Any,
    clean_acts: dict[str, Tensor],
    ci_lower: dict[str, Tensor],
    sampling: Sampling = "continuous",
    generator: torch.Generator | None = None,
    mask: Literal["stochastic", "ci"] = "stochastic",
    modules: str | None = None,
) -> Tensor:
    """MSE between decomposed modules' inputs under an all-module masked pass and in the clean pass.

    mask stochastic: g + (1-g) r, with the delta component; ci: the CIs themselves, no delta (APD's top-k pass).
    modules: a glob; only the inputs of matching decomposed modules are compared (default: all).
    """
    if mask == "ci":
        masks, dm = ci_lower, None
    else:
        masks = stochastic_masks(ci_lower, sampling, generator)
        dm = delta_masks(ci_lower, generator) if model.delta_component else None
    seen: dict[str, Tensor] = {}
    model(x, masks, dm, cache=seen)
    floats = {n: v for n, v in seen.items() if v.is_floating_point()}
    names = list(select_modules(floats, modules, "hidden_acts_recon"))
    sq = sum((seen[n] - clean_acts[n]).pow(2).sum() for n in names)
    count = sum(clean_acts[n].numel() for n in names)
    return sq / max(count, 1)  # type: ignore[return-value]


# ---- configs and registry ----------------------------------------------------------------------------
class _LossBase(BaseConfig):
    coeff: float = Field(ge=0.0)


class FaithfulnessConfig(_LossBase):
    name: Literal["faithfulness"]


class ImportanceMinimalityConfig(_LossBase):
    name: Literal["importance_minimality"]
    p: float = Field(1.0, gt=0.0)
    p_final: float | None = Field(None, gt=0.0)
    p_anneal_start: float = Field(0.0, ge=0.0, le=1.0)
    p_anneal_end: float = Field(1.0, ge=0.0, le=1.0)
    beta: float = Field(0.0, ge=0.0)
    eps: float = Field(1e-12, ge=0.0)
    modules: str | None = Field(
        None,
        description="glob over decomposed modules whose CIs this term penalises (default: all); list the loss "
        "twice with disjoint globs for per-layer coefficients",
    )


class StochasticReconConfig(_LossBase):
    name: Literal["stochastic_recon"]
    routing: Routing = "all"
    n_mask_samples: int = Field(1, ge=1)
    sampling: Sampling = "continuous"


class PGDReconConfig(_LossBase):
    """Reconstruction under fresh adversarial masks (spd.adversarial), found anew every step."""

    name: Literal["pgd_recon"]
    routing: Routing = "all"
    n_steps: int = Field(1, ge=1)
    step_size: float = Field(1.0, gt=0.0)
    init: Init = "random"
    scope: Scope = "shared"


class PersistentPGDReconConfig(_LossBase):
    """Reconstruction under adversarial masks shared across the batch that persist across training steps,
    moved uphill once per step (`update`: sign step of size lr, or Adam ascent with lr and betas)."""

    name: Literal["persistent_pgd_recon"]
    routing: Routing = "all"
    update: Literal["sign", "adam"] = "sign"
    lr: float = Field(0.1, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.99)
    init: Init = "random"


class SmoothL0Config(_LossBase):
    """Importance minimality as a smooth L0, sum_c g / (g + width), whose width anneals (geometrically) from
    `width` to `width_final` between the anneal fractions of training, sharpening towards a true count."""

    name: Literal["smooth_l0"]
    width: float = Field(0.1, gt=0.0)
    width_final: float | None = Field(None, gt=0.0)
    anneal_start: float = Field(0.0, ge=0.0, le=1.0)
    anneal_end: float = Field(1.0, ge=0.0, le=1.0)


class CIMaskedReconConfig(_LossBase):
    name: Literal["ci_masked_recon"]
    routing: Routing = "all"


class HiddenActsReconConfig(_LossBase):
    name: Literal["hidden_acts_recon"]
    sampling: Sampling = "continuous"
    mask: Literal["stochastic", "ci"] = Field(
        "stochastic", description="stochastic: g + (1-g) r masks; ci: the CIs as masks (APD: the top-k pass)"
    )
    modules: str | None = Field(
        None, description="glob over decomposed modules whose inputs are compared (default: all of them)"
    )


class SchattenConfig(_LossBase):
    """APD's simplicity loss on the active (CI-weighted) components: a Schatten-p quasi-norm proxy."""

    name: Literal["schatten"]
    p: float = Field(1.0, gt=0.0, le=2.0)
    eps: float = Field(1e-16, ge=0.0)


LossConfig = Annotated[
    FaithfulnessConfig
    | ImportanceMinimalityConfig
    | StochasticReconConfig
    | CIMaskedReconConfig
    | HiddenActsReconConfig
    | PGDReconConfig
    | PersistentPGDReconConfig
    | SmoothL0Config
    | SchattenConfig,
    Field(discriminator="name"),
]


@dataclass
class StepContext:
    """What one training step has computed once and every loss may read."""

    model: ComponentModel
    x: Any
    clean: CleanPass  # the clean target pass on x (masked passes reuse it)
    ci: CausalImportances
    divergence: Callable[[Tensor, Tensor], Tensor]
    generator: torch.Generator | None
    frac: float  # step / total steps
    adversaries: dict[int, PersistentAdversary] = field(default_factory=dict)  # id(loss config) -> state

    @property
    def target_out(self) -> Tensor:
        return self.clean.output

    @property
    def acts(self) -> dict[str, Tensor]:
        return self.clean.acts


def _faith(ctx: StepContext, cfg: FaithfulnessConfig) -> Tensor:
    return faithfulness_loss(ctx.model)


def _imp(ctx: StepContext, cfg: ImportanceMinimalityConfig) -> Tensor:
    p = annealed_p(cfg.p, cfg.p_final, cfg.p_anneal_start, cfg.p_anneal_end, ctx.frac)
    return importance_minimality_loss(select_modules(ctx.ci.upper, cfg.modules, "importance_minimality"), p,
                                      cfg.beta, cfg.eps)  # fmt: skip


def select_modules(tensors: dict[str, Tensor], modules: str | None, loss: str) -> dict[str, Tensor]:
    """The entries whose module name matches the glob `modules` (all of them for None); a glob that matches
    nothing is a config error, named by its loss."""
    if modules is None:
        return tensors
    hits = {n: t for n, t in tensors.items() if fnmatch.fnmatchcase(n, modules)}
    if not hits:
        raise ValueError(f"{loss}.modules {modules!r} matches no decomposed module (they are: {list(tensors)})")
    return hits


def _stoch(ctx: StepContext, cfg: StochasticReconConfig) -> Tensor:
    return stochastic_recon_loss(
        ctx.model, ctx.x, ctx.target_out, ctx.ci.lower, cfg.routing, ctx.divergence,
        cfg.n_mask_samples, cfg.sampling, ctx.generator, ctx.clean,
    )  # fmt: skip


def _ci_masked(ctx: StepContext, cfg: CIMaskedReconConfig) -> Tensor:
    return masked_recon_loss(
        ctx.model, ctx.x, ctx.target_out, ctx.ci.lower, cfg.routing, ctx.divergence, None, ctx.generator, ctx.clean
    )


def _l0(ctx: StepContext, cfg: SmoothL0Config) -> Tensor:
    width = annealed_width(cfg.width, cfg.width_final, cfg.anneal_start, cfg.anneal_end, ctx.frac)
    return smooth_l0_loss(ctx.ci.upper, width)


def _pgd(ctx: StepContext, cfg: PGDReconConfig) -> Tensor:
    budget = Budget(cfg.n_steps, cfg.step_size, cfg.init, cfg.scope)
    return attack(
        ctx.model, ctx.x, ctx.target_out, ctx.ci.lower, cfg.routing, ctx.divergence, budget, ctx.generator, ctx.clean
    )


def _persistent_pgd(ctx: StepContext, cfg: PersistentPGDReconConfig) -> Tensor:
    if id(cfg) not in ctx.adversaries:
        raise RuntimeError("persistent_pgd_recon needs the trainer's PersistentAdversary (StepContext.adversaries)")
    masks, dm = ctx.adversaries[id(cfg)].masks(ctx.ci.lower)
    return masked_recon_loss(
        ctx.model, ctx.x, ctx.target_out, masks, cfg.routing, ctx.divergence, dm, ctx.generator, ctx.clean
    )


def _hidden(ctx: StepContext, cfg: HiddenActsReconConfig) -> Tensor:
    return hidden_acts_recon_loss(
        ctx.model, ctx.x, ctx.acts, ctx.ci.lower, cfg.sampling, ctx.generator, cfg.mask, cfg.modules
    )


def _schatten(ctx: StepContext, cfg: SchattenConfig) -> Tensor:
    return schatten_loss(ctx.model, ctx.ci.lower, cfg.p, cfg.eps)


LOSSES: dict[str, Callable[[StepContext, Any], Tensor]] = {
    "faithfulness": _faith,
    "importance_minimality": _imp,
    "stochastic_recon": _stoch,
    "ci_masked_recon": _ci_masked,
    "hidden_acts_recon": _hidden,
    "pgd_recon": _pgd,
    "persistent_pgd_recon": _persistent_pgd,
    "smooth_l0": _l0,
    "schatten": _schatten,
}


def loss_label(cfg: BaseConfig) -> str:
    """A short unique-ish label for logging, e.g. 'stochastic_recon/layerwise'."""
    name: str = cfg.name  # type: ignore[attr-defined]
    routing = getattr(cfg, "routing", None)
    label = f"{name}/{routing}" if routing is not None and routing != "all" else name
    modules = getattr(cfg, "modules", None)
    return f"{label}[{modules}]" if modules is not None else label


def total_loss(ctx: StepContext, cfgs: list[Any]) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of the configured losses and a {label: detached value} dict of the unweighted terms."""
    total: Tensor = torch.zeros(())
    terms: dict[str, Tensor] = {}
    for cfg in cfgs:
        value = LOSSES[cfg.name](ctx, cfg)
        label = loss_label(cfg)
        while label in terms:
            label += "'"
        terms[label] = value
        total = total + cfg.coeff * value
    return total, {k: v.detach() for k, v in terms.items()} | {"total": total.detach()}
