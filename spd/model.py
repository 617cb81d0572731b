"""ComponentModel: a frozen target plus rank-1 subcomponents and CI functions for chosen weight matrices.

The target is never modified. During a masked forward, each decomposed module's `forward` is shadowed by an
instance attribute inside a context manager and restored in `finally`, so the target runs its own code
everywhere else. Given the clean pass, a masked pass takes whatever runs before its first replaced module from it
instead of recomputing it (`spd.reuse`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, no_type_check

import torch
from jaxtyping import Float
from pydantic import Field
from torch import Tensor, nn

from spd.base_config import BaseConfig
from spd.ci import CIConfig, _key, build_ci_function
from spd.components import SUPPORTED, Components, TransposedComponents, module_kind
from spd.names import hook_aliases, target_modules
from spd.reuse import Kept, keep, prefix_modules, shadowed, tensor_inputs_versions
from spd.sigmoids import SIGMOIDS, SigmoidType


class ModuleSpec(BaseConfig):
    """Decompose every module whose name matches the glob `pattern` into C rank-1 subcomponents."""

    pattern: str = Field(min_length=1)
    C: int = Field(gt=0)


@dataclass
class CleanPass:
    """One clean target pass, kept so masked passes can skip work whose input is unchanged.

    acts: input of every decomposed module (its last call);
    inner: acts @ V per module (set by the training step, with gradients, so masked passes reuse it);
    kept: the output of each decomposed module called exactly once (by name), and prefix: of each prefix module
    (by raw module name), where reusable (`spd.reuse`), for masked passes to take instead of recomputing.
    """

    output: Tensor
    acts: dict[str, Tensor]
    inner: dict[str, Tensor] | None = None
    kept: dict[str, Kept] = field(default_factory=dict)
    prefix: dict[str, Kept] = field(default_factory=dict)

    def out(self, name: str) -> Tensor | None:
        """The clean output of decomposed module `name`, if it was called once and is unchanged since."""
        kept = self.kept.get(name)
        return kept.out if kept is not None and kept.valid() else None


@dataclass(frozen=True)
class CausalImportances:
    lower: dict[str, Tensor]  # masks, L0, evaluation
    upper: dict[str, Tensor]  # importance-minimality penalty


def match_modules(target: nn.Module, specs: list[ModuleSpec]) -> dict[str, int]:
    """Resolve glob patterns to {module name: C}; clear errors for bad patterns.

    Patterns match clean module names (`spd.names`: bridge wrappers left out) or, for TransformerLens targets, the
    hook-name prefixes (`blocks.*.mlp.in` for `blocks.*.mlp.fc_in`); the result is keyed by clean names. A glob
    (`*`, `?`, `[`) takes the decomposable modules among its matches (`mlp.*` skips the activation function); a
    name without one must name a decomposable module.
    """
    modules = target_modules(target)
    names = list(modules)
    aliases = hook_aliases(target)
    out: dict[str, int] = {}
    for spec in specs:
        hits = [n for n in names if fnmatch.fnmatchcase(n, spec.pattern)]
        hits += [c for a, c in aliases.items() if fnmatch.fnmatchcase(a, spec.pattern) and c not in hits]
        if not hits:
            ok = [n for n in names if module_kind(modules[n]) is not None]
            sample = ", ".join(ok[:12]) + (" ..." if len(ok) > 12 else "")
            raise ValueError(
                f"module pattern {spec.pattern!r} matches no module of the target; its decomposable modules are: "
                f"{sample}"
            )
        if any(ch in spec.pattern for ch in "*?[") and any(module_kind(modules[n]) is not None for n in hits):
            hits = [n for n in hits if module_kind(modules[n]) is not None]  # a glob takes the weights it meets
        for n in hits:
            if module_kind(modules[n]) is None:
                raise ValueError(
                    f"module pattern {spec.pattern!r} matches {n!r}, a {type(modules[n]).__name__}, which cannot "
                    f"be decomposed (supported: {SUPPORTED}); narrow the pattern"
                )
            if n in out:
                raise ValueError(f"module {n!r} is matched by more than one pattern (second: {spec.pattern!r})")
            out[n] = spec.C
    return out


def output_tensor(out: Any) -> Tensor:
    """The tensor a model's output divergence is measured on (HF outputs: .logits; tuples: first item)."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, tuple | list):
        return out[0]
    raise TypeError(f"cannot find an output tensor in a {type(out).__name__}")


# keys of an input dict that describe how to score the output, not what the model reads (e.g. which positions of
# an LM batch count in its loss); they are dropped before the target is called
SCORING_KEYS = frozenset({"loss_mask"})


def call_target(target: nn.Module, x: Any) -> Any:
    """Run a target on a batch: a tensor positionally, a dict (tokenizer output) as keyword arguments."""
    if isinstance(x, dict):
        return target(**{k: v for k, v in x.items() if k not in SCORING_KEYS})
    return target(x)


def target_output(target: nn.Module, x: Any) -> Tensor:
    """The output tensor of a target on a batch (HF outputs: .logits; tokenizer dicts as keyword arguments)."""
    return output_tensor(call_target(target, x))


class ComponentModel(nn.Module):
    frac: float = 1.0  # fraction of training done, set by the trainer each step (1.0 outside training)

    def __init__(
        self,
        target: nn.Module,
        modules: list[ModuleSpec],
        ci_fn: CIConfig | None,
        sigmoid: SigmoidType = "leaky_hard",
        delta_component: bool = True,
        tied: list[tuple[str, str]] | None = None,
        rank: int | None = 1,
    ) -> None:
        """`ci_fn` None builds no CI function (a subclass then defines `importances`); `rank` is the rank of
        every (sub)component (1 for SPD; None: full rank, min(d_in, d_out) per module)."""
        super().__init__()
        target.requires_grad_(False)
        target.eval()
        self.target = target
        self.Cs = match_modules(target, modules)
        self.module_names = list(self.Cs)
        named = target_modules(target)
        self._target_modules = {n: named[n] for n in self.module_names}
        self.tied = {b: a for a, b in (tied or [])}
        comps: dict[str, Components] = {}
        for n, C in self.Cs.items():
            if n not in self.tied:
                comps[n] = Components(named[n], C, rank)
        for b, a in self.tied.items():
            for name in (a, b):
                if name not in self.Cs:
                    raise ValueError(f"decomposition.tied names {name!r}, which is not a decomposed module")
            if a in self.tied or a == b:
                raise ValueError(f"decomposition.tied: {a!r} is tied to another module; ties must not chain")
            if self.Cs[a] != self.Cs[b]:
                raise ValueError(f"decomposition.tied: {a!r} and {b!r} must have the same C")
            comps[b] = TransposedComponents(named[b], comps[a])
        self.components = nn.ModuleDict({_key(n): comps[n] for n in self.Cs})
        specs = {n: (self.Cs[n], self.comp(n).d_in, self.comp(n).kind) for n in self.module_names}
        self.ci_fn = build_ci_function(specs, ci_fn) if ci_fn is not None else None
        self.lower_sigmoid, self.upper_sigmoid = SIGMOIDS[sigmoid]
        self.delta_component = delta_component
        # Masked passes given the clean pass take the outputs of modules that run before the first replaced one
        # from it (`spd.reuse`); False recomputes everything (same results; for tests and benchmarks).
        self.reuse_clean = True
        self._prefix_modules = prefix_modules(target, list(self._target_modules.values()))

    # ---- access -------------------------------------------------------------------------------------
    def comp(self, name: str) -> Components:
        return self.components[_key(name)]  # type: ignore[return-value]

    def decomposition_parameters(self) -> Iterator[nn.Parameter]:
        for c in self.components.values():
            yield from c.parameters()

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Components and CI function only (the target is stored separately)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("target.")}

    def subcomponent_weight(self, name: str, c: int) -> Float[Tensor, "d_out d_in"]:
        """Subcomponent c of module `name` as a (d_out, d_in) matrix (nn.Linear orientation)."""
        return self.comp(name).subcomponent(c).T

    # ---- patching -----------------------------------------------------------------------------------
    @contextmanager
    def _patched(
        self, fns: dict[str, Callable[..., Any]], modules: dict[str, nn.Module] | None = None
    ) -> Iterator[None]:
        """Shadow the forward of `modules[name]` (default: the decomposed modules) by `fns[name]`."""
        with shadowed(self._target_modules if modules is None else modules, fns):
            yield

    def _call_target(self, x: Any) -> Any:
        return call_target(self.target, x)

    # ---- forward passes -----------------------------------------------------------------------------
    def forward_with_cache(self, x: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Clean target pass; returns the output tensor and the input of every decomposed module."""
        clean = self.clean_pass(x)
        return clean.output, clean.acts

    def clean_pass(self, x: Any) -> CleanPass:
        """Clean target pass recording each decomposed module's input and (if called once) output, and the
        reusable outputs of the prefix modules (`spd.reuse`)."""
        acts: dict[str, Tensor] = {}
        kept: dict[str, Kept | None] = {}
        calls: dict[str, int] = {}

        @no_type_check  # a closure made per call (why unchecked: tests/conftest.py)
        def record(name: str, modules: dict[str, nn.Module], decomposed: bool) -> Callable[..., Any]:
            orig = modules[name].forward

            def fn(*args: Any, **kwargs: Any) -> Any:
                before = tensor_inputs_versions(args)
                out = orig(*args, **kwargs)
                calls[name] = calls.get(name, 0) + 1
                kept[name] = keep(out, args, before)
                if decomposed:
                    acts[name] = args[0]
                return out

            return fn

        prefix = self._prefix_modules
        with (
            self._patched({n: record(n, self._target_modules, True) for n in self.module_names}),
            self._patched({n: record(n, prefix, False) for n in prefix}, prefix),
        ):
            output = output_tensor(self._call_target(x))
        once = {n for n, k in calls.items() if k == 1}
        return CleanPass(
            output,
            acts,
            kept={n: k for n in self.module_names if n in once and (k := kept[n]) is not None and k.valid()},
            prefix={n: k for n in prefix if n in once and (k := kept[n]) is not None and k.valid()},
        )

    def forward(
        self,
        x: Any,
        masks: dict[str, Tensor] | None = None,
        delta_masks: dict[str, Tensor] | None = None,
        routes: dict[str, Tensor] | None = None,
        cache: dict[str, Tensor] | None = None,
        clean: CleanPass | None = None,
    ) -> Tensor:
        """Run the target with the modules in `masks` replaced by their masked subcomponents.

        masks: module -> (..., C) mask on the inner activations; modules absent from `masks` keep the
            target's weights (so `{one module: mask}` is a layerwise pass, `None` the plain target).
        delta_masks: module -> (...) scale of the delta component (absent: no delta term).
        routes: module -> (...) bool; where False the position keeps the target's output for that module.
        cache: if given, filled with the input of every decomposed module during this pass.
        clean: the clean pass on the same x. Until the first replaced module has run, the computation equals
            the clean pass, so that module's inner activations and target output are taken from `clean`
            (in a layerwise pass that is the one replaced module; in an all-module pass, the first one).
        """
        masks = masks or {}
        delta_masks = delta_masks or {}
        routes = routes or {}
        state = {"replaced_ran": False}
        reuse = clean is not None and self.reuse_clean

        @no_type_check  # a closure made per call (why unchecked: tests/conftest.py)
        def wrapped(name: str) -> Callable[..., Tensor]:
            orig = self._target_modules[name].forward
            comp = self.comp(name)
            mask = masks.get(name)

            def fn(inp: Tensor, *args: Any, **kwargs: Any) -> Tensor:
                if cache is not None:
                    cache[name] = inp
                if mask is None:
                    out = clean.out(name) if reuse and not state["replaced_ran"] else None  # type: ignore[union-attr]
                    return orig(inp, *args, **kwargs) if out is None else out
                inner = clean_out = None
                if clean is not None and not state["replaced_ran"] and (clean_out := clean.out(name)) is not None:
                    inner = None if clean.inner is None else clean.inner.get(name)
                state["replaced_ran"] = True
                out = comp(inp, mask, delta_masks.get(name), inner, clean_out)
                route = routes.get(name)
                if route is not None:
                    out = torch.where(route[..., None], out, orig(inp) if clean_out is None else clean_out)
                return out

            return fn

        @no_type_check
        def from_clean(name: str) -> Callable[..., Any]:
            orig = self._prefix_modules[name].forward
            kept = clean.prefix[name]  # type: ignore[union-attr]

            def fn(*args: Any, **kwargs: Any) -> Any:
                return kept.out if not state["replaced_ran"] and kept.valid() else orig(*args, **kwargs)

            return fn

        names = self.module_names if cache is not None or reuse else list(masks)
        prefix = {n: from_clean(n) for n in clean.prefix} if reuse else {}  # type: ignore[union-attr]
        with self._patched({n: wrapped(n) for n in names}), self._patched(prefix, self._prefix_modules):
            return output_tensor(self._call_target(x))

    # ---- causal importances -------------------------------------------------------------------------
    def inner_acts(self, acts: dict[str, Tensor]) -> dict[str, Tensor]:
        """acts @ V per decomposed module (what the per-subcomponent CI functions read)."""
        return {n: self.comp(n).inner(acts[n]) for n in self.module_names}

    def ci_from_acts(self, acts: dict[str, Tensor], inner: dict[str, Tensor] | None = None) -> CausalImportances:
        if self.ci_fn is None:
            raise TypeError(f"{type(self).__name__} has no CI function; use importances(x, clean)")
        inner = self.inner_acts(acts) if inner is None else inner
        z = self.ci_fn(acts, inner)
        return CausalImportances(
            lower={n: self.lower_sigmoid(v) for n, v in z.items()},
            upper={n: self.upper_sigmoid(v) for n, v in z.items()},
        )

    def importances(self, x: Any, clean: CleanPass) -> CausalImportances:
        """What decides, per input, which subcomponents count: here the CI function on the clean pass's
        activations (differentiable). APD overrides this with attribution top-k indicators."""
        return self.ci_from_acts(clean.acts, clean.inner)

    @torch.no_grad()
    def causal_importances(self, x: Any) -> CausalImportances:
        """CIs for a batch (no gradients): lower (for masks) and upper (for the penalty), per module."""
        return self.importances(x, self.clean_pass(x))

    def probe_importances(self, x: Any) -> dict[str, Tensor]:
        """Importances on ground-truth probe inputs (one mechanism active each): the lower CIs here; APD uses a
        per-example top-k there, since a batch top-k over a probe batch has no meaning."""
        return self.causal_importances(x).lower

    def after_optimizer_step(self) -> None:
        """Hook run by the trainer after every optimizer step (APD: optional unit-norm projection)."""

    # ---- helpers for notebooks --------------------------------------------------------------------------
    @torch.no_grad()
    def run_with_cache(
        self, x: Any, masks: dict[str, Tensor] | None = None, delta_masks: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Output and a cache keyed like TransformerLens's `run_with_cache`: for each decomposed module, under its
        hook-name prefix (`blocks.0.mlp.in` for a bridge's `blocks.0.mlp.fc_in`; the module name otherwise),

        - `<prefix>.hook_in`: the module's input (..., d_in) in this pass;
        - `<prefix>.hook_subcomponent_acts`: input @ V, each subcomponent's inner activation (..., C);
        - `<prefix>.hook_ci`: causal importances (lower, ..., C), always from the clean pass (where they are
          defined), and `<prefix>.hook_ci_upper` (the ones the minimality penalty reads).

        With `masks` the pass is the masked one (as `forward`); without, the target's own."""
        clean = self.clean_pass(x)
        ci = self.importances(x, clean)
        acts = clean.acts
        out = clean.output
        if masks is not None:
            acts = {}
            out = self(x, masks, delta_masks, cache=acts)
        inner = self.inner_acts(acts)
        prefix = {clean_name: hook for hook, clean_name in hook_aliases(self.target).items()}
        cache: dict[str, Tensor] = {}
        for n in self.module_names:
            p = prefix.get(n, n)
            cache[f"{p}.hook_in"] = acts[n]
            cache[f"{p}.hook_subcomponent_acts"] = inner[n]
            cache[f"{p}.hook_ci"] = ci.lower[n]
            cache[f"{p}.hook_ci_upper"] = ci.upper[n]
        return out, cache

    def alive_subcomponents(self, x: Any, threshold: float = 0.1) -> dict[str, Tensor]:
        """Indices of subcomponents whose lower CI exceeds `threshold` on at least one input of the batch."""
        ci = self.causal_importances(x).lower
        return {n: (v.flatten(0, -2) > threshold).any(0).nonzero().flatten() for n, v in ci.items()}
