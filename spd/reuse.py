"""Which parts of a masked pass can be taken from the clean pass instead of being recomputed.

A masked pass runs the target on the same input as the clean pass. Until its first replaced module runs, every
module sees exactly the input it saw in the clean pass, so its output is the clean one. The masked pass then
takes that output from the clean pass instead of computing it again: the embedding and every block before the
first decomposed matrix, and, in a layerwise pass, all of the target up to the one replaced matrix (for L
decomposed matrices in sequence that is about half of the layerwise passes' forward work).

Candidates are the *prefix modules*: the largest submodules of the target that contain no decomposed module
(an embedding, a whole block without decomposed weights, a norm or activation module inside a block that has
some), plus the decomposed modules themselves when a pass leaves them unreplaced. Only an output the clean pass
produced in one call is kept, and only if it is a tensor or a tuple/list of tensors (and None). A kept output is
reused only while no tensor in it has been modified in place since (`Tensor._version`), and a module that
modified its own input in place during the clean pass is never reused, so in-place code in a target costs the
reuse but never changes a result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


@dataclass(frozen=True)
class Kept:
    """A module's clean-pass output and the versions of its tensors when it was produced."""

    out: Any
    versions: tuple[int, ...]

    def valid(self) -> bool:
        return tensor_versions(self.out) == self.versions


def tensor_versions(out: Any) -> tuple[int, ...] | None:
    """In-place versions of the tensors in a tensor or a tuple/list of tensors and None; None for anything else
    (an output this module does not know how to keep safely: dicts, model outputs, caches)."""
    if isinstance(out, Tensor):
        return (out._version,)
    if isinstance(out, tuple | list) and all(o is None or isinstance(o, Tensor) for o in out):
        return tuple(o._version for o in out if o is not None)
    return None


def keep(out: Any, inputs: tuple[Any, ...], input_versions: tuple[int, ...]) -> Kept | None:
    """A Kept for a clean call's output, or None if it cannot be reused (not a tensor structure, or the call
    modified one of its tensor inputs in place)."""
    versions = tensor_versions(out)
    if versions is None or input_versions != tensor_inputs_versions(inputs):
        return None
    return Kept(out, versions)


def tensor_inputs_versions(inputs: tuple[Any, ...]) -> tuple[int, ...]:
    return tuple(a._version for a in inputs if isinstance(a, Tensor))


@contextmanager
def shadowed(modules: dict[str, nn.Module], fns: dict[str, Callable[..., Any]]) -> Iterator[None]:
    """Shadow the forward of `modules[name]` by `fns[name]` (an instance attribute, so the module's hooks still
    run), restored on exit."""
    patched: list[nn.Module] = []
    try:
        for name, fn in fns.items():
            m = modules[name]
            object.__setattr__(m, "forward", fn)
            patched.append(m)
        yield
    finally:
        for m in patched:
            object.__delattr__(m, "forward")


def prefix_modules(target: nn.Module, decomposed: list[nn.Module]) -> dict[str, nn.Module]:
    """{raw name: module} of the largest submodules of `target` (never the root) containing no decomposed module."""
    inside = {id(m) for m in decomposed}
    contains: dict[int, bool] = {}

    def has_decomposed(m: nn.Module) -> bool:
        if id(m) not in contains:
            contains[id(m)] = id(m) in inside or any(has_decomposed(c) for c in m.children())
        return contains[id(m)]

    out: dict[str, nn.Module] = {}
    seen: set[int] = set()

    def walk(m: nn.Module, prefix: str) -> None:
        for name, child in m.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            full = f"{prefix}.{name}" if prefix else name
            if has_decomposed(child):
                walk(child, full)
            else:
                out[full] = child

    if has_decomposed(target):
        walk(target, "")
    return out
