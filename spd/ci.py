"""Causal-importance (CI) functions: map a batch to per-subcomponent logits z (the sigmoids make CIs).

All CI functions share one interface: `forward(acts, inner) -> {module: z}`, where `acts[m]` is the input
of decomposed module m in the clean target pass and `inner[m] = acts[m] @ V_m` its inner activations.
Types:
- "mlp": an independent tiny MLP per subcomponent on its scalar inner activation (the SPD paper's choice);
- "vector_mlp": an MLP per subcomponent on the module's whole input vector;
- "shared_mlp": one MLP per module, input vector -> C logits;
- "global_shared_mlp": one MLP reading the concatenated inputs of all decomposed modules -> all logits.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from spd.base_config import BaseConfig

CIType = Literal["mlp", "vector_mlp", "shared_mlp", "global_shared_mlp"]


class CIConfig(BaseConfig):
    type: CIType = "mlp"
    hidden: list[int] = [16]


def _init(shape: tuple[int, ...], fan_in: int, gain: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape) * (gain / math.sqrt(fan_in)))


HIDDEN_GAIN = math.sqrt(2.0)


class ScalarMLP(nn.Module):
    """Per-subcomponent MLP R -> R on the scalar inner activation: z_c = MLP_c(h_c)."""

    reads = "inner"

    def __init__(self, C: int, hidden: list[int]) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("ci_fn.hidden must list at least one hidden width for type 'mlp'")
        self.w_in = _init((C, hidden[0]), 1, HIDDEN_GAIN)
        self.b_in = nn.Parameter(torch.zeros(C, hidden[0]))
        self.ws = nn.ParameterList(
            [_init((C, a, b), a, HIDDEN_GAIN) for a, b in zip(hidden[:-1], hidden[1:], strict=True)]
        )
        self.bs = nn.ParameterList([nn.Parameter(torch.zeros(C, b)) for b in hidden[1:]])
        self.w_out = _init((C, hidden[-1]), hidden[-1], 1.0)
        self.b_out = nn.Parameter(torch.zeros(C))

    def forward(self, h: Float[Tensor, "... C"]) -> Float[Tensor, "... C"]:
        a = F.gelu(torch.addcmul(self.b_in, h[..., None], self.w_in))
        for w, b in zip(self.ws, self.bs, strict=True):
            a = F.gelu(torch.einsum("...ci,cio->...co", a, w) + b)
        return (a * self.w_out).sum(-1) + self.b_out


class VectorMLP(nn.Module):
    """Per-subcomponent MLP on the full input vector: z_c = MLP_c(x)."""

    reads = "input"

    def __init__(self, C: int, d_in: int, hidden: list[int]) -> None:
        super().__init__()
        dims = [d_in, *hidden]
        self.ws = nn.ParameterList([_init((C, a, b), a, HIDDEN_GAIN) for a, b in zip(dims[:-1], dims[1:], strict=True)])
        self.bs = nn.ParameterList([nn.Parameter(torch.zeros(C, b)) for b in dims[1:]])
        self.w_out = _init((C, dims[-1]), dims[-1], 1.0)
        self.b_out = nn.Parameter(torch.zeros(C))

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... C"]:
        w0, b0 = self.ws[0], self.bs[0]
        a = F.gelu(torch.einsum("...d,cdh->...ch", x, w0) + b0)
        for w, b in zip(list(self.ws)[1:], list(self.bs)[1:], strict=True):
            a = F.gelu(torch.einsum("...ci,cio->...co", a, w) + b)
        return (a * self.w_out).sum(-1) + self.b_out


def _mlp(d_in: int, hidden: list[int], d_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    dims = [d_in, *hidden]
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(a, b), nn.GELU()]
    layers.append(nn.Linear(dims[-1], d_out))
    for m in layers:
        if isinstance(m, nn.Linear):
            gain = 1.0 if m is layers[-1] else HIDDEN_GAIN
            nn.init.normal_(m.weight, std=gain / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class SharedMLP(nn.Module):
    """One MLP per module: input vector -> C logits."""

    reads = "input"

    def __init__(self, C: int, d_in: int, hidden: list[int]) -> None:
        super().__init__()
        self.net = _mlp(d_in, hidden, C)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... C"]:
        return self.net(x)


def _key(name: str) -> str:
    return name.replace(".", "-")


class CIFunction(nn.Module):
    """Base class: `forward(acts, inner) -> {module name: logits z}`."""

    def forward(self, acts: dict[str, Tensor], inner: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError


class PerModuleCI(CIFunction):
    """One independent CI network per decomposed module ("mlp", "vector_mlp", "shared_mlp")."""

    def __init__(self, specs: dict[str, tuple[int, int, str]], cfg: CIConfig) -> None:
        """specs: module name -> (C, d_in, module kind)."""
        super().__init__()
        nets: dict[str, nn.Module] = {}
        for name, (C, d_in, kind) in specs.items():
            if cfg.type == "mlp":
                nets[_key(name)] = ScalarMLP(C, cfg.hidden)
            elif kind == "embedding":
                raise ValueError(
                    f"ci_fn.type {cfg.type!r} reads the module's input vector, but {name!r} is an embedding "
                    "(its input is token ids); use ci_fn.type 'mlp' for decompositions with embeddings"
                )
            elif cfg.type == "vector_mlp":
                nets[_key(name)] = VectorMLP(C, d_in, cfg.hidden)
            else:
                nets[_key(name)] = SharedMLP(C, d_in, cfg.hidden)
        self.nets = nn.ModuleDict(nets)
        self.names = list(specs)

    def forward(self, acts: dict[str, Tensor], inner: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name in self.names:
            net = self.nets[_key(name)]
            out[name] = net(inner[name] if net.reads == "inner" else acts[name])
        return out


class GlobalSharedMLP(CIFunction):
    """One MLP over the concatenated inputs of all decomposed modules, producing every module's logits."""

    def __init__(self, specs: dict[str, tuple[int, int, str]], cfg: CIConfig) -> None:
        super().__init__()
        for name, (_, _, kind) in specs.items():
            if kind == "embedding":
                raise ValueError(
                    f"ci_fn.type 'global_shared_mlp' reads input vectors, but {name!r} is an embedding; "
                    "use ci_fn.type 'mlp'"
                )
        self.names = list(specs)
        self.Cs = [specs[n][0] for n in self.names]
        self.net = _mlp(sum(specs[n][1] for n in self.names), cfg.hidden, sum(self.Cs))

    def forward(self, acts: dict[str, Tensor], inner: dict[str, Tensor]) -> dict[str, Tensor]:
        z = self.net(torch.cat([acts[n] for n in self.names], dim=-1))
        return dict(zip(self.names, z.split(self.Cs, dim=-1), strict=True))


def build_ci_function(specs: dict[str, tuple[int, int, str]], cfg: CIConfig) -> CIFunction:
    if cfg.type == "global_shared_mlp":
        return GlobalSharedMLP(specs, cfg)
    return PerModuleCI(specs, cfg)
