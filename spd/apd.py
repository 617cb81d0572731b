"""APD (attribution-based parameter decomposition) on the same core as SPD.

An APD component c is a piece of *every* decomposed matrix at once: P_{c,l} = V_l[:, c*r:(c+1)*r] @
U_l[c*r:(c+1)*r] (rank r per matrix; `Components` with rank r). Instead of a CI function, each input gets an
attribution per component (gradient, ablation or activation) and the top-k attributed components are active:
the binary indicator s_c(x) plays the part of the causal importance of component c in every matrix, so the
masked forward, losses, evaluation, ground-truth scorers and CLI are SPD's. What differs is only this file:
attributions, top-k, and the model that uses them (plus the Schatten loss in spd.losses).

APD's losses in config terms: faithfulness; minimality = `ci_masked_recon` (the top-k forward's divergence
from the target, since the CI is the top-k indicator); simplicity = `schatten`; optional hidden-activation
reconstruction = `hidden_acts_recon` with `mask: ci`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, no_type_check

import torch
from jaxtyping import Float
from pydantic import Field, model_validator
from torch import Tensor, nn

from spd.base_config import BaseConfig
from spd.losses import annealed_p
from spd.model import CausalImportances, CleanPass, ComponentModel, ModuleSpec, output_tensor

Attribution = Literal["gradient", "ablation", "activation"]
# Auto chunking: at most this many elements in one module's batched gradient. On a 2-core CPU batching pays while
# the batched gradient stays cache-sized (TMS 40-10, batch 2048: 30 ms with all 40 outputs at once vs 77 ms one by
# one) and loses beyond (ResidMLP 1: 2 MB per output; 1.41 s one by one, 1.51 s by 4, 1.85 s by 16); on a GPU the
# per-pass launch overhead dominates instead, so it batches much more.
GRAD_CHUNK_ELEMENTS = {"cpu": 2**21, "cuda": 2**25}


class SplitConfig(BaseConfig):
    """Re-use dead components (`apd.split`): at the given steps, each component that was active on none of
    `inputs` fresh inputs takes half of the busiest component (split along the inputs it is active on), while
    that one is active on at least `min_ratio` times the median alive component's share of inputs. Not in the
    APD paper."""

    at: list[int] = Field(min_length=1, description="steps (0-based, before that step's update) at which to split")
    gather: bool = Field(
        True,
        description="first sum all dead components into the first of them (the matrices' sum is unchanged): a "
        "feature that faithfulness left spread thinly over dead components (an orphan) then sits whole in one "
        "component, which wins top-k slots on its inputs",
    )
    min_ratio: float = Field(1.5, gt=1.0)
    inputs: int = Field(16_384, gt=0)


class APDConfig(BaseConfig):
    """Settings of `method: apd` (every decomposed module must have the same C: a component spans them all)."""

    topk: float = Field(
        gt=0,
        description="active components per input: with topk_mode batch, the average (the batch's int(topk * N) "
        "largest attributions are active; a float such as 1.28), with per_example, exactly this many (an integer)",
    )
    topk_final: float | None = Field(
        None,
        gt=0,
        description="anneal the number of active components from topk to this over training (linear in the "
        "training fraction, from topk_anneal_start to topk_anneal_end; None: no anneal). Not in the APD paper: "
        "more active components early let every feature's inputs train some component before top-k tightens",
    )
    topk_anneal_start: float = Field(0.0, ge=0.0, le=1.0)
    topk_anneal_end: float = Field(0.5, ge=0.0, le=1.0)
    topk_mode: Literal["batch", "per_example"] = "batch"
    min_active: int = Field(
        0,
        ge=0,
        description="with topk_mode batch, every input with any nonzero attribution also gets its this many "
        "most attributed components (0: plain batch top-k, the paper). Not in the APD paper: it keeps inputs "
        "that lose the batch-wide ranking (a feature spread thinly over never-active components) from getting "
        "no active component, so the minimality loss can recruit one for them. Measured on TMS 40-10 (top-k 1, "
        "seeds 0 and 1): worse than without it (MMCS 0.89 and 0.86 vs 0.93 and 0.97; features split, ML2R 0.55)",
    )
    rank: int | Literal["full"] = Field(
        "full", description="rank of each component in each matrix; 'full' = min(d_in, d_out) per matrix"
    )
    attribution: Attribution = Field(
        "gradient",
        description="gradient: first-order effect of removing the component on every output (the APD paper); "
        "ablation: output divergence when the component alone is zeroed (one forward per component); "
        "activation: squared norm of the component's output",
    )
    attribution_source: Literal["target", "components"] = Field(
        "target",
        description="whose gradients the gradient attribution uses: the target's (the paper) or the sum of the "
        "components' (the paper's exception for TMS 5-2)",
    )
    grad_chunk: int = Field(
        0,
        ge=0,
        description="output dimensions per batched backward pass in the gradient attribution (0: as many as "
        "keep each batched gradient under 2M elements on a CPU, 33M on a GPU; 1: the naive loop of one backward "
        "pass per output dimension)",
    )
    unit_norm_read: bool = Field(
        False, description="after every step, scale each read column of V to unit norm (the APD ResidMLP recipe)"
    )
    split: SplitConfig | None = Field(
        None,
        description="re-use dead components at set steps by splitting the busiest ones into them "
        "(spd.apd.split_components). Why: a component that carries two features is active twice as often as one "
        "that carries one, and a dead component never wins a top-k slot, so no gradient could move the second "
        "feature over; split along the inputs it is active on, each half wins the slots of its own inputs",
    )

    @model_validator(mode="after")
    def _min_active_needs_batch(self) -> APDConfig:
        if self.min_active and self.topk_mode != "batch":
            raise ValueError(
                f"apd.min_active ({self.min_active}) applies to topk_mode batch only; with per_example every input "
                "already gets apd.topk components: set min_active to 0 or topk_mode to batch"
            )
        return self

    @model_validator(mode="after")
    def _anneal_valid(self) -> APDConfig:
        if self.topk_final is not None:
            if self.topk_mode == "per_example" and self.topk_final != int(self.topk_final):
                raise ValueError(f"apd.topk_final must be an integer with topk_mode per_example, got {self.topk_final}")
            if self.topk_anneal_end <= self.topk_anneal_start:
                raise ValueError(
                    f"apd.topk_anneal_end ({self.topk_anneal_end}) must be after apd.topk_anneal_start "
                    f"({self.topk_anneal_start}): both are fractions of training in [0, 1]"
                )
        return self

    def topk_at(self, frac: float) -> float:
        """Active components per input at training fraction frac (topk, annealed linearly to topk_final)."""
        k = annealed_p(self.topk, self.topk_final, self.topk_anneal_start, self.topk_anneal_end, frac)
        return float(round(k)) if self.topk_mode == "per_example" else k


# ---- top-k --------------------------------------------------------------------------------------------
def topk_mask(
    attr: Float[Tensor, "... C"], topk: float | int, mode: Literal["batch", "per_example"], min_active: int = 0
) -> Tensor:
    """Binary (float) mask of the active components.

    batch: the int(topk * N) largest entries of the flattened (N = all leading positions) x C matrix, plus,
    with min_active > 0, each row's min_active largest entries where that row has any nonzero attribution;
    per_example: the topk (an integer) largest entries of each row.
    """
    flat = attr.detach().flatten(0, -2)
    n, C = flat.shape
    if mode == "batch":
        k = min(int(topk * n), n * C)
        mask = torch.zeros(n * C, dtype=attr.dtype, device=attr.device)
        if k > 0:
            mask[flat.flatten().topk(k).indices] = 1.0
        mask = mask.view(n, C)
        if min_active > 0:
            floor = torch.zeros_like(mask).scatter_(-1, flat.topk(min(min_active, C), dim=-1).indices, 1.0)
            floor = floor * (flat > 0)  # an input no component touches (all zero) stays without one
            mask = torch.maximum(mask, floor)
        return mask.view(attr.shape)
    if topk != int(topk):
        raise ValueError(f"apd.topk must be an integer with topk_mode per_example, got {topk}")
    k = min(int(topk), C)
    mask = torch.zeros_like(flat)
    mask.scatter_(-1, flat.topk(k, dim=-1).indices, 1.0)
    return mask.view(attr.shape)


# ---- splitting busy components into dead ones ------------------------------------------------------------
def choose_splits(freq: Float[Tensor, " C"], min_ratio: float, skip: tuple[int, ...] = ()) -> list[tuple[int, int]]:
    """(busy, dead) pairs: every never-active component (except those in `skip`) is given to the busiest
    component while that one is active at least `min_ratio` times as often as the median alive component; a
    split halves the busy one's count and gives the new half the same (so one component is split again only if it
    is still the busiest)."""
    f = freq.detach().double().clone()
    alive = f > 0
    if not alive.any():
        return []
    median = f[alive].median()
    pairs: list[tuple[int, int]] = []
    for d in (~alive).nonzero().flatten().tolist():
        if d in skip:
            continue
        c = int(f.argmax())
        if f[c] < min_ratio * median:
            break
        f[c] = f[c] / 2
        f[d] = f[c]
        pairs.append((c, d))
    return pairs


def two_means(z: Float[Tensor, "n d"], iters: int = 20) -> Tensor:
    """Boolean labels of a 2-means clustering of the rows of z by cosine (spherical k-means), seeded with the
    largest row and the row least similar to it."""
    u = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a = u[z.norm(dim=-1).argmax()]
    b = u[(u @ a).argmin()]
    labels = (u @ a) >= (u @ b)
    for _ in range(iters):
        if labels.all() or not labels.any():
            break
        a = u[labels].mean(0)
        b = u[~labels].mean(0)
        new = (u @ a) >= (u @ b)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


@torch.no_grad()
def split_along_inputs(
    model: APDModel,
    src: int,
    dst: int,
    acts: dict[str, Float[Tensor, "n d_in"]],
    opt: torch.optim.Optimizer | None = None,
) -> Tensor | None:
    """Split component src between itself and dst along the inputs it is active on (`acts`: every decomposed
    module's inputs there): the inputs fall into two clusters (2-means on all modules' inputs, each scaled to
    unit rms); in every matrix src keeps its read directions projected on the mean input m of one cluster, dst
    gets the rest (P = Pi P + (1 - Pi) P with Pi = m m^T, in x @ P orientation; dst's own content is dropped, so
    the sum of components is unchanged where dst was empty, as gathered dead components are); dst takes the
    optimizer's moments of src. Returns which inputs src keeps (the cluster), or None (nothing done) when the
    inputs do not split into two clusters."""
    names = [n for n, comp in model.components.items() if isinstance(comp.V, nn.Parameter)]
    z = torch.cat([acts[n].flatten(1) / acts[n].pow(2).mean().sqrt().clamp_min(1e-12) for n in names], dim=-1)
    if z.shape[0] < 2:
        return None
    labels = two_means(z)
    if labels.all() or not labels.any():
        return None
    for n in names:
        comp = model.components[n]
        r = comp.rank
        s, d = slice(src * r, (src + 1) * r), slice(dst * r, (dst + 1) * r)
        m = acts[n][labels].mean(0)
        m = m / m.norm().clamp_min(1e-12)
        Vs = comp.V[:, s]
        kept = m[:, None] * (m @ Vs)[None]  # the read directions' part along the cluster's mean input
        comp.V[:, d] = Vs - kept
        comp.V[:, s] = kept
        comp.U[d] = comp.U[s]
        for param, idx in ((comp.V, lambda sl: (slice(None), sl)), (comp.U, lambda sl: (sl,))):
            for moment in (opt.state.get(param, {}) if opt is not None else {}).values():
                if isinstance(moment, Tensor) and moment.shape == param.shape:
                    moment[idx(d)] = moment[idx(s)]
    return labels


@torch.no_grad()
def gather_components(model: APDModel, comps: list[int]) -> None:
    """Put the sum of components `comps` into the first of them (best rank-r fit of the sum, exact at full rank)
    and zero the others, so the sum over all components is unchanged."""
    for comp in model.components.values():
        if not isinstance(comp.V, nn.Parameter):  # tied (transposed) components share their source's factors
            continue
        r = comp.rank
        total = sum(comp.subcomponent(c) for c in comps)
        A, S, Bh = torch.linalg.svd(total, full_matrices=False)
        root = S[:r].sqrt()
        first = slice(comps[0] * r, (comps[0] + 1) * r)
        comp.V[:, first] = A[:, :r] * root
        comp.U[first] = root[:, None] * Bh[:r]
        for c in comps[1:]:
            comp.V[:, c * r : (c + 1) * r] = 0.0
            comp.U[c * r : (c + 1) * r] = 0.0


@torch.no_grad()
def activity(model: APDModel, batches: list[Any]) -> tuple[Float[Tensor, "n C"], dict[str, Float[Tensor, "n d_in"]]]:
    """Which components are active on each input (position) under the current top-k, and every decomposed
    module's inputs there."""
    masks, acts = [], []
    for xb in batches:
        clean = model.clean_pass(xb)
        masks.append(model.importances(xb, clean).lower[model.module_names[0]].flatten(0, -2))
        acts.append({n: a.flatten(0, -2) for n, a in clean.acts.items()})
    return torch.cat(masks), {n: torch.cat([a[n] for a in acts]) for n in acts[0]}


def split_components(
    model: APDModel, batches: list[Any], cfg: SplitConfig, opt: torch.optim.Optimizer | None
) -> list[tuple[int, int]]:
    """Measure which components are active on `batches`; with cfg.gather, sum the dead components into the first
    of them; choose (busy, dead) pairs among the rest and split each busy component between itself and its dead
    one along the inputs it is active on (`split_along_inputs`); returns the pairs split."""
    active, acts = activity(model, batches)
    freq = active.mean(0)
    dead = (freq == 0).nonzero().flatten().tolist()
    skip: tuple[int, ...] = ()
    if cfg.gather and len(dead) > 1:
        gather_components(model, dead)
        skip = (dead[0],)
    done = []
    for c, d in choose_splits(freq, cfg.min_ratio, skip):
        on = (active[:, c] > 0).nonzero().flatten()  # c's inputs (after an earlier split of c: the ones it kept)
        kept = split_along_inputs(model, c, d, {n: a[on] for n, a in acts.items()}, opt)
        if kept is not None:
            active[on[~kept], c] = 0.0
            active[on[~kept], d] = 1.0
            done.append((c, d))
    return done


# ---- attributions -------------------------------------------------------------------------------------
def _component_outputs(comp: Any, inner: Tensor) -> Tensor | None:
    """(..., C, d_out) outputs of every component (from the inner activations), or None for rank 1, where
    contracting the gradient with U directly costs the same and builds nothing."""
    if comp.rank == 1:
        return None
    h = inner.unflatten(-1, (comp.C, comp.rank))
    return torch.einsum("...cm,cmk->...ck", h, comp.U.unflatten(0, (comp.C, comp.rank)))


def _contract(comp: Any, grad: Tensor, inner: Tensor, comp_out: Tensor | None) -> Tensor:
    """sum_k grad[..., k] (component c's output)[..., c, k] for every component c.

    Rank 1: (grad @ U^T) * inner. Rank r: against the prebuilt component outputs, r times fewer operations
    than (grad @ U^T) * inner summed over each component's r columns.
    """
    if comp_out is None:
        return (grad @ comp.U.T) * inner
    return torch.einsum("o...k,...ck->o...c", grad, comp_out)


def gradient_attributions(model: APDModel, x: Any, source: str = "target", chunk: int = 0) -> Float[Tensor, "... C"]:
    """A_c(x) = sum_o (sum_l sum_k df_o/d(out_l)_k * (a_l @ P_{c,l})_k)^2 (the APD paper's gradient attribution,
    without its sqrt and 1/d_out, which do not change the ranking).

    The gradients of all output dimensions o come from batched backward passes (`chunk` dimensions each, vmapped
    by autograd) instead of one backward pass per o. For rank-1 components the product with the gradient is
    taken at the inner activations, g . (h_c U_c) = h_c (g . U_c), so no (batch, C, d_out) tensor is built.
    """
    outs: dict[str, Tensor] = {}
    acts: dict[str, Tensor] = {}

    @no_type_check  # a closure made per call (why unchecked: tests/conftest.py)
    def record(name: str) -> Callable[..., Tensor]:
        orig = model._target_modules[name].forward
        comp = model.comp(name)

        def fn(inp: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            out = orig(inp, *args, **kwargs) if source == "target" else comp(inp)
            if not out.requires_grad:  # nothing upstream needs grad: a leaf cuts no path between recorded outputs
                out = out.detach().requires_grad_(True)
            if name in outs:
                raise ValueError(f"gradient attributions need each decomposed module called once; {name!r} repeats")
            outs[name], acts[name] = out, inp
            return out

        return fn

    with torch.enable_grad(), model._patched({n: record(n) for n in model.module_names}):
        y = output_tensor(model._call_target(x))
    names = list(outs)
    with torch.no_grad():
        inner = {n: model.comp(n).inner(acts[n]) for n in names}
        comp_out = {n: _component_outputs(model.comp(n), inner[n]) for n in names}
    d = y.shape[-1]
    if chunk == 0:
        cap = GRAD_CHUNK_ELEMENTS.get(y.device.type, GRAD_CHUNK_ELEMENTS["cuda"])
        chunk = max(1, min(d, cap // max(o.numel() for o in outs.values())))
    step = chunk
    total: Tensor | None = None
    for start in range(0, d, step):
        idx = torch.arange(start, min(start + step, d), device=y.device)
        if step == 1:  # the naive form: one backward pass per output dimension
            with torch.enable_grad():  # callers may hold no_grad (evaluation); the indexing must be recorded
                y_o = y[..., idx[0]].sum()
            grads = torch.autograd.grad(y_o, [outs[n] for n in names], retain_graph=True, allow_unused=True)
            grads = tuple(None if g is None else g[None] for g in grads)
        else:
            eye = torch.zeros(len(idx), *y.shape, dtype=y.dtype, device=y.device)
            eye[torch.arange(len(idx)), ..., idx] = 1.0
            grads = torch.autograd.grad(
                y, [outs[n] for n in names], grad_outputs=eye, retain_graph=True, is_grads_batched=True,
                allow_unused=True,
            )  # fmt: skip
        with torch.no_grad():
            per_o = sum(
                _contract(model.comp(n), g, inner[n], comp_out[n])
                for n, g in zip(names, grads, strict=True)
                if g is not None  # an output that does not reach y has no attribution
            )
            sq = per_o.pow(2).sum(0)  # type: ignore[union-attr]
            total = sq if total is None else total + sq
    assert total is not None
    return total


@torch.no_grad()
def activation_attributions(model: APDModel, clean: CleanPass) -> Float[Tensor, "... C"]:
    """A_c(x) = sum_l ||a_l @ P_{c,l}||^2, from each component's r x r Gram matrix (no component outputs built)."""
    total: Tensor | None = None
    for n in model.module_names:
        comp = model.comp(n)
        h = comp.inner(clean.acts[n]).unflatten(-1, (comp.C, comp.rank))  # (..., C, r)
        U = comp.U.unflatten(0, (comp.C, comp.rank))  # (C, r, d_out)
        gram = U @ U.transpose(1, 2)  # (C, r, r)
        a = torch.einsum("...cm,cmn,...cn->...c", h, gram, h)
        total = a if total is None else total + a
    assert total is not None
    return total


@torch.no_grad()
def ablation_attributions(
    model: APDModel, x: Any, clean: CleanPass, divergence: Callable[[Tensor, Tensor], Tensor]
) -> Float[Tensor, "... C"]:
    """A_c(x) = per-input divergence between the target output and the all-components output with c zeroed
    (one forward pass per component)."""
    lead = clean.output.shape[:-1]
    C = model.C
    cols = []
    for c in range(C):
        m = torch.ones(*lead, C, device=clean.output.device, dtype=clean.output.dtype)
        m[..., c] = 0.0
        out = model(x, {n: m for n in model.module_names})
        cols.append(divergence(out, clean.output))
    return torch.stack(cols, dim=-1)


def per_example_mse(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).pow(2).mean(-1)


def per_example_kl(pred_logits: Tensor, target_logits: Tensor) -> Tensor:
    logq = target_logits.log_softmax(-1)
    return (logq.exp() * (logq - pred_logits.log_softmax(-1))).sum(-1)


PER_EXAMPLE = {"mse": per_example_mse, "kl": per_example_kl}


class APDModel(ComponentModel):
    """ComponentModel whose 'causal importances' are APD's top-k indicators, the same for every matrix."""

    def __init__(
        self,
        target: nn.Module,
        modules: list[ModuleSpec],
        cfg: APDConfig,
        tied: list[tuple[str, str]] | None = None,
        output_loss: str = "mse",
    ) -> None:
        Cs = {s.C for s in modules}
        if len(Cs) != 1:
            raise ValueError(
                f"method apd: every decomposition.modules entry needs the same C (one component spans all "
                f"matrices); got {sorted(Cs)}"
            )
        rank = None if cfg.rank == "full" else cfg.rank
        super().__init__(target, modules, None, "leaky_hard", False, tied, rank)
        self.C = Cs.pop()
        self.apd = cfg
        self.output_loss = output_loss
        self.after_optimizer_step()  # start on the constraint set (unit-norm read directions) when there is one

    def attributions(self, x: Any, clean: CleanPass | None = None) -> Float[Tensor, "... C"]:
        """Attribution of every component on every input (positions for sequences), no gradients."""
        a = self.apd
        if a.attribution == "gradient":
            return gradient_attributions(self, x, a.attribution_source, a.grad_chunk)
        clean = self.clean_pass(x) if clean is None else clean
        if a.attribution == "activation":
            return activation_attributions(self, clean)
        return ablation_attributions(self, x, clean, PER_EXAMPLE[self.output_loss])

    def importances(self, x: Any, clean: CleanPass) -> CausalImportances:
        k = self.apd.topk_at(self.frac)
        s = topk_mask(self.attributions(x, clean), k, self.apd.topk_mode, self.apd.min_active)
        per_module = {n: s for n in self.module_names}
        return CausalImportances(lower=per_module, upper=per_module)

    @torch.no_grad()
    def probe_importances(self, x: Any) -> dict[str, Tensor]:
        """On probes (one feature active each) the active components are each probe's top max(1, int(topk))."""
        s = topk_mask(self.attributions(x), max(1, int(self.apd.topk_at(self.frac))), "per_example")
        return {n: s for n in self.module_names}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.apd.unit_norm_read:
            for comp in self.components.values():
                if isinstance(comp.V, nn.Parameter):  # tied (transposed) components share their source's
                    comp.V.div_(comp.V.norm(dim=0, keepdim=True).clamp_min(1e-12))
