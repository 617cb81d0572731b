"""Whole units of a target's weight matrices, for the unit-ablation baseline of an unlearning study: neurons and
attention heads, how to zero them, and how much the output changes when each one alone is zeroed.

A unit is a block of one matrix:
- neuron: output unit j of any decomposed matrix, its row of W (a column for HF Conv1D) and its bias entry; for an
  MLP's input matrix these are its hidden neurons;
- input: input unit j of a matrix outside attention, the column of W that reads it (`target_units(...,
  inputs=True)`); for an MLP's output matrix (`down_proj`, `fc2`, `mlp_out`) these are its hidden neurons, which
  is what "ablating a neuron" means when only that matrix is decomposed (its output units are residual-stream
  dimensions);
- head: attention head h of an attention output projection (`o_proj`, `out_proj`, TransformerLens `attn.o`, GPT-2
  `attn.c_proj`, ...), the d_head input columns of W that read head h's output; the bias stays;
- kv_head: key/value head h of a value projection (`v_proj`, `attn.v`), its d_head output rows and bias entries;
  with grouped-query attention it feeds several query heads. Used only where the same attention's output
  projection is not among the modules (then `head` units cover it).

Attention modules are recognised by their parent: an attention module (see `head_counts`) that says how many heads
it has (`num_heads`, `n_heads`, or a `config` / `cfg` with `num_attention_heads` / `n_heads`, as transformers and
TransformerLens attention modules do). Query, key and fused qkv projections get no units: zeroing a query or key
makes attention uniform, it does not remove a head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from spd.ablate import chunks
from spd.components import module_kind
from spd.lm_metrics import scored_positions
from spd.names import target_modules
from spd.replay import FixedPrefix, run_target

UnitKind = Literal["neuron", "input", "head", "kv_head"]
OUT_PROJ = {"o_proj", "out_proj", "o", "c_proj", "dense", "W_O"}
VALUE_PROJ = {"v_proj", "v", "value", "W_V"}


@dataclass(frozen=True)
class Unit:
    module: str
    index: int
    kind: UnitKind = "neuron"
    width: int = 1  # rows (neuron, kv_head) or input columns (input, head) of the matrix it covers

    @property
    def span(self) -> slice:
        return slice(self.index * self.width, (self.index + 1) * self.width)

    @property
    def label(self) -> str:
        kind = {"neuron": "", "input": "in"}.get(self.kind, self.kind)
        return f"{self.module}#{kind}{self.index}"

    @property
    def reads(self) -> bool:
        """Whether it is a block of input columns (zeroed in the module's input) rather than of output rows."""
        return self.kind in ("input", "head")


def _first(obj: Any, names: tuple[str, ...]) -> int | None:
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def head_counts(attn: nn.Module) -> tuple[int, int] | None:
    """(query heads, key/value heads) of an attention module, or None for a module that is not one. A module is
    taken as attention when it carries a head attribute itself (`num_heads`, `n_heads`, `head_dim`, `d_head`) or
    its class is named "...Attention..."; a model config held by any module (an HF MLP has one too) is read only
    then."""
    marked = "attention" in type(attn).__name__.lower() or any(
        hasattr(attn, a) for a in ("num_heads", "n_heads", "head_dim", "d_head")
    )
    if not marked:
        return None
    for src in (attn, getattr(attn, "config", None), getattr(attn, "cfg", None)):
        if src is None:
            continue
        n = _first(src, ("num_heads", "n_heads", "num_attention_heads"))
        if n is not None:
            return n, _first(src, ("num_key_value_heads", "n_kv_heads", "n_key_value_heads")) or n
    return None


def attention_role(named: dict[str, nn.Module], name: str) -> tuple[str, int] | None:
    """For a projection inside an attention module: ("out", query heads), ("value", kv heads), or ("other", 0) for
    query, key and fused projections; None for a matrix outside attention."""
    parent, _, leaf = name.rpartition(".")
    counts = head_counts(named[parent]) if parent in named else None
    if counts is None:
        return None
    if leaf in OUT_PROJ:
        return "out", counts[0]
    if leaf in VALUE_PROJ:
        return "value", counts[1]
    return "other", 0


def _has_out_proj(named: dict[str, nn.Module], value: str, modules: list[str]) -> bool:
    parent = value.rpartition(".")[0]
    return any(o.rpartition(".")[0] == parent and (attention_role(named, o) or ("",))[0] == "out" for o in modules)


def _io_dims(mod: nn.Module) -> tuple[int, int]:
    w = mod.weight
    return (w.shape[1], w.shape[0]) if module_kind(mod) == "linear" else (w.shape[0], w.shape[1])


def target_units(target: nn.Module, modules: list[str], inputs: bool = False) -> list[Unit]:
    """The units of `modules`: heads for attention output projections, kv heads for value projections whose
    output projection is not listed, neurons (output units; with `inputs`, input units) for every other linear or
    Conv1D matrix."""
    named = target_modules(target)
    units: list[Unit] = []
    for m in modules:
        mod = named[m]
        if module_kind(mod) not in ("linear", "conv1d"):
            continue
        d_in, d_out = _io_dims(mod)
        role = attention_role(named, m)
        if role is not None and role[0] == "value" and _has_out_proj(named, m, modules):
            continue  # the output projection's head units remove these heads already
        if role is None:
            units += [Unit(m, j, "input") for j in range(d_in)] if inputs else [Unit(m, j) for j in range(d_out)]
        elif role[0] == "other":
            continue
        elif role[0] == "out" and d_in % role[1] == 0:
            units += [Unit(m, h, "head", d_in // role[1]) for h in range(role[1])]
        elif role[0] == "value" and d_out % role[1] == 0:
            units += [Unit(m, h, "kv_head", d_out // role[1]) for h in range(role[1])]
        else:
            raise ValueError(f"{m}: {role[1]} heads do not divide its weight of shape {tuple(mod.weight.shape)}")
    return units


@torch.no_grad()
def zero_units(target: nn.Module, units: list[Unit]) -> None:
    """Zero each unit's block of its matrix in place (and its bias entries, for output neurons and kv heads)."""
    named = target_modules(target)
    for u in units:
        mod = named[u.module]
        w = mod.weight if module_kind(mod) == "linear" else mod.weight.T  # (d_out, d_in) view
        if u.reads:
            w[:, u.span] = 0.0
            continue
        w[u.span] = 0.0
        if getattr(mod, "bias", None) is not None:
            mod.bias[u.span] = 0.0


def zeroing_hook(mod: nn.Module, u: Unit) -> Any:
    if u.reads:

        def pre(_mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0].clone()
            x[..., u.span] = 0.0
            return (x, *args[1:])

        return mod.register_forward_pre_hook(pre)

    def post(_mod: nn.Module, _inp: Any, out: Tensor) -> Tensor:
        out = out.clone()
        out[..., u.span] = 0.0
        return out

    return mod.register_forward_hook(post)


@torch.no_grad()
def unit_effects(
    target: nn.Module, units: list[Unit], x: Any, batch_size: int, prefix: FixedPrefix | None = None
) -> Float[Tensor, "n U"]:
    """Per input and unit: the squared change of the output (summed over its entries) with that unit zeroed. For an
    LM batch with a `loss_mask`, per scored position instead (as `spd.ablate.importances` counts them). `prefix`
    replays what runs before the units' modules (which must be among its changing modules) in every pass."""
    if prefix is not None and (outside := sorted({u.module for u in units} - prefix.changing)):
        raise ValueError(f"units of {outside} are outside the replay's changing modules {sorted(prefix.changing)}")
    named = target_modules(target)
    cols = []
    for xb in chunks(x, batch_size):
        ref = run_target(target, xb, prefix)
        row = []
        for u in units:
            h = zeroing_hook(named[u.module], u)
            try:
                row.append(_per_scored_input((run_target(target, xb, prefix) - ref).pow(2), xb))
            finally:
                h.remove()
        cols.append(torch.stack(row, dim=-1).cpu())
    return torch.cat(cols)


def _per_scored_input(sq: Tensor, x: Any) -> Tensor:
    at = scored_positions(sq.sum(-1), x) if sq.ndim == 3 else None  # (B, L, V) logits: the predicting positions
    return sq.flatten(1).sum(1) if at is None else at


def kinds_text(units: list[Unit]) -> str:
    """What a list of units is, for a report's "N <text>": 'neurons', 'heads', or 'units (12 neurons, 3 heads)'."""
    counts: dict[str, int] = {}
    for u in units:
        counts[u.kind] = counts.get(u.kind, 0) + 1
    names = {"neuron": "neurons", "input": "input units", "head": "heads", "kv_head": "kv heads"}
    if len(counts) <= 1:
        return names[next(iter(counts), "neuron")]
    return "units (" + ", ".join(f"{n} {names[k]}" for k, n in counts.items()) + ")"
