"""Natural degradation: Langevin (SGLD) samples of the target's weights, tempered to a requested loss.

The sampler draws from the local tempered posterior p(w) ∝ exp(-nβ L(w) - γ/2 |w - w0|²) around the trained
weights w0, with devinterp's SGLD update (`devinterp.optim.SGMCMC.sgld`, Lau et al. 2023):

    Δw = -(ε/2) (nβ ∇L(w) + γ (w - w0)) + N(0, ε σ²)

We set ε = 2η / nβ, so the drift is a plain gradient step of size η at every temperature (stable for any nβ
once η is below 2 / the top Hessian eigenvalue) and the noise is N(0, 2η/nβ) (the standard discretisation of
Langevin dynamics at temperature 1/nβ). η defaults to `step` / h_max, with h_max the loss's top Hessian
eigenvalue at w0 (power iteration). The inverse temperature nβ is searched (secant in log nβ vs log loss gap,
kept inside a bracket) until the mean loss of the chain's draws matches the requested loss; every chain of one
sampler shares its minibatches and noise (common random numbers), so the loss is a smooth function of nβ.
The local learning coefficient is estimated as λ̂ = nβ (E_draws[L] - L(w0)) with the losses measured on a fixed
evaluation set. Cheap to sample, the naturally degraded model keeps general behaviour and loses what the
local posterior does not pin down: the reference a decomposition's degradation is compared with.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from spd.base_config import BaseConfig
from spd.model import target_output
from spd.task import BatchSampler, batch_len, held_out, to_device

LossFn = Callable[[nn.Module, Any], Tensor]  # (model, input batch) -> scalar mean loss


class NaturalConfig(BaseConfig):
    """Settings of the SGLD sampler and of the temperature search (stated with every result)."""

    step: float = Field(0.2, gt=0, description="gradient step eta as a fraction of 1 / (top Hessian eigenvalue)")
    lr: float | None = Field(None, gt=0, description="explicit gradient step eta (overrides `step`)")
    localization: float = Field(100.0, ge=0, description="gamma: pull towards the trained weights")
    noise_level: float = Field(1.0, ge=0, description="sigma; 1 samples the tempered posterior (0: gradient descent)")
    n_steps: int = Field(400, ge=1, description="SGLD steps per chain")
    burnin: int = Field(200, ge=0, description="steps before the first draw")
    draw_every: int = Field(20, ge=1, description="steps between draws after the burn-in")
    batch_size: int = Field(1024, ge=1, description="minibatch of the SGLD gradient")
    n_eval: int = Field(8192, ge=1, description="inputs in the fixed evaluation set the draws are measured on")
    eval_batch_size: int = Field(4096, ge=1)
    rtol: float = Field(0.03, gt=0, lt=1, description="search tolerance on the loss gap, as a fraction of it")
    max_chains: int = Field(14, ge=1, description="chains the search may run before giving up")
    hessian_iters: int = Field(20, ge=1, description="power iterations for the top Hessian eigenvalue")
    seed: int = 0
    params: list[str] | None = Field(
        None, description="globs of parameter names to sample (default: the task's trained parameters, else all)"
    )


@dataclass
class Chain:
    """One SGLD chain at inverse temperature `nbeta`."""

    nbeta: float
    draw_losses: list[float]  # eval-set loss of each draw
    mean_loss: float
    gap: float  # mean_loss - loss of the trained weights
    llc: float
    best: dict[str, Tensor] | None = None  # sampled parameters of the draw closest to the aimed loss
    best_loss: float = math.nan


@dataclass
class Degradation:
    """The result of a search: the temperature, the chain, and the naturally degraded weights."""

    requested_loss: float
    target_loss: float
    chain: Chain
    state: dict[str, Tensor]  # the target's full state dict with the sampled parameters
    achieved_loss: float  # the returned draw's loss on the evaluation set
    converged: bool
    trace: list[dict[str, float]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "requested_loss": self.requested_loss,
            "target_loss": self.target_loss,
            "nbeta": self.chain.nbeta,
            "temperature": 1 / self.chain.nbeta,
            "mean_loss": self.chain.mean_loss,
            "llc": self.chain.llc,
            "achieved_loss": self.achieved_loss,
            "loss_error_rel": (self.achieved_loss - self.requested_loss) / self.requested_loss,
            "gap_error_rel": (self.achieved_loss - self.requested_loss) / (self.requested_loss - self.target_loss),
            "converged": self.converged,
            "chains": len(self.trace),
            "search": self.trace,
            "settings": self.settings,
        }


class SGLDDivergedError(RuntimeError):
    pass


def select_params(model: nn.Module, globs: list[str] | None) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())
    if globs is None:
        return named
    chosen = {n: p for n, p in named.items() if any(fnmatch.fnmatchcase(n, g) for g in globs)}
    if not chosen:
        raise ValueError(f"natural.params {globs} match no parameter of the target; its parameters: {list(named)}")
    return chosen


def top_hessian_eigenvalue(loss: Callable[[], Tensor], params: list[Tensor], iters: int, seed: int = 0) -> float:
    """Largest eigenvalue of the Hessian of `loss` w.r.t. `params` (power iteration on Hessian-vector products)."""
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g).to(p) for p in params]
    grads = torch.autograd.grad(loss(), params, create_graph=True)
    eig = 0.0
    for _ in range(iters):
        norm = torch.sqrt(sum((u * u).sum() for u in v))
        v = [u / norm for u in v]
        hv = torch.autograd.grad(grads, params, v, retain_graph=True)
        eig = sum((a * b).sum() for a, b in zip(hv, v, strict=True)).item()
        v = [h.detach() for h in hv]
    return abs(eig)


class NaturalDegradation:
    """SGLD around a trained target, with a temperature search for a requested loss.

    `loss_fn(model, x)` is the target's own loss (a scalar mean), `sample_batch(n, generator)` draws inputs."""

    def __init__(
        self,
        target: nn.Module,
        loss_fn: LossFn,
        sample_batch: BatchSampler,
        cfg: NaturalConfig | None = None,
        trained_params: list[str] | None = None,
    ) -> None:
        self.cfg = cfg = cfg or NaturalConfig()
        if cfg.burnin >= cfg.n_steps:
            raise ValueError(f"natural.burnin ({cfg.burnin}) must be below natural.n_steps ({cfg.n_steps})")
        self.target = target
        self.loss_fn = loss_fn
        self.sample_batch = sample_batch
        self.device = next(target.parameters()).device
        self.param_names = list(select_params(target, cfg.params if cfg.params is not None else trained_params))
        batches = held_out(sample_batch, cfg.n_eval, cfg.eval_batch_size, cfg.seed + 7919)
        self.eval_x = [to_device(x, self.device) for x in batches]
        self.target_loss = self.eval_loss(target)
        self.eta = cfg.lr if cfg.lr is not None else cfg.step / self._h_max()
        self.chains: list[Chain] = []

    # ---- measurement --------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_loss(self, model: nn.Module) -> float:
        total = sum(self.loss_fn(model, x).item() * batch_len(x) for x in self.eval_x)
        return total / sum(batch_len(x) for x in self.eval_x)

    def _h_max(self) -> float:
        model = copy.deepcopy(self.target)
        params = [p.requires_grad_(True) for n, p in model.named_parameters() if n in self.param_names]
        x = to_device(self.sample_batch(self.cfg.batch_size, torch.Generator().manual_seed(self.cfg.seed + 1)),
                      self.device)  # fmt: skip
        h = top_hessian_eigenvalue(lambda: self.loss_fn(model, x), params, self.cfg.hessian_iters, self.cfg.seed)
        if not h > 0:
            raise ValueError("the target's loss has a zero Hessian at its weights; set natural.lr explicitly")
        return h

    @property
    def settings(self) -> dict[str, Any]:
        return self.cfg.model_dump() | {"eta": self.eta, "sampled_params": self.param_names,
                                        "sampler": "devinterp.optim.SGMCMC.sgld, lr = 2 eta / nbeta"}  # fmt: skip

    # ---- one chain ----------------------------------------------------------------------------------
    def chain(self, nbeta: float, aim: float | None = None) -> Chain:
        """Run one chain at `nbeta`; keep the parameters of the draw whose loss is closest to `aim`."""
        from devinterp.optim import SGMCMC

        c = self.cfg
        model = copy.deepcopy(self.target)
        model.train(self.target.training)
        params = [p.requires_grad_(True) for n, p in model.named_parameters() if n in self.param_names]
        for n, p in model.named_parameters():
            if n not in self.param_names:
                p.requires_grad_(False)
        with warnings.catch_warnings():  # devinterp warns when noise_level != 1 or nbeta == 1: both are deliberate
            warnings.simplefilter("ignore")
            opt = SGMCMC.sgld(params, lr=2 * self.eta / nbeta, nbeta=nbeta, localization=c.localization,
                              noise_level=c.noise_level)  # fmt: skip
        data_g = torch.Generator().manual_seed(c.seed + 1)
        noise_g = torch.Generator(device=self.device).manual_seed(c.seed + 2)
        draws: list[float] = []
        best, best_loss = None, math.nan
        for t in range(1, c.n_steps + 1):
            x = to_device(self.sample_batch(c.batch_size, data_g), self.device)
            loss = self.loss_fn(model, x)
            if not torch.isfinite(loss):
                raise SGLDDivergedError(
                    f"SGLD diverged at step {t} (nbeta {nbeta:.4g}, eta {self.eta:.3g}): loss {loss.item()}; "
                    "lower natural.step (or natural.lr), or request a smaller loss"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(noise_generator=noise_g)
            if t > c.burnin and (t - c.burnin) % c.draw_every == 0:
                draws.append(self.eval_loss(model))
                if aim is not None and (best is None or abs(draws[-1] - aim) < abs(best_loss - aim)):
                    best, best_loss = {n: p.detach().clone() for n, p in model.named_parameters()}, draws[-1]
        if not draws:  # fewer steps after the burn-in than draw_every: the last step is the draw
            draws.append(self.eval_loss(model))
        if best is None:
            best, best_loss = {n: p.detach().clone() for n, p in model.named_parameters()}, draws[-1]
        mean = sum(draws) / len(draws)
        out = Chain(nbeta, draws, mean, mean - self.target_loss, nbeta * (mean - self.target_loss), best, best_loss)
        self.chains.append(out)
        return out

    # ---- the temperature search ---------------------------------------------------------------------
    def _first_guess(self, gap: float) -> float:
        ok = [ch for ch in self.chains if ch.gap > 0]
        if ok:  # interpolate log nbeta in log gap between known chains (LLC ~ constant: gap ~ 1/nbeta)
            near = min(ok, key=lambda ch: abs(math.log(ch.gap / gap)))
            return near.nbeta * near.gap / gap
        n_params = sum(p.numel() for n, p in self.target.named_parameters() if n in self.param_names)
        return max(n_params / 2, 1.0) / gap  # the LLC of a regular model is d/2; singular models have less

    def search(self, loss: float, rtol: float | None = None, max_chains: int | None = None) -> Degradation:
        """Find nbeta whose chain has mean eval loss within rtol x gap of `loss`; return its closest draw."""
        rtol = self.cfg.rtol if rtol is None else rtol
        max_chains = self.cfg.max_chains if max_chains is None else max_chains
        gap = loss - self.target_loss
        if not gap > 0:
            raise ValueError(
                f"requested loss {loss:.6g} is not above the target's own loss {self.target_loss:.6g} (on the "
                "evaluation set): a natural degradation needs a higher loss"
            )
        lo: Chain | None = None  # colder than needed (gap too small): larger nbeta
        hi: Chain | None = None  # hotter than needed (gap too large)
        trace: list[dict[str, float]] = []
        nbeta = self._first_guess(gap)
        done: Chain | None = None
        prev: Chain | None = None
        for _ in range(max_chains):
            try:
                ch = self.chain(nbeta, aim=loss)
            except SGLDDivergedError:
                if lo is None:
                    raise
                trace.append({"nbeta": nbeta, "mean_loss": math.inf, "gap_ratio": math.inf})
                hi = Chain(nbeta, [], math.inf, math.inf, math.inf)
                nbeta = math.sqrt(lo.nbeta * nbeta)
                continue
            trace.append({"nbeta": ch.nbeta, "mean_loss": ch.mean_loss, "gap_ratio": ch.gap / gap})
            if abs(ch.gap - gap) <= rtol * gap:
                done = ch
                break
            if ch.gap < gap:
                lo = ch if lo is None or ch.nbeta < lo.nbeta else lo
            else:
                hi = ch if hi is None or ch.nbeta > hi.nbeta else hi
            nbeta = self._next(ch, prev, gap, lo, hi)
            prev = ch
        converged = done is not None
        if done is None:  # the chain whose mean came closest
            cands = [c for c in self.chains if c.best is not None and math.isfinite(c.mean_loss)]
            done = min(cands[-max_chains:], key=lambda c: abs(c.gap - gap))
        state = {k: v.detach().clone() for k, v in self.target.state_dict().items()}
        assert done.best is not None
        state.update({n: v for n, v in done.best.items() if n in state})
        return Degradation(loss, self.target_loss, done, state, done.best_loss, converged, trace, self.settings)

    @staticmethod
    def _next(ch: Chain, prev: Chain | None, gap: float, lo: Chain | None, hi: Chain | None) -> float:
        # gap ~ lambda / nbeta: one step of slope -1 in log-log, or the secant of the last two chains
        slope = -1.0
        if prev is not None and ch.gap > 0 and prev.gap > 0 and ch.nbeta != prev.nbeta:
            s = (math.log(ch.gap) - math.log(prev.gap)) / (math.log(ch.nbeta) - math.log(prev.nbeta))
            if -5.0 < s < -0.1:
                slope = s
        if ch.gap > 0:
            step = (math.log(gap) - math.log(ch.gap)) / slope
            nbeta = ch.nbeta * math.exp(max(-math.log(100), min(math.log(100), step)))
        else:
            nbeta = ch.nbeta / 100
        if lo is not None and hi is not None and not (hi.nbeta < nbeta < lo.nbeta):
            nbeta = math.sqrt(lo.nbeta * hi.nbeta)  # keep inside the bracket
        return nbeta

    def at_losses(self, losses: dict[str, float], rtol: float = 0.1, max_chains: int = 6) -> dict[str, dict[str, Any]]:
        """nbeta and LLC of the natural degradation at each loss (a looser search, sharing the chains)."""
        out: dict[str, dict[str, Any]] = {}
        for name, loss in sorted(losses.items(), key=lambda kv: kv[1]):
            if not loss > self.target_loss:
                out[name] = {"note": "not above the target's loss: no natural degradation to compare"}
                continue
            try:
                d = self.search(loss, rtol, max_chains)
            except SGLDDivergedError as err:
                out[name] = {"note": f"not found: {err}"}
                continue
            out[name] = {"nbeta": d.chain.nbeta, "llc": d.chain.llc, "natural_mean_loss": d.chain.mean_loss,
                         "converged": d.converged}  # fmt: skip
        return out


def task_loss_fn(metrics: Callable[[Any, Tensor], dict[str, Tensor]]) -> LossFn:
    """The loss a task's metrics define, as a scalar mean over the batch."""

    def loss(model: nn.Module, x: Any) -> Tensor:
        return metrics(x, target_output(model, x))["loss"].mean()

    return loss


def degrade(
    task: Any,
    cfg: NaturalConfig,
    loss: float | None = None,
    compute_fraction: float | None = None,
    curve: Any = None,
) -> tuple[Degradation, dict[str, Any]]:
    """A naturally degraded copy of `task.target` at a requested loss, given directly or as the loss the
    family's loss -> compute curve (`curve`, else `task.compute_curve()`) reaches with `compute_fraction` of the
    target's (frontier) compute. The curve's gap is added to the sampler's own held-out target loss."""
    if (loss is None) == (compute_fraction is None):
        raise ValueError("give exactly one of --loss or --compute-fraction")
    if task.metrics is None:
        raise ValueError("the target's task defines no loss of its own (Task.metrics): nothing to degrade to")
    nd = NaturalDegradation(task.target, task_loss_fn(task.metrics), task.eval_sampler, cfg, task.trained_parameters)
    request: dict[str, Any] = {"target_loss": nd.target_loss}
    if compute_fraction is not None:
        if not 0 < compute_fraction < 1:
            raise ValueError(f"--compute-fraction must be in (0, 1) (got {compute_fraction})")
        curve = curve if curve is not None else task.compute_curve() if task.compute_curve is not None else None
        if curve is None:
            raise ValueError(
                "this target has no loss -> compute curve: give target.compute_curve: FILE in its config, or --loss"
            )
        curve_loss = curve.loss_at(compute_fraction * curve.target_frontier_compute)
        loss = nd.target_loss + (curve_loss - curve.target_loss)
        request |= {"compute_fraction": compute_fraction, "curve_loss": curve_loss,
                    "curve_target_loss": curve.target_loss, "curve": curve.description}  # fmt: skip
    assert loss is not None
    request["loss"] = loss
    return nd.search(loss), request
