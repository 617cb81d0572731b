"""High-level entry points: decompose a target from a config, resume a run, load a finished run."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spd import distributed, io
from spd.apd import APDModel
from spd.base_config import ConfigError
from spd.config import Config, load_config
from spd.diagnostics import Diagnostic, diagnose
from spd.evals import evaluate
from spd.init import data_init
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

    @property
    def device(self) -> torch.device:
        """Where the decomposition's parameters are."""
        return next(self.model.parameters()).device

    def evaluate(self) -> dict[str, Any]:
        """Evaluation results plus `diagnostics`: warnings (strings) about this run, empty when none fire."""
        c = self.config
        t = self.task
        results = evaluate(self.model, t.eval_sampler, c.eval, c.output_loss, c.seed, t.ground_truth, t.causal_lm)
        return results | {"diagnostics": [str(d) for d in self.diagnose(results)]}

    def honest_scale(self, natural: bool = True) -> dict[str, Any]:
        """The honest-scale section (spd.honest): the masked decomposition's loss gap in the target's own loss,
        relative, in equivalent compute and against the natural (SGLD) degradation at the same loss."""
        from spd.honest import decomposition_losses, section
        from spd.scale import load_curve

        target_loss, losses = decomposition_losses(self)
        curve = load_curve(self.config.target.compute_curve) if self.config.target.compute_curve else None
        return section(self.task, target_loss, losses, self.config.natural if natural else False, curve)

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


def decompose(
    cfg: Config, run_dir: str | Path | None = None, progress: bool = True, task: Task | None = None
) -> tuple[Run, dict[str, Any]]:
    """Build the target, decompose it and evaluate. With `run_dir`, everything is saved there.

    `task`: a target already in memory (e.g. `spd.lm.lm_task(model, tokens)`) instead of the config's factory;
    its weights are saved in the run, and `load_run(run_dir, task=...)` reloads the run with the same task."""
    path = Path(run_dir) if run_dir is not None else None
    main = distributed.is_main()  # under torchrun, rank 0 alone writes the run directory and evaluates
    if path is not None and main:
        io.prepare_run_dir(path)
        (path / io.CONFIG).write_text(cfg.to_yaml())
    distributed.barrier()
    state = None
    if cfg.target.state_file is not None:
        if not Path(cfg.target.state_file).is_file():
            raise FileNotFoundError(f"target.state_file {cfg.target.state_file!r} does not exist")
        state = io.load_tensors(Path(cfg.target.state_file))
    elif task is None:
        state = _init_from_target(cfg)
    task = build_task(cfg.target.factory, cfg.target.kwargs, cfg.seed, state) if task is None else task
    source = task.info.get("source")
    if source is not None:
        cfg = cfg.model_copy(update={"target": cfg.target.model_copy(update={"source": source})})
    if path is not None and main:
        (path / io.CONFIG).write_text(cfg.to_yaml())
        if source is None or state is not None:  # weights with recorded file hashes reload from those files
            io.save_tensors(path / io.TARGET, task.target.state_dict())
    model = build_model(cfg, task)
    if cfg.train.init_from is not None:
        _init_from(model, task, Path(cfg.train.init_from))
    elif cfg.decomposition.init == "data":
        try:
            data_init(model, task.sample_batch, cfg.train.batch_size, cfg.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    log = _log(cfg, path) if main else None
    _reset_peak_memory(cfg)
    t0 = time.perf_counter()
    train(model, task.sample_batch, cfg, path, log, resume=False, progress=progress)
    run = Run(cfg, task, model, path)
    return run, _finish(run, log, time.perf_counter() - t0) if main else {}


def _init_from_target(cfg: Config) -> dict[str, torch.Tensor] | None:
    """The train.init_from run's saved target weights when this config builds its target by the same recipe
    (target section and seed equal), so a tail does not train the target again (18 min for ResidMLP 3 on a
    2-core CPU); else None, and the rebuilt target is checked against the run's (`_init_from`)."""
    if cfg.train.init_from is None:
        return None
    path = Path(cfg.train.init_from)
    if not (path / io.TARGET).is_file() or not (path / io.CONFIG).is_file():
        return None
    try:
        theirs = load_config(path / io.CONFIG)
    except (ConfigError, ValueError):  # an older run's config: rebuild and compare instead
        return None
    if theirs.seed != cfg.seed or theirs.target.model_dump() != cfg.target.model_dump():
        return None
    return io.load_tensors(path / io.TARGET)


def _init_from(model: ComponentModel, task: Task, path: Path) -> None:
    """Load a finished run's components and CI function into `model`, after checking the run decomposed this
    very target (train.init_from)."""
    where = f"train.init_from {str(path)!r}"
    if not (path / io.MODEL).is_file():
        raise ConfigError(f"{where} is not a finished run directory (no {io.MODEL}); finish it with `spd resume`")
    if (path / io.TARGET).is_file():
        theirs = io.load_tensors(path / io.TARGET)
        ours = task.target.state_dict()
        if theirs.keys() != ours.keys() or any(not torch.equal(theirs[k], ours[k].cpu()) for k in ours):
            raise ConfigError(f"{where} decomposed another target (its {io.TARGET} differs from this config's)")
    try:
        io.load_model_state(model, io.load_tensors(path / io.MODEL), path / io.MODEL)
    except (ValueError, RuntimeError) as e:  # other modules or C: names or shapes do not fit
        raise ConfigError(f"{where}: its decomposition does not fit this config's ({e})") from None


def _log(cfg: Config, path: Path | None) -> MetricsLog:
    return MetricsLog(path / io.METRICS if path else None, cfg.wandb, path.name if path else "", cfg.model_dump())


def _load_parts(path: Path, device: str | None = None, task: Task | None = None) -> tuple[Config, Task, ComponentModel]:
    if not (path / io.CONFIG).is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a run directory (no {io.CONFIG})")
    cfg = load_config(path / io.CONFIG)
    if device is not None:  # "auto", or a device checked against this machine
        device = run_device(cfg.train.device, device)
    state = io.load_tensors(path / io.TARGET) if (path / io.TARGET).is_file() else None
    if task is None:
        task = build_task(cfg.target.factory, cfg.target.kwargs, cfg.seed, state)
    elif state is not None:
        task.target.load_state_dict(state)
    check_source(cfg, task, path)
    return cfg, task, build_model(cfg, task, device)


def check_source(cfg: Config, task: Task, path: Path) -> None:
    """Refuse a target whose weight files differ from the ones the run was trained on."""
    recorded = (cfg.target.source or {}).get("sha256")
    now = (task.info.get("source") or {}).get("sha256")
    if recorded and now != recorded:
        raise ConfigError(
            f"run {str(path)!r}: the target's weight files changed since the run (recorded sha256 {recorded}, now "
            f"{now}); restore those files or decompose again"
        )


def resume(run_dir: str | Path, progress: bool = True, task: Task | None = None) -> tuple[Run, dict[str, Any]]:
    """Continue a run from its last checkpoint, on the same trajectory as an uninterrupted run."""
    path = Path(run_dir)
    cfg, task, model = _load_parts(path, task=task)
    ckpt = io.latest_checkpoint(path)
    if ckpt is None:
        raise ConfigError(f"run {str(path)!r} has no checkpoint to resume from; start it again with `spd train`")
    main = distributed.is_main()
    if main:
        truncate_after(path / io.METRICS, int(ckpt.name.split("_")[1]))
    log = _log(cfg, path) if main else None
    _reset_peak_memory(cfg)
    t0 = time.perf_counter()
    train(model, task.sample_batch, cfg, path, log, resume=True, progress=progress)
    run = Run(cfg, task, model, path)
    return run, _finish(run, log, time.perf_counter() - t0) if main else {}


def run_device(train_device: str, requested: str = "auto") -> str:
    """The device to load a run on: `requested`, or with "auto" the run's train.device where this machine has it
    (a CUDA run inspected on a machine without CUDA loads on the CPU)."""
    if requested != "auto":
        if torch.device(requested).type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {requested!r} was asked for but CUDA is not available here; use --device cpu")
        return requested
    if torch.device(train_device).type == "cuda" and not torch.cuda.is_available():
        return "cpu"
    return train_device


def load_run(run_dir: str | Path, device: str = "cpu", task: Task | None = None) -> Run:
    """Load a finished run (or its last checkpoint if it has no final model) without network or pickle; `task`
    for runs decomposed from a model in memory (`decompose(..., task=...)`). `device="auto"`: the run's
    train.device where this machine has it, else the CPU (what `spd eval`, `spd ablate` and `spd group` use)."""
    path = Path(run_dir)
    cfg, task, model = _load_parts(path, device, task)
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
