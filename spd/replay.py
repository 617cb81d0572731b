"""Repeated passes over the same inputs by copies of a target that differ only in a few modules.

An unlearning study runs the target, its edited copies and the baselines' copies over the same forget and retain
batches many times (a forget loss per gradient-ascent step, an output per neuron zeroed). Every such copy differs
from the target only in its decomposed matrices, so each module that runs before the first of them sees the same
input in every pass over a batch and gives the same output. `FixedPrefix` records those outputs in the first pass
over a batch and returns them in later passes, of any copy. For a language model whose decomposed matrices sit in
its last layer that is all but one layer of every pass; elsewhere it is the embedding and the blocks before the
first decomposed matrix (`spd.reuse` does the same within one training step).

Which modules are replayed are `spd.reuse.prefix_modules` (the largest submodules holding no changing module)
where a module that shares a parameter with a changing module (tied embeddings: editing the unembedding edits
them) counts as changing too.
A module's output is kept only if it ran once in the pass, before any changing module, returned a tensor or a
tuple/list of tensors, and left its inputs unmodified; it is returned only while no changing module has run yet
and while it has not been modified in place since (`Kept.valid`), otherwise the module runs as usual. Modules
must be deterministic given their inputs (eval mode: no dropout), as they are for every target spd studies.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, no_type_check

from torch import Tensor, nn

from spd.model import SCORING_KEYS, target_output
from spd.names import target_modules
from spd.reuse import Kept, keep, prefix_modules, shadowed, tensor_inputs_versions


def batch_key(x: Any) -> Hashable:
    """Identifies a batch by the storage, offset, shape, strides and in-place version of its tensors (a slice taken
    twice from the same data gets the same key; data changed in place gets another). `FixedPrefix` holds each batch
    it keys, so its memory cannot be freed and reused by another batch meanwhile."""
    items = sorted(x.items()) if isinstance(x, dict) else [("", x)]
    key = []
    for k, v in items:
        if isinstance(v, Tensor):
            key.append((k, v.data_ptr(), tuple(v.shape), v.stride(), v._version, str(v.dtype), str(v.device)))
        elif k not in SCORING_KEYS:
            raise TypeError(f"cannot key a batch holding a {type(v).__name__} under {k!r}")
    return tuple(key)


def run_target(t: nn.Module, x: Any, prefix: FixedPrefix | None = None) -> Tensor:
    """`target_output(t, x)`, through `prefix` when one is given."""
    return target_output(t, x) if prefix is None else prefix.output(t, x)


def _detached(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.detach()
    return type(out)(o.detach() if isinstance(o, Tensor) else o for o in out)


class FixedPrefix:
    """Target passes over fixed batches that replay the outputs of modules before the first `changing` module.

    `target` fixes the module structure; passes may run on it or on any copy of it (`copy.deepcopy`, an edited
    target) whose modules outside `changing` (clean names, `spd.names`) hold the same weights.
    """

    def __init__(self, target: nn.Module, changing: list[str]):
        named = target_modules(target)
        missing = [c for c in changing if c not in named]
        if missing:
            raise ValueError(f"modules {missing} are not modules of the target")
        self.changing = set(changing)
        # a module holding a parameter of a changing module (tied weights) changes with it
        shared = {id(p) for c in changing for p in named[c].parameters()}
        mods = [named[c] for c in changing]
        mods += [m for m in target.modules() if any(id(p) in shared for p in m.parameters(recurse=False))]
        raw = {id(m): n for n, m in target.named_modules(remove_duplicate=False) if n}
        self._changing_raw = sorted({raw[id(m)] for m in mods})
        self._prefix = list(prefix_modules(target, mods))
        self._kept: dict[Hashable, dict[str, Kept]] = {}
        self._batches: dict[Hashable, Any] = {}  # held so that no other batch can take a key's memory while it is kept

    def output(self, t: nn.Module, x: Any) -> Tensor:
        """`target_output(t, x)`, with the outputs recorded in an earlier pass over the same batch replayed."""
        key = batch_key(x)
        kept = self._kept.get(key)
        state = {"started": False}
        record: dict[str, Kept | None] = {}
        calls: dict[str, int] = {}

        @no_type_check  # a closure made per pass (why unchecked: tests/conftest.py)
        def patched(name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
            def replay(*args: Any, **kwargs: Any) -> Any:
                k = kept.get(name)
                return k.out if k is not None and not state["started"] and k.valid() else orig(*args, **kwargs)

            def recorder(*args: Any, **kwargs: Any) -> Any:
                before = tensor_inputs_versions(args)
                out = orig(*args, **kwargs)
                calls[name] = calls.get(name, 0) + 1
                if not state["started"]:
                    record[name] = keep(out, args, before)
                return out

            return recorder if kept is None else replay

        def start(*_: Any) -> None:
            state["started"] = True

        mods = {n: t.get_submodule(n) for n in self._prefix}
        mods = {n: m for n, m in mods.items() if "forward" not in m.__dict__}  # already shadowed by someone else
        hooks = [t.get_submodule(n).register_forward_pre_hook(start) for n in self._changing_raw]
        try:
            with shadowed(mods, {n: patched(n, m.forward) for n, m in mods.items()}):
                out = target_output(t, x)
        finally:
            for h in hooks:
                h.remove()
        if kept is None:
            self._batches[key] = x
            self._kept[key] = {
                n: Kept(_detached(k.out), k.versions)
                for n, k in record.items() if k is not None and calls[n] == 1 and k.valid()
            }  # fmt: skip
        return out
