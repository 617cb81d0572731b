"""The run configuration: frozen pydantic models, loaded from YAML, every error naming its field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from spd.apd import APDConfig
from spd.base_config import BaseConfig, ConfigError, apply_overrides, read_yaml, validate
from spd.ci import CIConfig
from spd.losses import LossConfig, OutputLoss
from spd.model import ModuleSpec
from spd.natural import NaturalConfig
from spd.sigmoids import SigmoidType


class TargetConfig(BaseConfig):
    """Where the target comes from: `factory` is "python.module:function", called with `kwargs`.

    The factory returns a spd.task.Task (the target module, a batch sampler and optional ground truth).
    """

    factory: str
    kwargs: dict[str, Any] = {}
    compute_curve: str | None = Field(
        None,
        description="JSON file of the target family's loss -> compute points (spd.scale format) for the honest "
        "scale; default: the toy's own ladder, a scaling law for language models",
    )
    state_file: str | None = Field(
        None,
        description="safetensors state dict of an already trained target (e.g. from `spd toy train`); "
        "the factory loads it instead of training",
    )
    source: dict[str, Any] | None = Field(
        None,
        description="filled in by the run: where the target's weights came from (path, revision, sha256 of each "
        "weight file); a reload refuses files whose hashes differ",
    )

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, v: str) -> str:
        mod, _, attr = v.partition(":")
        if not mod or not attr:
            raise ValueError("must look like 'package.module:function', e.g. 'toy_models.tms:tms_task'")
        return v


class DecompositionConfig(BaseConfig):
    modules: list[ModuleSpec] = Field(min_length=1)
    ci_fn: CIConfig = CIConfig()
    sigmoid: SigmoidType = "leaky_hard"
    delta_component: bool = True
    init: Literal["random", "data"] = Field(
        "random",
        description="random: V, U Kaiming-style, then the faithfulness warm-up fits V U to W; data: V reads the "
        "module's own inputs on random examples and U is the ridge fit of W (spd.init), before the warm-up "
        "(set train.faithfulness_warmup.steps=0 to start training from it as it is)",
    )
    tied: list[tuple[str, str]] = Field(
        default=[],
        description="pairs (a, b): b's subcomponents are the transposes of a's (tied weights, e.g. TMS)",
    )


class LRConfig(BaseConfig):
    """Linear warm-up over `warmup_frac` of the steps, then `schedule` down to `final_frac` x peak: constant (no
    decay), linear, cosine, or wsd (warmup-stable-decay: constant, then linear over the last `decay_frac`)."""

    peak: float = Field(1e-3, gt=0)
    schedule: Literal["constant", "linear", "cosine", "wsd"] = "cosine"
    warmup_frac: float = Field(0.0, ge=0, lt=1)
    final_frac: float = Field(0.0, ge=0, le=1)
    decay_frac: float = Field(0.2, gt=0, le=1, description="wsd only: the final fraction of the steps that decays")

    @model_validator(mode="after")
    def _phases_fit(self) -> LRConfig:
        if self.schedule == "wsd" and self.warmup_frac + self.decay_frac > 1:
            raise ValueError(
                f"warmup_frac ({self.warmup_frac}) + decay_frac ({self.decay_frac}) exceed 1: the wsd warm-up and "
                "decay would overlap; lower one of them"
            )
        return self


class WarmupConfig(BaseConfig):
    """Faithfulness warm-up: steps of AdamW on V and U alone, minimising the faithfulness loss."""

    steps: int = Field(200, ge=0)
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(0.1, ge=0)


class MergeConfig(BaseConfig):
    """Fold duplicate subcomponents into one during training (spd.dedupe.merge_duplicates) at the given steps,
    judged on `inputs` fresh inputs from the task with the eval config's firing threshold and alive density."""

    at: list[int] = Field(min_length=1, description="steps (0-based, before that step's update) at which to merge")
    max_cos: float = Field(0.9, gt=0, lt=1)
    min_overlap: float = Field(0.5, ge=0, le=1, description="0 also merges sign splits (see spd.dedupe)")
    min_gain: float = Field(0.3, gt=0)
    fit_steps: int = Field(300, ge=0, description="CI refit steps after each merge (0: none)")
    inputs: int = Field(20_000, gt=0)


class TrainConfig(BaseConfig):
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: LRConfig = LRConfig()
    faithfulness_warmup: WarmupConfig = WarmupConfig()
    grad_clip: float | None = Field(None, gt=0)
    bf16: bool = False
    compile: bool = Field(False, description="torch.compile the CI function (first step pays a compile)")
    cuda_graph: bool = Field(
        False,
        description="on a GPU, capture the training step once as a CUDA graph and replay it (spd.graphs): for "
        "host-bound steps such as the toys'; needs train.device cuda and no annealing by training fraction; "
        "a failed capture falls back to eager steps with a warning",
    )
    log_every: int = Field(100, gt=0)
    checkpoint_every: int = Field(1000, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    threads: int | None = Field(None, gt=0, description="torch CPU threads (None: torch's default)")
    device: str = Field("cpu", description="'cpu', 'cuda' or 'cuda:N'")
    init_from: str | None = Field(
        None,
        description="a finished run directory of the same target and decomposition: start from its components "
        "and CI function instead of a fresh initialisation (a new tail schedule on top of a run); the "
        "faithfulness warm-up still runs unless train.faithfulness_warmup.steps is 0; with the same target recipe "
        "(target section and seed) the run's saved target is taken instead of trained again",
    )
    merge: MergeConfig | None = Field(
        None,
        description="merge duplicate subcomponents at set steps (method spd; spd.dedupe): pieces that read the "
        "same thing on the data and fire together are folded into one, the matrix unchanged",
    )
    eval_every: int | None = Field(
        None,
        gt=0,
        description="every this many steps, log a quick evaluation on one eval batch (CI-L0, stochastic and "
        "adversarial reconstruction) as eval/... in metrics.jsonl: what `spd report` averages over a settled "
        "window and what the convergence diagnostics read",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        import torch

        try:
            dev = torch.device(v)
        except RuntimeError:
            raise ValueError("must be a torch device string such as 'cpu', 'cuda' or 'cuda:0'") from None
        return str(dev)


class AdversarialEvalConfig(BaseConfig):
    """Fresh PGD masks for each eval batch; the budget is part of every reported key."""

    n_steps: int = Field(20, ge=0, description="0 turns adversarial evaluation off")
    step_size: float = Field(0.1, gt=0)
    init: Literal["random", "ones", "zeros"] = "random"
    scope: Literal["shared", "per_example"] = Field(
        "shared",
        description="shared: one mask per subcomponent for the whole batch (the reference's eval); "
        "per_example: a stronger attack, one mask per input",
    )
    routings: list[Literal["all", "layerwise", "subset"]] = ["all", "layerwise"]


class EvalConfig(BaseConfig):
    batch_size: int = Field(4096, gt=0)
    n_batches: int = Field(4, gt=0)
    ci_threshold: float = Field(0.1, ge=0, le=1)
    alive_min_density: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="a subcomponent is alive if CI > ci_threshold on more than this fraction of eval inputs "
        "(0: on any input); runs with a value > 0 also report alive_ever/ (fired at least once)",
    )
    adversarial: AdversarialEvalConfig = AdversarialEvalConfig()


class WandbConfig(BaseConfig):
    project: str = "spd"
    mode: Literal["online", "offline", "disabled"] = "offline"


class Config(BaseConfig):
    seed: int = 0
    method: Literal["spd", "apd"] = Field(
        "spd",
        description="spd: rank-1 subcomponents with a CI function; apd: parameter components chosen per "
        "input by attribution top-k (settings in `apd`)",
    )
    apd: APDConfig | None = None
    target: TargetConfig
    decomposition: DecompositionConfig
    losses: list[LossConfig] = Field(min_length=1)
    output_loss: OutputLoss = "mse"
    train: TrainConfig
    eval: EvalConfig = EvalConfig()
    natural: NaturalConfig = Field(
        NaturalConfig(), description="SGLD natural degradation of the target (honest-scale sections, spd degrade)"
    )
    wandb: WandbConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _apd_defaults(cls, data: Any) -> Any:
        # APD has no delta component (its components must sum to W through the faithfulness loss).
        if isinstance(data, dict) and data.get("method") == "apd":
            dec = data.get("decomposition")
            if isinstance(dec, dict) and "delta_component" not in dec:
                data = data | {"decomposition": dec | {"delta_component": False}}
        return data

    @model_validator(mode="after")
    def _needs_reconstruction(self) -> Config:
        names = {loss.name for loss in self.losses}
        recon = {"stochastic_recon", "ci_masked_recon", "pgd_recon", "persistent_pgd_recon"}
        if not names & recon:
            raise ValueError(f"losses must include a reconstruction loss (one of {sorted(recon)})")
        return self

    @model_validator(mode="after")
    def _cuda_graph(self) -> Config:
        if self.train.cuda_graph:
            from spd.graphs import graph_unsupported

            why = graph_unsupported(self)
            if why:
                raise ValueError(why)
        return self

    @model_validator(mode="after")
    def _merge(self) -> Config:
        if self.train.merge is None:
            return self
        if self.method != "spd":
            raise ValueError("train.merge folds rank-1 subcomponents (method spd); remove it for method apd")
        bad = [s for s in self.train.merge.at if not 0 <= s < self.train.steps]
        if bad:
            raise ValueError(f"train.merge.at: steps {bad} are not in [0, train.steps) = [0, {self.train.steps})")
        if self.train.cuda_graph:
            raise ValueError("train.cuda_graph does not cover train.merge (a merge edits weights between steps)")
        return self

    @model_validator(mode="after")
    def _method(self) -> Config:
        if self.method == "spd":
            if self.apd is not None:
                raise ValueError("apd: settings are only used with method: apd")
            return self
        if self.apd is None:
            raise ValueError("method apd needs an `apd:` section with at least topk (e.g. apd: {topk: 1.0})")
        if self.decomposition.delta_component:
            raise ValueError("decomposition.delta_component must be false with method apd (APD has no delta)")
        if self.decomposition.init != "random":
            raise ValueError("decomposition.init 'data' is for method spd's rank-1 subcomponents; use 'random'")
        Cs = {m.C for m in self.decomposition.modules}
        if len(Cs) != 1:
            raise ValueError(
                f"decomposition.modules: with method apd every entry needs the same C (an APD component spans "
                f"all decomposed matrices); got {sorted(Cs)}"
            )
        no_grad = {c.name for c in self.losses} & {"importance_minimality", "smooth_l0"}
        if no_grad:
            raise ValueError(
                f"losses: {sorted(no_grad)} penalise CI-function outputs, which method apd does not have (its "
                "importances are top-k indicators); use schatten for simplicity and ci_masked_recon for minimality"
            )
        if self.apd.split is not None:
            bad = [s for s in self.apd.split.at if not 0 <= s < self.train.steps]
            if bad:
                raise ValueError(f"apd.split.at: steps {bad} are not in [0, train.steps) = [0, {self.train.steps})")
            if self.train.cuda_graph:
                raise ValueError("train.cuda_graph does not cover apd.split (a split edits weights between steps)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Load and validate a config from a YAML path or a dict, after applying `--set` overrides."""
    if isinstance(source, dict):
        data, where = source, "dict"
    else:
        data, where = read_yaml(source), str(source)
    if overrides:
        data = apply_overrides(data, overrides)
        where += " with overrides " + " ".join(overrides)
    return validate(Config, data, where)


__all__ = ["Config", "ConfigError", "load_config"]
