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


_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _one_hidden_forward(h: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:
    """z = sum_k w_out[c, k] gelu(h_c w_in[c, k] + b_in[c, k]) + b_out[c] (the one-hidden-layer ScalarMLP)."""
    return (F.gelu(torch.addcmul(b_in, h[..., None], w_in)) * w_out).sum(-1) + b_out


def _one_hidden_forward_saving(
    h: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The same z, plus the hidden activations a = gelu(pre) and gelu'(pre), computed from one erf and one exp."""
    pre = torch.addcmul(b_in, h[..., None], w_in)
    cdf = 0.5 * (1.0 + torch.erf(pre * _SQRT1_2))
    a = pre * cdf
    dgelu = cdf + pre * torch.exp(-0.5 * pre * pre) * _INV_SQRT_2PI
    return (a * w_out).sum(-1) + b_out, a, dgelu


def _one_hidden_backward(
    gz: Tensor, h: Tensor, a: Tensor, dgelu: Tensor, w_in: Tensor, w_out: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the one-hidden-layer ScalarMLP wrt (h, w_in, b_in, w_out, b_out) from the saved a, gelu'."""
    lead = tuple(range(gz.dim() - 1))
    gpre = gz[..., None] * w_out * dgelu
    return (
        (gpre * w_in).sum(-1),
        (gpre * h[..., None]).sum(lead),
        gpre.sum(lead),
        (gz[..., None] * a).sum(lead),
        gz.sum(lead),
    )


class _Kernels:
    """The one-hidden-layer ScalarMLP's forward, saving forward and backward, torch.compile'd once per process.

    Why not compile the module: its backward (inductor's, from the traced forward) evaluates GELU's erf and exp
    again in each of its reduction kernels (over the batch for the weights, over the hidden units for h); saving
    gelu(pre) and gelu'(pre) in the forward makes the backward a few multiply-adds. fwd+bwd of one C-200 matrix at
    batch 1024, hidden 16, one CPU thread: 9.0-9.4 ms against 12.6-12.9 ms; a TMS 40-10+ID step 10-13% faster
    (`benchmarks/results/fused_ci_kernels.json`; `benchmarks/bench_step.py --modes compile compile_unfused`).
    """

    forward = None
    forward_saving = None
    backward = None

    @classmethod
    def load(cls) -> type[_Kernels]:
        if cls.forward is None:
            cls.forward = torch.compile(_one_hidden_forward, dynamic=None)
            cls.forward_saving = torch.compile(_one_hidden_forward_saving, dynamic=None)
            cls.backward = torch.compile(_one_hidden_backward, dynamic=None)
        return cls


class _FusedOneHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:  # type: ignore[override]
        z, a, dgelu = _Kernels.load().forward_saving(h, w_in, b_in, w_out, b_out)
        ctx.save_for_backward(h, a, dgelu, w_in, w_out)
        return z

    @staticmethod
    def backward(ctx, gz: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        h, a, dgelu, w_in, w_out = ctx.saved_tensors
        g_h, g_w_in, g_b_in, g_w_out, g_b_out = _Kernels.load().backward(gz.contiguous(), h, a, dgelu, w_in, w_out)
        return g_h.to(h.dtype), g_w_in, g_b_in, g_w_out, g_b_out


class ScalarMLP(nn.Module):
    """Per-subcomponent MLP R -> R on the scalar inner activation: z_c = MLP_c(h_c).

    `fuse()` (called by `spd.train.compile_ci_function`) runs the one-hidden-layer case through compiled kernels
    with a hand-written backward (`_Kernels`); the math is the same.
    """

    reads = "inner"
    fused = False

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

    def fuse(self) -> bool:
        """Use the compiled kernels from now on, if this network has one hidden layer; whether it does."""
        self.fused = len(self.ws) == 0
        return self.fused

    def forward(self, h: Float[Tensor, "... C"]) -> Float[Tensor, "... C"]:
        if self.fused:
            params = (self.w_in, self.b_in, self.w_out, self.b_out)
            if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in params)):
                return _FusedOneHidden.apply(h, *params)
            return _Kernels.load().forward(h, *params)
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

    def output_layer(self, name: str) -> tuple[Tensor, Tensor, int]:
        """(weight, bias, offset): module `name`'s subcomponent c has its logit from weight[offset + c] and
        bias[offset + c] (weight's rows are the last layer's, for one subcomponent each)."""
        raise NotImplementedError

    @torch.no_grad()
    def silence(self, name: str, c: int) -> None:
        """Make subcomponent c of `name` unimportant on every input: its logit becomes the constant -1 (CI 0).
        Training can revive it (the output weights still get gradients through the sigmoids' leak)."""
        weight, bias, offset = self.output_layer(name)
        weight[offset + c] = 0.0
        bias[offset + c] = -1.0


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

    def output_layer(self, name: str) -> tuple[Tensor, Tensor, int]:
        net = self.nets[_key(name)]
        if isinstance(net, SharedMLP):
            last = net.net[-1]
            return last.weight, last.bias, 0
        return net.w_out, net.b_out, 0

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

    def output_layer(self, name: str) -> tuple[Tensor, Tensor, int]:
        last = self.net[-1]
        return last.weight, last.bias, sum(self.Cs[: self.names.index(name)])


def build_ci_function(specs: dict[str, tuple[int, int, str]], cfg: CIConfig) -> CIFunction:
    if cfg.type == "global_shared_mlp":
        return GlobalSharedMLP(specs, cfg)
    return PerModuleCI(specs, cfg)
