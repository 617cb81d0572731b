import json

import pytest
import torch
from helpers import tiny_tms_config

from spd import io
from spd.base_config import ConfigError
from spd.config import load_config
from spd.run import decompose, load_run, resume


def _params(model):
    return {k: v.clone() for k, v in model.trainable_state_dict().items()}


def test_save_load_round_trip(tmp_path):
    cfg = load_config(tiny_tms_config())
    run, results = decompose(cfg, tmp_path / "run", progress=False)
    for name in (io.CONFIG, io.TARGET, io.MODEL, io.METRICS, io.EVAL):
        assert (tmp_path / "run" / name).is_file(), name
    loaded = load_run(tmp_path / "run")
    x = torch.rand(16, 5)
    ci_a, ci_b = run.model.causal_importances(x), loaded.model.causal_importances(x)
    assert all(torch.equal(ci_a.lower[n], ci_b.lower[n]) for n in ci_a.lower)
    masks = {n: torch.rand(16, 20) for n in run.model.module_names}
    assert torch.equal(run.model(x, masks), loaded.model(x, masks))
    assert torch.equal(loaded.task.target.linear1.weight, run.task.target.linear1.weight)
    # the saved eval is what a fresh evaluation of the loaded run gives
    saved = json.loads((tmp_path / "run" / io.EVAL).read_text())
    fresh = loaded.evaluate()
    assert saved["recon/ci"] == pytest.approx(fresh["recon/ci"])
    assert saved["gt/mmcs/linear1"] == pytest.approx(fresh["gt/mmcs/linear1"])


def test_init_from_starts_from_a_finished_run_and_refuses_one_that_does_not_fit(tmp_path):
    first = tmp_path / "first"
    run, _ = decompose(load_config(tiny_tms_config()), first, progress=False)
    # a tail on top of it: no warm-up, one step at a tiny LR, so the components barely move from the loaded ones
    tail = load_config(tiny_tms_config(steps=1, lr={"peak": 1e-9, "schedule": "constant"},
                                       faithfulness_warmup={"steps": 0}, init_from=str(first)))  # fmt: skip
    fresh = load_config(tiny_tms_config(steps=1, lr={"peak": 1e-9, "schedule": "constant"},
                                        faithfulness_warmup={"steps": 0}))  # fmt: skip
    tailed, _ = decompose(tail, tmp_path / "tail", progress=False)
    started, _ = decompose(fresh, None, progress=False)
    for k, v in _params(run.model).items():
        assert torch.allclose(tailed.model.trainable_state_dict()[k], v, atol=1e-6), k
    assert any(not torch.allclose(v, _params(run.model)[k]) for k, v in _params(started.model).items())
    assert load_config(tmp_path / "tail" / io.CONFIG).train.init_from == str(first)  # recorded with the run
    # the same target recipe: the tail takes the run's saved target instead of training it again
    assert "target_source" not in tailed.task.info and started.task.info["target_source"] != "shipped"

    other_target = tiny_tms_config(init_from=str(first))
    other_target["seed"] = 1  # the seed trains another target
    with pytest.raises(ConfigError, match="train.init_from .* decomposed another target"):
        decompose(load_config(other_target), None, progress=False)
    other_c = tiny_tms_config(init_from=str(first))
    for spec in other_c["decomposition"]["modules"]:
        spec["C"] = 7
    with pytest.raises(ConfigError, match="does not fit this config's"):
        decompose(load_config(other_c), None, progress=False)
    with pytest.raises(ConfigError, match="not a finished run directory"):
        decompose(load_config(tiny_tms_config(init_from=str(tmp_path / "nothing"))), None, progress=False)


def test_existing_run_dir_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(io.RunDirError, match="already holds files; nothing was overwritten"):
        decompose(load_config(tiny_tms_config()), out, progress=False)
    assert (out / "precious.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


class Crash(RuntimeError):
    pass


ADVERSARIAL_LOSSES = [
    {"name": "pgd_recon", "coeff": 1.0, "routing": "layerwise", "n_steps": 2, "step_size": 0.5},
    {"name": "persistent_pgd_recon", "coeff": 1.0, "update": "adam", "lr": 0.05},
]


@pytest.mark.parametrize("extra_losses", [[], ADVERSARIAL_LOSSES], ids=["stochastic", "adversarial"])
def test_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch, extra_losses):
    """Including the persistent adversary's masks and Adam state, which live in the checkpoint."""
    raw = tiny_tms_config()
    raw["losses"] += extra_losses
    cfg = load_config(raw)
    full, _ = decompose(cfg, tmp_path / "full", progress=False)

    # Crash at step 17 (after the checkpoint at step 9, before the one at step 19).
    import spd.train as train_mod

    real_step = train_mod.train_step
    calls = {"n": 0}

    def crashing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 18:
            raise Crash("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", crashing_step)
    with pytest.raises(Crash):
        decompose(cfg, tmp_path / "crashed", progress=False)
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert io.latest_checkpoint(tmp_path / "crashed").name == "step_0000009"
    assert not (tmp_path / "crashed" / io.MODEL).exists()
    # a crashed run still loads, from its last checkpoint
    partial = load_run(tmp_path / "crashed")
    ckpt = io.checkpoint_model_state(
        io.load_tensors(tmp_path / "crashed" / io.CKPTS / "step_0000009" / "state.safetensors")
    )
    assert all(torch.equal(partial.model.trainable_state_dict()[k], v) for k, v in ckpt.items())

    resumed, _ = resume(tmp_path / "crashed", progress=False)
    a, b = _params(full.model), _params(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if extra_losses:
        state = io.load_tensors(io.latest_checkpoint(tmp_path / "crashed") / "state.safetensors")
        assert any(k.startswith("adversary.") and ".s." in k for k in state)
    steps = [row["step"] for row in map(json.loads, (tmp_path / "crashed" / io.METRICS).read_text().splitlines())]
    assert steps == sorted(steps)  # rows logged after the checkpoint by the crashed run were dropped


def test_checkpoints_are_pruned(tmp_path):
    cfg = load_config(tiny_tms_config(keep_checkpoints=2))
    decompose(cfg, tmp_path / "run", progress=False)
    names = sorted(p.name for p in (tmp_path / "run" / io.CKPTS).iterdir())
    assert names == ["step_0000019", "step_0000029"]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    from spd.base_config import ConfigError

    cfg = load_config(tiny_tms_config())
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / io.CONFIG).write_text(cfg.to_yaml())
    from spd.task import build_task

    task = build_task(cfg.target.factory, cfg.target.kwargs, cfg.seed)
    io.save_tensors(tmp_path / "r" / io.TARGET, task.target.state_dict())
    with pytest.raises(ConfigError, match="no checkpoint"):
        resume(tmp_path / "r", progress=False)
