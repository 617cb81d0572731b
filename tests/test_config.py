from pathlib import Path

import pytest

from spd.base_config import ConfigError
from spd.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TMS = ROOT / "configs" / "tms_5-2.yaml"


def test_shipped_configs_validate():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_unknown_key_names_the_field(tmp_path):
    text = TMS.read_text().replace("batch_size: 4096\n  lr", "batch_sise: 4096\n  lr")
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml")
    msg = str(err.value)
    assert "train.batch_sise: unknown field" in msg and "train.batch_size: required field is missing" in msg


def test_bad_values_name_field_and_valid_choices():
    with pytest.raises(ConfigError, match=r"train.steps: Input should be greater than 0 \(got -5\)"):
        load_config(TMS, ["train.steps=-5"])
    with pytest.raises(ConfigError, match=r"decomposition.sigmoid: Input should be 'leaky_hard'"):
        load_config(TMS, ["decomposition.sigmoid=tanh"])
    with pytest.raises(ConfigError, match=r"losses.0.*routing"):
        load_config(TMS, ["losses.0.routing=sideways"])
    with pytest.raises(ConfigError, match=r"decomposition.modules.0.C"):
        load_config(TMS, ["decomposition.modules.0.C=0"])
    with pytest.raises(ConfigError, match="target.factory.*package.module:function"):
        load_config(TMS, ["target.factory=toy_models.tms"])
    with pytest.raises(ConfigError, match=r"train.lr: .*warmup_frac \(0.5\) \+ decay_frac \(0.6\) exceed 1"):
        load_config(TMS, ["train.lr.schedule=wsd", "train.lr.warmup_frac=0.5", "train.lr.decay_frac=0.6"])


def test_overrides():
    cfg = load_config(TMS, ["train.steps=123", "losses.2.coeff=0.5", "decomposition.ci_fn.hidden=[8, 8]"])
    assert cfg.train.steps == 123 and cfg.losses[2].coeff == 0.5 and cfg.decomposition.ci_fn.hidden == [8, 8]
    with pytest.raises(ConfigError, match="not a valid index"):
        load_config(TMS, ["losses.9.coeff=1"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config(TMS, ["train.steps"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_yaml_round_trip(tmp_path):
    cfg = load_config(TMS)
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "c.yaml") == cfg
