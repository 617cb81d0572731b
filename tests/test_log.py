import importlib.util
import json
import sys

import pytest

from spd.config import WandbConfig
from spd.log import MetricsLog, read_metrics, truncate_after


def test_jsonl_rows_and_truncation(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in range(5):
        log(step, {"loss": 1.0 / (step + 1), "bad": float("nan")})
    rows = read_metrics(tmp_path / "m.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and rows[1]["loss"] == 0.5 and rows[0]["bad"] == "nan"
    truncate_after(tmp_path / "m.jsonl", 2)
    assert [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_wandb_disabled_is_never_imported(tmp_path):
    MetricsLog(tmp_path / "m.jsonl", WandbConfig(mode="disabled"))(0, {"a": 1.0})
    assert "wandb" not in sys.modules


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_requested_but_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ImportError, match=r"pip install -e '.\[wandb\]'"):
        MetricsLog(tmp_path / "m.jsonl", WandbConfig(mode="offline"))
