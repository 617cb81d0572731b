"""The names users give a target's modules: wrapper-free names, and TransformerLens hook names.

A TransformerLens 4 `TransformerBridge` wraps every module of the model it drives, so the raw `named_modules()`
names carry `_original_component` segments (`blocks.0._original_component.attn._original_component.q.
_original_component` is the nn.Linear behind `blocks.0.attn.q`). Everywhere in spd a module is named by its clean
name, the raw name with those segments removed; when a wrapper and the module it wraps share a clean name, the
name means the innermost module that holds the weight (the one that is decomposed). For models without wrappers
clean names are the raw names.

A bridge also names every wrapped module by its hooks (`blocks.0.mlp.in.hook_in` is the input of
`blocks.0.mlp.fc_in`); `hook_aliases` maps those hook-name prefixes (`blocks.0.mlp.in`) to clean names, so module
patterns may use either.
"""

from __future__ import annotations

from torch import nn

WRAPPER = "_original_component"


def clean_name(raw: str) -> str:
    """`blocks.0._original_component.attn` -> `blocks.0.attn` (the name without bridge wrapper segments)."""
    return ".".join(p for p in raw.split(".") if p != WRAPPER)


def target_modules(target: nn.Module) -> dict[str, nn.Module]:
    """{clean name: module} over `target.named_modules()` (the root, named "", left out); a wrapped module wins
    over its wrappers, since it is the one that owns the weights."""
    out: dict[str, nn.Module] = {}
    for raw, mod in target.named_modules():
        if raw:
            out[clean_name(raw)] = mod  # named_modules is pre-order: inner modules come after their wrappers
    return out


def hook_aliases(target: nn.Module) -> dict[str, str]:
    """{TransformerLens hook prefix: clean module name} for a target with a `hook_dict` (a TransformerBridge or a
    HookedTransformer), taken from each wrapper's `hook_in` hook; empty for other models."""
    hook_dict = getattr(target, "hook_dict", None)
    if not isinstance(hook_dict, dict):
        return {}
    by_id: dict[int, str] = {}
    for k, h in hook_dict.items():  # one hook can have several names (blocks.0.mlp.hook_post is mlp.out.hook_in)
        if k.endswith(".hook_in"):
            by_id.setdefault(id(h), k)
    out: dict[str, str] = {}
    for raw, mod in target.named_modules():
        hook = getattr(mod, "hook_in", None)
        key = by_id.get(id(hook)) if hook is not None else None
        if key is None:
            continue
        prefix, clean = key.removesuffix(".hook_in"), clean_name(raw)
        if prefix != clean:
            out[prefix] = clean
    return out
