"""Small configs for tests (kept out of conftest so tests can import them by name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_tms_config(**train: Any) -> dict[str, Any]:
    """TMS 5-2 with a quickly trained target and a few decomposition steps."""
    cfg = yaml.safe_load((ROOT / "configs" / "tms_5-2.yaml").read_text())
    cfg["target"]["kwargs"].update(train_steps=300, require_all_represented=False)
    defaults = {"steps": 30, "batch_size": 64, "log_every": 5, "checkpoint_every": 10,
                "faithfulness_warmup": {"steps": 5}, "compile": False}  # fmt: skip
    cfg["train"].update({**defaults, **train})
    cfg["eval"] = {"batch_size": 128, "n_batches": 1}
    return cfg
