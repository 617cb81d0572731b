"""Rank-1 subcomponents of one weight matrix.

Everything is stored in "x @ W" orientation: a decomposed module computes `out = x @ W_io + bias` with
W_io of shape (d_in, d_out). Subcomponent c is the rank-1 matrix `V[:, c] ⊗ U[c, :]` (V reads, U writes),
so `W_io ≈ V @ U`. The masked forward is `((x @ V) * mask) @ U + bias`; no per-example weight is built.

With `rank` r > 1 (APD's parameter components) component c is the rank-r matrix
`V[:, c*r:(c+1)*r] @ U[c*r:(c+1)*r]`: V and U hold C*r columns/rows, and one mask value per component
scales all r of its inner activations.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2): weight (d_in, d_out), out = x @ weight + bias.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


SUPPORTED = "nn.Linear, nn.Embedding, transformers' Conv1D"


def module_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if _is_hf_conv1d(module):
        return "conv1d"
    return None


def target_weight_io(module: nn.Module) -> Float[Tensor, "d_in d_out"]:
    """The target module's weight in x @ W orientation (a view; no copy)."""
    kind = module_kind(module)
    if kind == "linear":
        return module.weight.T
    if kind in ("conv1d", "embedding"):
        return module.weight
    raise TypeError(f"unsupported module type {type(module).__name__}; supported: {SUPPORTED}")


class Components(nn.Module):
    """V (d_in, C*rank) and U (C*rank, d_out) for one target module, plus the target's frozen bias."""

    def __init__(self, target_module: nn.Module, C: int, rank: int | None = 1) -> None:
        """rank: of each (sub)component; None means full rank, min(d_in, d_out)."""
        super().__init__()
        kind = module_kind(target_module)
        if kind is None:
            raise TypeError(f"unsupported module type {type(target_module).__name__}; supported: {SUPPORTED}")
        w = target_weight_io(target_module)
        self.d_in, self.d_out = w.shape
        rank = min(self.d_in, self.d_out) if rank is None else rank
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.kind = kind
        self.C, self.rank = C, rank
        # Kaiming-style init as in the reference code; the faithfulness warm-up then fits V @ U to W.
        self.V = nn.Parameter(torch.randn(self.d_in, C * rank, dtype=w.dtype) / math.sqrt(self.d_in))
        self.U = nn.Parameter(torch.randn(C * rank, self.d_out, dtype=w.dtype) / math.sqrt(C * rank))
        # Reference the target's tensors without registering them (they belong to the target).
        self._target = [target_module]

    @property
    def target_module(self) -> nn.Module:
        return self._target[0]

    @property
    def bias(self) -> Tensor | None:
        return None if self.kind == "embedding" else self.target_module.bias

    def target_weight(self) -> Float[Tensor, "d_in d_out"]:
        return target_weight_io(self.target_module)

    def weight(self) -> Float[Tensor, "d_in d_out"]:
        """Sum of all subcomponents, in x @ W orientation."""
        return self.V @ self.U

    def delta(self) -> Float[Tensor, "d_in d_out"]:
        """Delta component: target weight minus the sum of subcomponents (differentiable in V, U)."""
        return self.target_weight() - self.V @ self.U

    def subcomponent(self, c: int) -> Float[Tensor, "d_in d_out"]:
        """(Sub)component c as a (d_in, d_out) matrix (rank 1, or rank `rank` for APD components)."""
        r = self.rank
        return self.V[:, c * r : (c + 1) * r] @ self.U[c * r : (c + 1) * r]

    def columns(self, idx: Tensor) -> Tensor:
        """Indices into V's columns (U's rows) of the (sub)components `idx`."""
        r = self.rank
        return idx if r == 1 else (idx[:, None] * r + torch.arange(r, device=idx.device)).flatten()

    def weight_of(self, idx: Tensor) -> Float[Tensor, "d_in d_out"]:
        """Sum of the (sub)components `idx`."""
        cols = self.columns(idx)
        return self.V[:, cols] @ self.U[cols]

    def expand(self, mask: Tensor) -> Tensor:
        """A per-component mask (..., C) as a mask on the C*rank inner activations."""
        return mask if self.rank == 1 else mask.repeat_interleave(self.rank, dim=-1)

    def inner(self, x: Tensor) -> Float[Tensor, "... Cr"]:
        """Inner activations h = x @ V (for an embedding: the rows of V picked by the token ids)."""
        if self.kind == "embedding":
            return self.V[x]
        return x @ self.V

    def forward(
        self,
        x: Tensor,
        mask: Float[Tensor, "... C"] | None = None,
        delta_mask: Float[Tensor, "..."] | None = None,
        inner: Float[Tensor, "... Cr"] | None = None,
        clean_out: Float[Tensor, "... d_out"] | None = None,
    ) -> Float[Tensor, "... d_out"]:
        """Masked forward. `inner` (= x @ V) and `clean_out` (the target module's own output on this x) are
        shortcuts when x is the clean input. The delta term never builds the delta matrix:
        (h*m) @ U + dm * x @ (W - V @ U) = dm * (x @ W) + (h * (m - dm)) @ U, so it costs the target's own
        matmul (none, given `clean_out`) and no gradient through a (d_in, d_out) matrix."""
        h = self.inner(x) if inner is None else inner
        b = self.bias
        if mask is not None and self.rank > 1:
            mask = self.expand(mask)
        if delta_mask is not None:
            if clean_out is None:
                clean_out = self.target_forward(x)
            dm = delta_mask[..., None]
            m = 1.0 - dm if mask is None else mask - dm
            out = (h * m) @ self.U + dm * clean_out  # clean_out includes the bias once, scaled by dm
            return out if b is None else out + (1.0 - dm) * b
        if mask is not None:
            h = h * mask
        out = h @ self.U
        return out if b is None else out + b

    def target_forward(self, x: Tensor) -> Tensor:
        """The target module's own output on x (its class's forward: a masked pass shadows the instance's)."""
        m = self.target_module
        return type(m).forward(m, x)


class TransposedComponents(Components):
    """Components tied to another module's: V = source.U^T, U = source.V^T (shared storage, no own params).

    For tied target weights such as TMS's W and W^T: subcomponent c of this module is the transpose of
    subcomponent c of the source module.
    """

    def __init__(self, target_module: nn.Module, source: Components) -> None:
        nn.Module.__init__(self)
        kind = module_kind(target_module)
        if kind == "embedding" or source.kind == "embedding":
            raise TypeError("embeddings cannot be tied transposed")
        if kind is None:
            raise TypeError(f"unsupported module type {type(target_module).__name__}; supported: {SUPPORTED}")
        w = target_weight_io(target_module)
        if tuple(w.shape) != (source.d_out, source.d_in):
            raise ValueError(
                f"cannot tie: weight shape (d_in, d_out) = {tuple(w.shape)} is not the transpose of the "
                f"source's {(source.d_in, source.d_out)}"
            )
        self.kind, self.C, self.rank = kind, source.C, source.rank
        self.d_in, self.d_out = w.shape
        self._target = [target_module]
        self._source = [source]

    @property
    def V(self) -> Tensor:  # type: ignore[override]
        return self._source[0].U.T

    @property
    def U(self) -> Tensor:  # type: ignore[override]
        return self._source[0].V.T
