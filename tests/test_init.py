import pytest
import torch
from torch import nn

from spd.base_config import ConfigError, validate
from spd.ci import CIConfig
from spd.config import Config
from spd.init import data_init, read_directions, ridge_writes
from spd.model import ComponentModel, ModuleSpec
from tests.helpers import tiny_tms_config


def test_read_directions_are_normalised_nonzero_rows():
    acts = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -2.0], [1.0, 0.0, 0.0]])
    V = read_directions(acts, 3, torch.Generator().manual_seed(0))
    assert V.shape == (3, 3)
    got = {tuple(round(v, 6) for v in col.tolist()) for col in V.T}
    assert got == {(0.6, 0.8, 0.0), (0.0, 0.0, -1.0), (1.0, 0.0, 0.0)}  # each nonzero row once, the zero row never
    more = read_directions(acts, 7, torch.Generator().manual_seed(0))  # fewer rows than C: drawn with replacement
    assert more.shape == (3, 7) and torch.allclose(more.norm(dim=0), torch.ones(7))
    with pytest.raises(ValueError, match="zero"):
        read_directions(torch.zeros(4, 3), 2, torch.Generator())


def test_ridge_writes_by_hand():
    W = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    # V = I: U = W / (1 + ridge)
    assert torch.allclose(ridge_writes(torch.eye(2), W, ridge=0.5), W / 1.5)
    # two columns reading the same direction e1: they share its write evenly, w1 / (2 + ridge) each;
    # the unread row of W (e2's) is left to the delta
    V = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    U = ridge_writes(V, W, ridge=0.5)
    assert torch.allclose(U, torch.stack([W[0] / 2.5, W[0] / 2.5]))


class Sparse(nn.Module):
    """5 -> 4 -> ReLU -> 3, fed inputs on the first 3 input directions only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 4, bias=False)
        self.fc2 = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _sparse_batch(n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.zeros(n, 5)
    on = torch.randint(0, 3, (n,), generator=g)  # one feature of three per input, a fifth of inputs all-zero
    x[torch.arange(n), on] = torch.rand(n, generator=g) + 0.5
    x[torch.rand(n, generator=g) < 0.2] = 0.0
    return x


def test_data_init_reads_the_inputs_and_sums_to_w_on_their_span():
    torch.manual_seed(0)
    target = Sparse()
    model = ComponentModel(target, [ModuleSpec(pattern="fc*", C=6)], CIConfig(type="mlp", hidden=[2]))
    data_init(model, _sparse_batch, batch_size=64, seed=0)
    V1 = model.comp("fc1").V
    # fc1's inputs are one-hot directions e0, e1, e2: every read direction is one of them, and each is read
    assert torch.allclose(V1.abs().max(0).values, torch.ones(6)) and set(V1.abs().argmax(0).tolist()) == {0, 1, 2}
    # the subcomponents sum to W on the span of the data (up to the ridge's shrinkage), not off it
    W1, S1 = model.comp("fc1").target_weight(), model.comp("fc1").weight()
    assert torch.allclose(S1[:3], W1[:3], rtol=0.02, atol=1e-3)
    assert torch.allclose(S1[3:], torch.zeros(2, 4))
    # so with every mask at 1 and no delta, outputs on the data match the target's
    x = _sparse_batch(128, torch.Generator().manual_seed(1))
    ones = {n: torch.ones(128, 6) for n in model.module_names}
    assert torch.allclose(model(x, ones), model(x), rtol=0.05, atol=2e-3)


def _cfg(**decomposition: object) -> Config:
    cfg = tiny_tms_config()
    cfg["decomposition"].update(decomposition)
    return validate(Config, cfg, "test")


def test_data_init_config_is_checked():
    assert _cfg().decomposition.init == "random"
    assert _cfg(init="data").decomposition.init == "data"
    with pytest.raises(ConfigError, match="decomposition.init"):
        _cfg(init="pca")
    apd = tiny_tms_config()
    apd.update(method="apd", apd={"topk": 1.0}, losses=[{"name": "ci_masked_recon", "coeff": 1.0}])
    apd["decomposition"].update(init="data", delta_component=False)
    with pytest.raises(ConfigError, match="decomposition.init 'data' is for method spd"):
        validate(Config, apd, "test")


def test_data_init_refuses_an_embedding():
    emb = nn.Sequential(nn.Embedding(7, 3), nn.Linear(3, 2))
    model = ComponentModel(emb, [ModuleSpec(pattern="*", C=2)], CIConfig(hidden=[2]))
    with pytest.raises(ValueError, match="embedding"):
        data_init(model, lambda n, g: torch.randint(0, 7, (n,), generator=g), batch_size=8, seed=0)


def test_a_run_with_init_data_starts_from_the_data(tmp_path):
    """decompose() applies the data init: with a vanishing LR, the trained run keeps unit read directions that
    are TMS inputs (nonnegative, sparse), which the random init's Gaussian columns are not."""
    from spd.config import load_config
    from spd.run import decompose

    over = ["decomposition.init=data", "train.faithfulness_warmup.steps=0", "train.steps=2", "train.lr.peak=1e-12"]
    run, _ = decompose(load_config(tiny_tms_config(), over), tmp_path / "run", progress=False)
    V = run.model.comp("linear1").V.detach()
    assert torch.allclose(V.norm(dim=0), torch.ones(V.shape[1]), atol=1e-6)
    assert (V > -1e-6).all()  # (Adam moves the zero entries by ~lr)
