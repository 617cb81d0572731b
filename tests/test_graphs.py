"""train.cuda_graph (spd.graphs): config checks, the learning rate as a device tensor and its checkpointing here;
the captured step itself on a GPU only (the GPU tests run in benchmarks/device/run.sh)."""

import json

import pytest
import torch

from spd import graphs, io
from spd.config import ConfigError, load_config
from spd.run import build_model
from spd.task import build_task
from spd.train import train

CUDA = torch.cuda.is_available()


def _cfg(device: str = "cuda", steps: int = 40, **loss_extra) -> dict:
    return {
        "seed": 0,
        "target": {"factory": "toy_models.tms:tms_task",
                   "kwargs": {"n_features": 5, "n_hidden": 2, "train_steps": 300}},
        "decomposition": {"modules": [{"pattern": "linear*", "C": 8}], "tied": [["linear1", "linear2"]]},
        "losses": [
            {"name": "faithfulness", "coeff": 1.0},
            {"name": "stochastic_recon", "coeff": 1.0},
            {"name": "stochastic_recon", "coeff": 1.0, "routing": "layerwise"},
            {"name": "importance_minimality", "coeff": 3e-3, "p": 1.0, **loss_extra},
        ],
        "train": {"steps": steps, "batch_size": 256, "device": device, "cuda_graph": True, "log_every": 10,
                  "lr": {"peak": 1e-3, "schedule": "cosine"}, "faithfulness_warmup": {"steps": 5}},
    }  # fmt: skip


def test_cuda_graph_needs_a_cuda_device_and_no_annealing():
    with pytest.raises(ConfigError, match="train.cuda_graph needs train.device cuda"):
        load_config(_cfg(device="cpu"))
    with pytest.raises(ConfigError, match=r"losses.3 \(importance_minimality\) anneal"):
        load_config(_cfg(p_final=0.5))
    assert load_config(_cfg()).train.cuda_graph  # valid on any machine; CUDA is checked when training starts
    apd = _cfg() | {"method": "apd", "apd": {"topk": 2.0, "topk_final": 1.0}}
    apd["decomposition"]["delta_component"] = False
    apd["losses"] = [{"name": "faithfulness", "coeff": 1.0}, {"name": "ci_masked_recon", "coeff": 1.0}]
    with pytest.raises(ConfigError, match="apd.topk_final anneals"):
        load_config(apd)


def test_tensor_learning_rate_is_set_in_place_and_checkpointed_as_a_number():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    graphs.tensor_lr(opt, torch.device("cpu"))
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == pytest.approx(0.1)
    graphs.set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == 0.25  # the same storage a graph would read
    _, meta = io._optimizer_to_flat(opt)
    assert json.loads(json.dumps(meta))["param_groups"][0]["lr"] == 0.25
    plain = torch.optim.AdamW([p], lr=0.1)
    graphs.set_lr(plain, 0.5)
    assert plain.param_groups[0]["lr"] == 0.5


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_graphed_training_follows_the_eager_trajectory(monkeypatch):
    """The same run with the step captured and with every step eager (the warm-up never ending), on the same
    capturable optimizer: the graph must give the eager parameters (same kernels; the registered generator draws
    the same masks)."""
    params = {}
    for captured in (False, True):
        monkeypatch.setattr(graphs, "WARMUP_STEPS", 3 if captured else 10**9)
        cfg = load_config(_cfg())
        task = build_task(cfg.target.factory, cfg.target.kwargs, cfg.seed)
        model = build_model(cfg, task, cfg.train.device)
        with _no_capture_warning():  # a failed capture warns and falls back: here it must fail the test
            train(model, task.sample_batch, cfg, progress=False)
        params[captured] = {k: v.detach().clone() for k, v in model.named_parameters() if not k.startswith("target.")}
    for k, v in params[False].items():
        torch.testing.assert_close(params[True][k], v, rtol=1e-4, atol=1e-6, msg=f"{k} differs")


class _no_capture_warning:
    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("error", message="train.cuda_graph")

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)
