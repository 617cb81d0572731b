"""The toy targets' architectures, in plain torch (no `spd` import), so an edited toy model exported by
`spd ablate` loads anywhere with `Class(**kwargs).load_state_dict(safetensors.torch.load_file(path))`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TMS(nn.Module):
    """x_hat = ReLU(W^T W x + b) (linear2 holds W^T), optionally with a hidden identity layer between."""

    def __init__(self, n_features: int, n_hidden: int, hidden_identity: bool = False) -> None:
        super().__init__()
        self.linear1 = nn.Linear(n_features, n_hidden, bias=False)
        self.hidden_layers = nn.ModuleList([nn.Linear(n_hidden, n_hidden, bias=False)] if hidden_identity else [])
        self.linear2 = nn.Linear(n_hidden, n_features, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x)
        for layer in self.hidden_layers:
            h = layer(h)
        return F.relu(self.linear2(h))


class MLPBlock(nn.Module):
    def __init__(self, d_embed: int, d_mlp: int) -> None:
        super().__init__()
        self.mlp_in = nn.Linear(d_embed, d_mlp, bias=False)
        self.mlp_out = nn.Linear(d_mlp, d_embed, bias=False)

    def forward(self, resid: Tensor) -> Tensor:
        return resid + self.mlp_out(F.relu(self.mlp_in(resid)))


class Embed(nn.Module):
    """x @ W_E with a fixed (buffer) W_E: a module of its own, so masked passes reuse its clean output."""

    def __init__(self, n_features: int, d_embed: int) -> None:
        super().__init__()
        self.register_buffer("W_E", torch.zeros(n_features, d_embed))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.W_E


class ResidMLP(nn.Module):
    """resid = x W_E; per layer resid += W_out ReLU(W_in resid); out = resid W_E^T (W_E a fixed buffer)."""

    def __init__(self, n_features: int, d_embed: int, d_mlp: int, n_layers: int) -> None:
        super().__init__()
        self.embed = Embed(n_features, d_embed)
        self.layers = nn.ModuleList([MLPBlock(d_embed, d_mlp) for _ in range(n_layers)])
        self.register_load_state_dict_pre_hook(_legacy_embed_key)

    @property
    def W_E(self) -> Tensor:
        return self.embed.W_E

    def forward(self, x: Tensor) -> Tensor:
        resid = self.embed(x)
        for layer in self.layers:
            resid = layer(resid)
        return resid @ self.W_E.T


def _legacy_embed_key(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
    """State dicts saved before the embedding became a module keep W_E at the top level."""
    if prefix + "W_E" in state_dict and prefix + "embed.W_E" not in state_dict:
        state_dict[prefix + "embed.W_E"] = state_dict.pop(prefix + "W_E")
