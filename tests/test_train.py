import math

import pytest
import torch
from torch import nn

from spd.ci import CIConfig
from spd.config import LRConfig, WarmupConfig, load_config
from spd.losses import DIVERGENCES, faithfulness_loss
from spd.model import ComponentModel, ModuleSpec
from spd.train import bf16_matmul_is_native, compile_ci_function, faithfulness_warmup, lr_at, train, train_step


def test_lr_schedules_by_hand():
    cos = LRConfig(peak=1.0, schedule="cosine", warmup_frac=0.1, final_frac=0.0)
    assert lr_at(0, 100, cos) == pytest.approx(0.1)  # warm-up: (step + 1) / 10
    assert lr_at(9, 100, cos) == pytest.approx(1.0)
    assert lr_at(10, 100, cos) == pytest.approx(1.0)  # cosine starts at the peak ...
    assert lr_at(99, 100, cos) == pytest.approx(0.0, abs=1e-12)  # ... and ends at final_frac
    mid = 10 + 89 / 2
    assert lr_at(int(mid), 100, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))
    lin = LRConfig(peak=2.0, schedule="linear", final_frac=0.5)
    assert lr_at(0, 11, lin) == pytest.approx(2.0) and lr_at(10, 11, lin) == pytest.approx(1.0)
    assert lr_at(5, 11, lin) == pytest.approx(1.5)
    assert lr_at(7, 11, LRConfig(peak=3e-4, schedule="constant")) == 3e-4
    # wsd: 10 steps, decay over the last 4 (steps 6-9) from the peak to final_frac; warm-up over the first 2
    wsd = LRConfig(peak=2.0, schedule="wsd", warmup_frac=0.2, decay_frac=0.4, final_frac=0.25)
    expected = [1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0 - 1.5 / 3, 2.0 - 3.0 / 3, 0.5]
    assert [lr_at(i, 10, wsd) for i in range(10)] == pytest.approx(expected)


def test_faithfulness_warmup_fits_components(cm):
    before = faithfulness_loss(cm).item()
    after = faithfulness_warmup(cm, WarmupConfig(steps=300, lr=1e-2, weight_decay=0.0))
    assert after < before * 1e-3


def _tiny_cfg(ci_type: str, **extra):
    base = {
        "target": {"factory": "toy_models.tms:tms_task"},
        "decomposition": {"modules": [{"pattern": "fc*", "C": 5}], "ci_fn": {"type": ci_type, "hidden": [4]}},
        "losses": [
            {"name": "faithfulness", "coeff": 1.0},
            {"name": "stochastic_recon", "coeff": 1.0},
            {"name": "stochastic_recon", "coeff": 1.0, "routing": "layerwise"},
            {"name": "stochastic_recon", "coeff": 1.0, "routing": "subset", "n_mask_samples": 2},
            {"name": "ci_masked_recon", "coeff": 0.5},
            {"name": "hidden_acts_recon", "coeff": 0.5},
            {"name": "importance_minimality", "coeff": 1e-2, "p": 2.0, "p_final": 0.5, "beta": 0.1},
        ],
        "train": {"steps": 4, "batch_size": 8, "faithfulness_warmup": {"steps": 2}, **extra},
    }
    return load_config(base)


@pytest.mark.parametrize("ci_type", ["mlp", "vector_mlp", "shared_mlp", "global_shared_mlp"])
def test_every_ci_type_trains_and_gets_gradients(two_layer, ci_type):
    cfg = _tiny_cfg(ci_type)
    torch.manual_seed(0)
    model = ComponentModel(two_layer, list(cfg.decomposition.modules), cfg.decomposition.ci_fn)
    loss, terms, _ = train_step(model, torch.randn(8, 3), cfg, torch.Generator().manual_seed(0), 0.5)
    assert torch.isfinite(loss) and set(terms) >= {"faithfulness", "stochastic_recon/layerwise", "total"}
    loss.backward()
    for name, p in model.named_parameters():
        if not name.startswith("target."):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    train(model, lambda b, g: torch.randn(b, 3, generator=g), cfg, progress=False)
    assert any(not torch.equal(before[k], v) for k, v in model.trainable_state_dict().items())


def test_bf16_autocast_step_runs(two_layer):
    cfg = _tiny_cfg("mlp", bf16=True)
    model = ComponentModel(two_layer, list(cfg.decomposition.modules), cfg.decomposition.ci_fn)
    train(model, lambda b, g: torch.randn(b, 3, generator=g), cfg, progress=False)
    assert all(torch.isfinite(v).all() for v in model.trainable_state_dict().values())


def test_bf16_on_a_cpu_without_bf16_matmul_warns(two_layer, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert bf16_matmul_is_native(torch.device("cpu")) is False
    cfg = _tiny_cfg("mlp", bf16=True)
    model = ComponentModel(two_layer, list(cfg.decomposition.modules), cfg.decomposition.ci_fn)
    with pytest.warns(UserWarning, match="train.bf16=false"):
        train(model, lambda b, g: torch.randn(b, 3, generator=g), cfg, progress=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert bf16_matmul_is_native(torch.device("cpu")) is True


def test_compiled_ci_function_matches_eager(two_layer):
    torch.manual_seed(0)
    model = ComponentModel(two_layer, [ModuleSpec(pattern="fc*", C=5)], CIConfig(hidden=[4]))
    _, acts = model.forward_with_cache(torch.randn(16, 3))
    eager = model.ci_from_acts(acts)
    grads_eager = torch.autograd.grad(sum(v.sum() for v in eager.lower.values()), list(model.ci_fn.parameters()))
    compile_ci_function(model)
    compiled = model.ci_from_acts(acts)
    grads_comp = torch.autograd.grad(sum(v.sum() for v in compiled.lower.values()), list(model.ci_fn.parameters()))
    for n in eager.lower:
        assert torch.allclose(eager.lower[n], compiled.lower[n], atol=1e-5)
    for a, b in zip(grads_eager, grads_comp, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.mlp = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.wte(ids)
        return self.head(h + torch.relu(self.mlp(h)))


def test_embedding_and_kl_decomposition_trains():
    torch.manual_seed(0)
    lm = TinyLM()
    cfg = _tiny_cfg("mlp")
    cfg = cfg.model_copy(update={"output_loss": "kl"})
    model = ComponentModel(lm, [ModuleSpec(pattern="wte", C=8), ModuleSpec(pattern="mlp", C=4)], CIConfig(hidden=[4]))
    ids = torch.randint(0, 11, (3, 7))
    target_out, acts = model.forward_with_cache(ids)
    assert acts["wte"].dtype == torch.long and model.ci_from_acts(acts).lower["wte"].shape == (3, 7, 8)
    loss, _, _ = train_step(model, ids, cfg.model_copy(update={"losses": cfg.losses[1:4]}), None, 0.0)
    loss.backward()
    assert model.comp("wte").V.grad is not None
    assert DIVERGENCES["kl"](target_out, target_out).item() == pytest.approx(0.0, abs=1e-6)
