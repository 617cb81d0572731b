"""spd: parameter decomposition for interpretability.

The algorithm lives in four files: components.py (rank-1 subcomponents), ci.py + sigmoids.py (causal
importance), losses.py (faithfulness, stochastic reconstruction, importance minimality), train.py (the loop).
Public names are imported lazily so that `spd --help` does not pay for importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ComponentModel": "spd.model",
    "ModuleSpec": "spd.model",
    "CIConfig": "spd.ci",
    "Config": "spd.config",
    "load_config": "spd.config",
    "ConfigError": "spd.base_config",
    "Task": "spd.task",
    "Run": "spd.run",
    "decompose": "spd.run",
    "resume": "spd.run",
    "load_run": "spd.run",
    "train": "spd.train",
    "evaluate": "spd.evals",
    "make_masks": "spd.masks",
    "Mechanism": "spd.mechanisms",
    "Grouping": "spd.mechanisms",
    "group_model": "spd.mechanisms",
    "load_grouping": "spd.mechanisms",
    "subset_masks": "spd.masks",
    "Rule": "spd.ablate",
    "select_by_data": "spd.ablate",
    "edited_target": "spd.ablate",
    "unlearning_study": "spd.unlearning",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'spd' has no attribute {name!r}")
