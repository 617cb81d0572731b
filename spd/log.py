"""Metrics sinks: metrics.jsonl in the run directory always; wandb only when a run asks for it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLog:
    """Appends one JSON object per call to `path` (if given) and forwards to wandb (if configured)."""

    def __init__(self, path: Path | None = None, wandb_cfg: Any = None, run_name: str = "", config: Any = None):
        self.path = path
        self._wandb = None
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            try:
                import wandb  # noqa: TID251  (optional dependency, imported only when asked for)
            except ImportError:
                raise ImportError(
                    "the config has a `wandb:` section but wandb is not installed; install it with "
                    "`pip install -e '.[wandb]'`, or remove the section (metrics.jsonl is always written)"
                ) from None

            self._wandb = wandb.init(
                project=wandb_cfg.project, mode=wandb_cfg.mode, name=run_name or None,
                config=config, dir=str(path.parent) if path else None,
            )  # fmt: skip

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def truncate_after(path: Path, step: int) -> None:
    """Drop rows logged after `step` (a resumed run re-logs them)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
