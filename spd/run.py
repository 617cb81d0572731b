"""High-level entry points: decompose a target from a config, resume a run, load a finished run."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spd import io
from spd.apd import APDModel
from spd.base_config import ConfigError
from spd.config import Config, load_config
from spd.diagnostics import Diagnostic, diagnose
from spd.evals import evaluate
from spd.log import MetricsLog, read_metrics, truncate_after
from spd.model import ComponentModel
from spd.task import Task, build_task
from spd.train import train


@dataclass
class Run:
    """A decomposition with everything needed to use it: config, target task and ComponentModel."""

    config: Config
    task: Task
    model: ComponentModel
    path: Path | None = None
    checkpoint_step: int | None = None  # set when loaded from a checkpoint of an unfinished run

    def evaluate(self) -> dict[str, Any]:
        """Evaluation results plus `diagnostics`: warnings (strings) about this run, empty when none fire."""
        c = self.config
        results = evaluate(self.model, self.task.sample_batch, c.eval, c.output_loss, c.seed, self.task.ground_truth)
        return results | {"diagnostics": [str(d) for d in self.diagnose(results)]}

    def diagnose(self, results: dict[str, Any]) -> list[Diagnostic]:
        history = read_metrics(self.path / io.METRICS) if self.path is not None else []
        m = self.model
        shapes = {n: (m.Cs[n], m.comp(n).d_in, m.comp(n).d_out) for n in m.module_names}
        c = self.config
        return diagnose(
            results, history, c.train.steps, shapes, c.eval.ci_threshold, self.checkpoint_step, method=c.method
        )


def build_model(cfg: Config, task: Task, device: str | None = None) -> ComponentModel:
    """The ComponentModel a config describes, on `device` (default: the config's train.device)."""
    torch.manual_seed(cfg.seed)  # component and CI-function initialisation
    d = cfg.decomposition
    model: ComponentModel
    if cfg.method == "apd":
        assert cfg.apd is not None  # the config validator guarantees it
        model = APDModel(task.target, list(d.modules), cfg.apd, list(d.tied), cfg.output_loss)
    else:
        model = ComponentModel(task.target, list(d.modules), d.ci_fn, d.sigmoid, d.delta_component, list(d.tied))
    return model.to(device or cfg.train.device)


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process so far (MB; includes the Python and torch baseline, ~0.3-0.5 GB)
    and, on CUDA, the peak allocated GPU memory since training started (`_reset_peak_memory`)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": rss / (1024 * 1024 if sys.platform == "darwin" else 1024)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _reset_peak_memory(cfg: Config) -> None:
    if torch.device(cfg.train.device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _finish(run: Run, log: MetricsLog | None, seconds: float) -> dict[str, Any]:
    memory = peak_memory()  # before evaluation, which has its own footprint
    results = run.evaluate() | {"train_seconds": seconds, "method": run.config.method} | memory
    results |= {f"target/{k}": v for k, v in run.task.info.items()}
    if run.path is not None:
        io.save_tensors(run.path / io.MODEL, run.model.trainable_state_dict())
        io.write_json(run.path / io.EVAL, results)
    if log is not None:
        log(run.config.train.steps, {f"eval/{k}": v for k, v in results.items() if isinstance(v, int | float)})
        log.close()
    return results


def decompose(cfg: Config, run_dir: str | Path | None = None, progress: bool = True) -> tuple[Run, dict[str, Any]]:
    """Build the target, decompose it and evaluate. With `run_dir`, everything is saved there."""
    path = Path(run_dir) if run_dir is not None else None
    if path is not None:
        io.prepare_run_dir(path)
        (path / io.CONFIG).write_text(cfg.to_yaml())
    state = None
    if cfg.target.state_file is not None:
        if not Path(cfg.target.state_file).is_file():
            raise FileNotFoundError(f"target.state_file {cfg.target.state_file!r} does not exist")
        state = io.load_tensors(Path(cfg.target.state_file))
    task = build_task(cfg.target.factory, cfg.target.kwargs, cfg.seed, state)
    if path is not None:
        io.save_tensors(path / io.TARGET, task.target.state_dict())
    model = build_model(cfg, task)
    log = MetricsLog(path / io.METRICS if path else None, cfg.wandb, path.name if path else "", cfg.model_dump())
    _reset_peak_memory(cfg)
    t0 = time.perf_counter()
    train(model, task.sample_batch, cfg, path, log, resume=False, progress=progress)
    run = Run(cfg, task, model, path)
    return run, _finish(run, log, time.perf_counter() - t0)


def _load_parts(path: Path, device: str | None = None) -> tuple[Config, Task, ComponentModel]:
    if not (path / io.CONFIG).is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a run directory (no {io.CONFIG})")
    cfg = load_config(path / io.CONFIG)
    task = build_task(cfg.target.factory, cfg.target.kwargs, cfg.seed, io.load_tensors(path / io.TARGET))
    return cfg, task, build_model(cfg, task, device)


def resume(run_dir: str | Path, progress: bool = True) -> tuple[Run, dict[str, Any]]:
    """Continue a run from its last checkpoint, on the same trajectory as an uninterrupted run."""
    path = Path(run_dir)
    cfg, task, model = _load_parts(path)
    ckpt = io.latest_checkpoint(path)
    if ckpt is None:
        raise ConfigError(f"run {str(path)!r} has no checkpoint to resume from; start it again with `spd train`")
    truncate_after(path / io.METRICS, int(ckpt.name.split("_")[1]))
    log = MetricsLog(path / io.METRICS, cfg.wandb, path.name, cfg.model_dump())
    _reset_peak_memory(cfg)
    t0 = time.perf_counter()
    train(model, task.sample_batch, cfg, path, log, resume=True, progress=progress)
    run = Run(cfg, task, model, path)
    return run, _finish(run, log, time.perf_counter() - t0)


def load_run(run_dir: str | Path, device: str = "cpu") -> Run:
    """Load a finished run (or its last checkpoint if it has no final model) without network or pickle."""
    path = Path(run_dir)
    cfg, task, model = _load_parts(path, device)
    step = None
    if (path / io.MODEL).is_file():
        state, source = io.load_tensors(path / io.MODEL), path / io.MODEL
    else:
        ckpt = io.latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"run {str(path)!r} has neither {io.MODEL} nor a checkpoint")
        state, source = io.checkpoint_model_state(io.load_tensors(ckpt / "state.safetensors")), ckpt
        step = int(ckpt.name.split("_")[1])
    io.load_model_state(model, state, source)
    return Run(cfg, task, model, path, step)
