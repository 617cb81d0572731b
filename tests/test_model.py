import pytest
import torch
from torch import nn

from spd.ci import CIConfig
from spd.model import ComponentModel, ModuleSpec


def test_pattern_errors(two_layer):
    with pytest.raises(ValueError, match="'nope' matches no module.*fc1"):
        ComponentModel(two_layer, [ModuleSpec(pattern="nope", C=3)], CIConfig())
    seq = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    with pytest.raises(ValueError, match="'1', a LayerNorm, which cannot be decomposed"):
        ComponentModel(seq, [ModuleSpec(pattern="1", C=3)], CIConfig())
    # a glob takes the weight matrices among its matches (the LayerNorm is skipped) ...
    assert ComponentModel(seq, [ModuleSpec(pattern="*", C=3)], CIConfig()).module_names == ["0"]
    # ... and errors when it meets none
    with pytest.raises(ValueError, match="pattern '1\\*' matches '1', a LayerNorm"):
        ComponentModel(seq, [ModuleSpec(pattern="1*", C=3)], CIConfig())
    with pytest.raises(ValueError, match="more than one pattern"):
        ComponentModel(two_layer, [ModuleSpec(pattern="fc*", C=3), ModuleSpec(pattern="fc1", C=2)], CIConfig())


def test_target_frozen_and_untouched(cm, two_layer):
    assert not any(p.requires_grad for p in two_layer.parameters())
    names = {n for n, _ in cm.named_parameters()}
    assert names and not any(n.startswith("target.") and cm.get_parameter(n).requires_grad for n in names)
    assert "forward" not in vars(two_layer.fc1)


def test_all_ones_masks_with_delta_reproduce_target_exactly(cm, two_layer):
    x = torch.randn(32, 3)
    ones = {n: torch.ones(32, 5) for n in cm.module_names}
    dm = {n: torch.ones(32) for n in cm.module_names}
    assert torch.allclose(cm(x, ones, dm), two_layer(x), atol=1e-6)
    assert not torch.allclose(cm(x, ones), two_layer(x), atol=1e-3)  # random init without delta differs


def test_forward_restores_target_even_after_an_error(cm, two_layer):
    with pytest.raises(RuntimeError):
        cm(torch.randn(4, 3), {"fc1": torch.ones(4, 99)})  # wrong mask width
    assert "forward" not in vars(two_layer.fc1) and "forward" not in vars(two_layer.fc2)
    x = torch.randn(4, 3)
    assert torch.equal(cm(x), two_layer(x))


def test_cache_and_routes(cm, two_layer):
    x = torch.randn(6, 3)
    out, acts = cm.forward_with_cache(x)
    assert torch.equal(acts["fc1"], x)
    assert torch.allclose(acts["fc2"], torch.relu(two_layer.fc1(x)))
    assert torch.allclose(out, two_layer(x))
    zeros = {n: torch.zeros(6, 5) for n in cm.module_names}
    route = torch.tensor([True, False, True, False, True, False])
    routed = cm(x, zeros, routes={"fc1": route, "fc2": route})
    ablated = cm(x, zeros)
    assert torch.allclose(routed[~route], out[~route]) and torch.allclose(routed[route], ablated[route])


def test_causal_importances_and_alive(cm):
    ci = cm.causal_importances(torch.randn(10, 3))
    assert set(ci.lower) == {"fc1", "fc2"} and ci.lower["fc1"].shape == (10, 5)
    assert all(((v >= 0) & (v <= 1)).all() for v in ci.lower.values())
    alive = cm.alive_subcomponents(torch.randn(10, 3), threshold=0.0)
    assert set(alive) == {"fc1", "fc2"}
    w = cm.subcomponent_weight("fc1", 2)
    assert w.shape == (4, 3) and torch.linalg.matrix_rank(w) == 1


def test_tied_components():
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(3, 2, bias=False), nn.Linear(2, 3)
    with torch.no_grad():
        lin2.weight.copy_(lin1.weight.T)
    target = nn.Sequential(lin1, lin2)
    spec = [ModuleSpec(pattern="*", C=4)]
    cm = ComponentModel(target, spec, CIConfig(), tied=[("0", "1")])
    a, b = cm.comp("0"), cm.comp("1")
    assert torch.equal(b.weight(), a.weight().T) and torch.equal(b.subcomponent(2), a.subcomponent(2).T)
    assert len(list(cm.decomposition_parameters())) == 2  # only the source's V and U
    ones = {n: torch.ones(5, 4) for n in cm.module_names}
    dm = {n: torch.ones(5) for n in cm.module_names}
    x = torch.randn(5, 3)
    assert torch.allclose(cm(x, ones, dm), target(x), atol=1e-6)
    with pytest.raises(ValueError, match="not a decomposed module"):
        ComponentModel(target, [ModuleSpec(pattern="0", C=4)], CIConfig(), tied=[("0", "1")])
    with pytest.raises(ValueError, match="same C"):
        ComponentModel(
            target, [ModuleSpec(pattern="0", C=4), ModuleSpec(pattern="1", C=3)], CIConfig(), tied=[("0", "1")]
        )


class Twice(nn.Module):
    """fc applied twice: only the first call of a replaced module may take the clean-pass shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(torch.relu(self.fc(x)))))


@pytest.mark.parametrize("target", ["two_layer", "twice"])
@pytest.mark.parametrize("routing", ["all", "layerwise", "subset"])
def test_clean_pass_shortcut_changes_nothing(two_layer, target, routing):
    """Masked passes that reuse the clean pass (inner activations, target outputs) give the same loss and grads."""
    from spd.losses import mse, stochastic_recon_loss

    torch.manual_seed(0)
    net = two_layer if target == "two_layer" else Twice()
    model = ComponentModel(net, [ModuleSpec(pattern="*", C=4)], CIConfig(type="mlp", hidden=[4]))
    with torch.no_grad():
        for c in model.components.values():
            c.V.mul_(1.3)  # so the delta component is far from zero
    x = torch.randn(16, 3)
    results = []
    for use_clean in (False, True):
        model.zero_grad()
        with torch.no_grad():
            clean = model.clean_pass(x)
        clean.inner = model.inner_acts(clean.acts)
        ci = model.ci_from_acts(clean.acts, clean.inner)
        gen = torch.Generator().manual_seed(3)
        loss = stochastic_recon_loss(
            model, x, clean.output, ci.lower, routing, mse, generator=gen, clean=clean if use_clean else None
        )
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-7)
    assert len(g0) == len(g1) and all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g0, g1, strict=True))
    if target == "twice":
        assert "fc" not in clean.kept  # called twice: no output shortcut


class Counting(nn.Module):
    """x @ W for a fixed W, counting its calls (an embedding-like prefix module with no decomposed weights)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.register_buffer("W", torch.randn(d_in, d_out))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x @ self.W


class PrefixNet(nn.Module):
    """embed (not decomposed) -> [optional in-place ReLU module] -> fc1 -> ReLU -> fc2 -> [in-place add] -> fc3."""

    def __init__(self, inplace: str = "none") -> None:
        super().__init__()
        self.embed = Counting(3, 5)
        self.act = nn.ReLU(inplace=True) if inplace == "module" else nn.Identity()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.embed(x))
        h = self.fc2(torch.relu(self.fc1(h)))
        if self.inplace == "output":
            h.add_(0.5)  # modifies fc2's output, which a later pass must not take as fc2's clean output
        return self.fc3(h)


@pytest.mark.parametrize("inplace", ["none", "module", "output"])
@pytest.mark.parametrize("routing", ["all", "layerwise", "subset"])
def test_prefix_reuse_skips_work_and_changes_nothing(inplace, routing):
    """Masked passes given the clean pass take the embedding's output (and, layerwise, the unreplaced modules'
    outputs) from it: the loss and gradients equal full recomputation, and the embedding runs only in the clean
    pass. In-place code (an inplace ReLU module on the embedding's output, an in-place add on a decomposed
    module's output) makes those outputs unusable, and then they are recomputed, with the same results."""
    from spd.losses import mse, stochastic_recon_loss

    torch.manual_seed(0)
    net = PrefixNet(inplace)
    model = ComponentModel(net, [ModuleSpec(pattern="fc*", C=4)], CIConfig(type="mlp", hidden=[4]))
    assert set(model._prefix_modules) == {"embed", "act"}
    with torch.no_grad():
        for c in model.components.values():
            c.V.mul_(1.3)
    x = torch.randn(16, 3)
    passes = {"all": 1, "layerwise": 3, "subset": 1}[routing]
    results = []
    for reuse in (False, True):
        model.reuse_clean = reuse
        model.zero_grad()
        with torch.no_grad():
            clean = model.clean_pass(x)
        clean.inner = model.inner_acts(clean.acts)
        ci = model.ci_from_acts(clean.acts, clean.inner)
        net.embed.calls = 0
        gen = torch.Generator().manual_seed(3)
        loss = stochastic_recon_loss(model, x, clean.output, ci.lower, routing, mse, generator=gen, clean=clean)
        loss.backward()
        expected_calls = passes if (not reuse or inplace == "module") else 0
        assert net.embed.calls == expected_calls, (reuse, net.embed.calls)
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    if inplace == "none":
        assert set(clean.prefix) == {"embed", "act"} and set(clean.kept) == {"fc1", "fc2", "fc3"}
    if inplace == "module":
        assert clean.prefix == {}  # the ReLU changed the embedding's output, its own input, in place
    if inplace == "output":
        assert clean.out("fc2") is None and clean.out("fc1") is not None
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-7)
    assert len(g0) == len(g1) and all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g0, g1, strict=True))


@pytest.mark.parametrize("method", ["spd", "apd"])
def test_passes_build_no_checkers_per_call(method, monkeypatch):
    """The tests' jaxtyping hook (conftest) decorates every function definition it meets, nested ones included;
    a training step must not define checked functions on every call (each costs ~1 ms of beartype compilation),
    so the closures that model passes create per call are marked no_type_check."""
    import jaxtyping
    from helpers import tiny_tms_config

    from spd.config import load_config
    from spd.run import build_model
    from spd.task import build_task
    from spd.train import train_step

    raw = tiny_tms_config()
    raw["losses"] = [*raw["losses"], {"name": "pgd_recon", "coeff": 1.0, "n_steps": 2}]
    if method == "apd":
        raw["method"] = "apd"
        raw["apd"] = {"topk": 1.0}
        raw["losses"] = [{"name": "faithfulness", "coeff": 1.0}, {"name": "ci_masked_recon", "coeff": 1.0},
                         {"name": "schatten", "coeff": 1.0, "p": 0.9}]  # fmt: skip
        raw["decomposition"].pop("ci_fn", None)
        raw["decomposition"]["delta_component"] = False
    cfg = load_config(raw)
    task = build_task(cfg.target.factory, cfg.target.kwargs, cfg.seed)
    model = build_model(cfg, task)
    gen, data = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)

    def step() -> None:
        loss, _, _ = train_step(model, task.sample_batch(16, data), cfg, gen, 0.5)
        loss.backward()

    step()  # first use may import (and so decorate) lazily imported modules
    calls = []
    real = jaxtyping.jaxtyped
    monkeypatch.setattr(jaxtyping, "jaxtyped", lambda *a, **k: calls.append(a) or real(*a, **k))
    step()
    assert calls == []
