"""The SPD training loop: faithfulness warm-up, then AdamW on components and CI function together."""

from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from spd import distributed, graphs, io
from spd.adversarial import PersistentAdversary
from spd.apd import split_components
from spd.ci import ScalarMLP
from spd.config import Config, LRConfig, WarmupConfig
from spd.dedupe import merge_duplicates
from spd.evals import quick_eval
from spd.losses import DIVERGENCES, StepContext, faithfulness_loss, total_loss
from spd.model import ComponentModel
from spd.task import BatchSampler, to_device

MASK_SEED_OFFSET = 7919
MERGE_SEED_OFFSET = 104_729  # a merge's inputs come from their own generator: the training data stay the same
SPLIT_SEED_OFFSET = 130_363  # likewise an APD split's inputs


def _short(key: str) -> str:
    """Progress-bar label: 'loss/stochastic_recon/layerwise' -> 'sr/layerwise'."""
    key = key.removeprefix("loss/")
    for long, short in (("stochastic_recon", "sr"), ("importance_minimality", "imp"), ("faithfulness", "faith")):
        key = key.replace(long, short)
    return key


def lr_at(step: int, steps: int, cfg: LRConfig) -> float:
    """Linear warm-up from 0 over warmup_frac of the steps, then constant / linear / cosine to final_frac, or
    wsd: constant, then linear to final_frac over the last decay_frac of the steps."""
    warmup = int(steps * cfg.warmup_frac)
    if step < warmup:
        return cfg.peak * (step + 1) / warmup
    f = cfg.final_frac
    start = warmup  # where the decay starts: after the warm-up, or (wsd) for the last decay_frac of the steps
    if cfg.schedule == "wsd":
        start = steps - max(int(steps * cfg.decay_frac), 1)
        if step < start:
            return cfg.peak
    progress = (step - start) / max(steps - start - 1, 1)
    if cfg.schedule == "constant":
        mult = 1.0
    elif cfg.schedule in ("linear", "wsd"):
        mult = 1.0 - (1.0 - f) * progress
    else:
        mult = f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.peak * mult


def faithfulness_warmup(model: ComponentModel, cfg: WarmupConfig) -> float:
    """AdamW on V and U alone, minimising the faithfulness loss; returns the final loss."""
    if cfg.steps == 0:
        return float(faithfulness_loss(model).detach())
    opt = torch.optim.AdamW(list(model.decomposition_parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.steps):
        loss = faithfulness_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(faithfulness_loss(model).detach())


def compile_ci_function(model: ComponentModel) -> None:
    """torch.compile each CI network in place (fuses the elementwise MLP over batch x C x hidden).

    Per-module networks are compiled one by one: smaller graphs compile faster and ran faster here
    (TMS 5-2 step: 12.5 ms vs 13.7 ms for one graph over all modules, 21 ms eager, 2-core CPU).
    """
    import torch._dynamo

    # Where compilation fails (e.g. no C++ compiler), run those graphs eagerly instead of crashing the run.
    torch._dynamo.config.suppress_errors = True
    nets = getattr(model.ci_fn, "nets", None)
    for net in nets.values() if nets is not None else [model.ci_fn]:
        if not (isinstance(net, ScalarMLP) and net.fuse()):  # fused: compiled kernels, hand-written backward
            net.compile(dynamic=False)


def bf16_matmul_is_native(device: torch.device) -> bool | None:
    """Whether `device` multiplies bf16 matrices in hardware (None: unknown). On a CPU that means AVX512-BF16 or
    AMX; without them bf16 autocast runs slower than float32 (the matmuls are emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return None
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is None for probe in probes):  # private torch probes; absent in some versions
        return None
    return any(probe() for probe in probes)


def build_optimizer(model: ComponentModel, cfg: Config) -> torch.optim.Optimizer:
    params = [p for n, p in model.named_parameters() if not n.startswith("target.")]
    if cfg.train.cuda_graph:  # a captured step reads the learning rate from device memory (spd.graphs)
        lr = torch.tensor(cfg.train.lr.peak, device=params[0].device)
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True, capturable=True)
    return torch.optim.AdamW(params, lr=cfg.train.lr.peak, weight_decay=0.0, foreach=True)


def build_adversaries(model: ComponentModel, cfg: Config, generator: torch.Generator) -> dict[int, PersistentAdversary]:
    """Persistent adversarial masks for every persistent_pgd_recon loss, keyed by its position in cfg.losses."""
    device = next(model.parameters()).device
    return {
        i: PersistentAdversary(model.Cs, model.delta_component, c.update, c.lr, c.betas, c.init, device, generator)
        for i, c in enumerate(cfg.losses)
        if c.name == "persistent_pgd_recon"
    }


class StepTimer:
    """Wall time of training steps, read as a mean since the last read: perf/step_seconds and
    perf/inputs_per_second (tokens for token-id batches, else samples). On CUDA only the step before a read (or
    before an evaluation) synchronises: work queued by unsynchronised steps completes inside that timed step, so
    the sum is right without a synchronisation per step."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.steps = self.items = 0
        self.t0 = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def stop(self, x: Any, sync: bool) -> None:
        if sync:
            self._sync()
        self.seconds += time.perf_counter() - self.t0
        self.steps += 1
        ids = x.get("input_ids") if isinstance(x, dict) else x
        tokens = isinstance(ids, torch.Tensor) and not torch.is_floating_point(ids)
        self.items += ids.numel() if tokens else (len(ids) if isinstance(ids, torch.Tensor) else 0)

    def read(self) -> dict[str, float]:
        if not self.steps:
            return {}
        out = {"perf/step_seconds": self.seconds / self.steps, "perf/inputs_per_second": self.items / self.seconds}
        self.seconds, self.steps, self.items = 0.0, 0, 0
        return out


def merge_step(model: ComponentModel, sample_batch: BatchSampler, cfg: Config, step: int) -> dict[str, float]:
    """Fold duplicate subcomponents now (train.merge, spd.dedupe) on fresh inputs; returns the number of pairs
    folded per module. The optimizer's moments are kept: they re-adapt within a few hundred steps."""
    mc, device = cfg.train.merge, next(model.parameters()).device
    assert mc is not None
    gen = torch.Generator().manual_seed(cfg.seed + MERGE_SEED_OFFSET + step)
    x = to_device(sample_batch(mc.inputs, gen), device)
    merged = merge_duplicates(
        model,
        x,
        max_cos=mc.max_cos,
        min_overlap=mc.min_overlap,
        threshold=cfg.eval.ci_threshold,
        min_density=cfg.eval.alive_min_density,
        min_gain=mc.min_gain,
        fit_steps=mc.fit_steps,
        seed=cfg.seed + step,
    )
    return {f"merge/pairs/{name}": float(len(pairs)) for name, pairs in merged.items()}


def split_step(
    model: ComponentModel, sample_batch: BatchSampler, cfg: Config, step: int, opt: torch.optim.Optimizer
) -> dict[str, float]:
    """Split the busiest APD components into dead ones now (apd.split, spd.apd.split_components) on fresh inputs;
    logs the number of splits."""
    assert cfg.apd is not None and cfg.apd.split is not None
    sc, device = cfg.apd.split, next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed + SPLIT_SEED_OFFSET + step)
    bs = cfg.train.batch_size
    batches = [to_device(sample_batch(min(bs, sc.inputs - i), gen), device) for i in range(0, sc.inputs, bs)]
    pairs = split_components(model, batches, sc, opt)  # type: ignore[arg-type]
    return {"split/pairs": float(len(pairs))}


def train_step(
    model: ComponentModel,
    x: Any,
    cfg: Config,
    gen: torch.Generator,
    frac: float,
    adversaries: dict[int, PersistentAdversary] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward of all configured losses; returns (total, terms, lower CIs)."""
    with torch.no_grad():
        clean = model.clean_pass(x)
    clean.inner = model.inner_acts(clean.acts)  # with gradients: shared by the CI function and masked passes
    ci = model.importances(x, clean)
    by_cfg = {id(cfg.losses[i]): a for i, a in (adversaries or {}).items()}
    ctx = StepContext(model, x, clean, ci, DIVERGENCES[cfg.output_loss], gen, frac, by_cfg)
    loss, terms = total_loss(ctx, list(cfg.losses))
    return loss, terms, ci.lower


def train(
    model: ComponentModel,
    sample_batch: BatchSampler,
    cfg: Config,
    run_dir: Path | None = None,
    log: Any = None,
    resume: bool = False,
    progress: bool = True,
) -> ComponentModel:
    """Decompose: train `model`'s components and CI function on batches from `sample_batch`.

    With `run_dir`, checkpoints are written every `train.checkpoint_every` steps; with `resume`, training
    continues from the last of them (optimizer and RNG state included), along the same trajectory.
    """
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = torch.device(tc.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {tc.device!r} but CUDA is not available here; set train.device=cpu")
    if tc.bf16 and bf16_matmul_is_native(device) is False:
        warnings.warn(
            f"train.bf16 is on but this {device.type} has no native bf16 matrix multiply (AVX512-BF16 or AMX on a "
            "CPU); bf16 autocast is likely slower than float32 here: set train.bf16=false",
            stacklevel=2,
        )
    if tc.cuda_graph and distributed.active():
        raise RuntimeError("train.cuda_graph does not cover data-parallel runs (torchrun); set train.cuda_graph=false")
    if tc.merge is not None and distributed.active():
        raise RuntimeError("train.merge does not cover data-parallel runs (torchrun) yet; remove train.merge")
    if cfg.apd is not None and cfg.apd.split is not None and distributed.active():
        raise RuntimeError("apd.split does not cover data-parallel runs (torchrun) yet; remove apd.split")
    merge_at = set(tc.merge.at) if tc.merge is not None else set()
    split_at = set(cfg.apd.split.at) if cfg.apd is not None and cfg.apd.split is not None else set()
    rank, main = distributed.rank(), distributed.is_main()
    seed = cfg.seed + rank * distributed.RANK_SEED_OFFSET  # data parallel: every rank its own data and masks
    data_gen = torch.Generator().manual_seed(seed)  # data is sampled on the CPU, then moved
    mask_gen = torch.Generator(device=device).manual_seed(seed + MASK_SEED_OFFSET)
    gens = {"data": data_gen, "mask": mask_gen}
    opt = build_optimizer(model, cfg)
    adversaries = build_adversaries(model, cfg, mask_gen)
    start = 0
    ckpt = io.latest_checkpoint(run_dir) if (resume and run_dir is not None) else None
    if ckpt is not None:
        start = io.load_checkpoint(ckpt, model, opt, gens, adversaries) + 1
        if tc.cuda_graph:
            graphs.tensor_lr(opt, device)  # the checkpoint stores the learning rate as a number
        if rank > 0:  # the checkpoint holds rank 0's generators; the others continue on fresh streams of their own
            data_gen.manual_seed(seed + start)
            mask_gen.manual_seed(seed + MASK_SEED_OFFSET + start)
    else:
        warm = faithfulness_warmup(model, tc.faithfulness_warmup)
        if log is not None:
            log(0, {"warmup/faithfulness": warm})
    distributed.broadcast_tensors(p for n, p in model.named_parameters() if not n.startswith("target."))
    if tc.compile:
        compile_ci_function(model)
    # (a CUDA graph must not capture autocast's cache of cast weights: it would replay stale casts)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not tc.cuda_graph) if tc.bf16 else nullcontext()
    )

    def body(x: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Forward of every loss, backward, optimizer step (what train.cuda_graph captures)."""
        with autocast:
            loss, terms, ci_lower = train_step(model, x, cfg, mask_gen, model.frac, adversaries)
        loss.backward()
        if distributed.active():
            shared = [p for g in opt.param_groups for p in g["params"]]
            distributed.average_gradients(shared + [s for a in adversaries.values() for s in a.s.values()])
        if tc.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], tc.grad_clip)
        opt.step()
        model.after_optimizer_step()
        return loss, terms, ci_lower

    graphed = graphs.GraphedStep(body, opt, mask_gen) if tc.cuda_graph else None
    bar = tqdm(
        range(start, tc.steps),
        initial=start,
        total=tc.steps,
        disable=not (progress and main),
        ncols=100,
        mininterval=1.0,
    )
    timer = StepTimer(device)
    for step in bar:
        if step in merge_at:
            row = merge_step(model, sample_batch, cfg, step)
            bar.write(f"step {step}: merged " + ", ".join(f"{k.split('/')[-1]} {int(v)}" for k, v in row.items()))
            if log is not None:
                log(step, row)
        if step in split_at:
            row = split_step(model, sample_batch, cfg, step, opt)
            bar.write(f"step {step}: split {int(row['split/pairs'])} busy components into dead ones")
            if log is not None:
                log(step, row)
        timer.start()
        lr = lr_at(step, tc.steps, tc.lr)
        graphs.set_lr(opt, lr)
        x = to_device(sample_batch(tc.batch_size, data_gen), device)
        model.frac = step / tc.steps
        if graphed is not None:
            loss, terms, ci_lower = graphed(x)
        else:
            opt.zero_grad(set_to_none=True)
            loss, terms, ci_lower = body(x)
        for adv in adversaries.values():
            adv.step()  # ascent on the masks, from the gradient the backward pass just left on them
        last = step == tc.steps - 1
        evaluating = log is not None and tc.eval_every is not None and (step % tc.eval_every == 0 or last)
        logging = step % tc.log_every == 0 or last
        saving = main and run_dir is not None and ((step + 1) % tc.checkpoint_every == 0 or last)
        timer.stop(x, sync=evaluating or logging or saving)  # each of them waits for the GPU anyway
        if evaluating:
            row = quick_eval(model, sample_batch, cfg.eval, cfg.output_loss, cfg.seed, step)
            log(step, {f"eval/{k}": v for k, v in row.items()})
        if logging:
            row = {f"loss/{k}": float(v) for k, v in terms.items()} | {"lr": lr} | timer.read()
            row |= {
                f"train_ci_l0/{n}": float((g > cfg.eval.ci_threshold).sum(-1).float().mean())
                for n, g in ci_lower.items()
            }
            bar.set_postfix({_short(k): f"{v:.3g}" for k, v in row.items() if k.startswith("loss/")})
            if log is not None:
                log(step, row)
        if saving:
            io.save_checkpoint(run_dir, step, model.trainable_state_dict(), opt, gens, tc.keep_checkpoints, adversaries)
    bar.close()
    model.frac = 1.0
    return model
