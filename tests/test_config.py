"""Config loading: presets, YAML mirrors, overrides and validation."""

from pathlib import Path

import pytest

from latentdiff.errors import ConfigError
from latentdiff.pipeline.config import config_from_dict, load_config
from latentdiff.pipeline.presets import PRESETS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["demo", "fashion-mnist"])
def test_yaml_files_mirror_their_presets(name):
    assert load_config(CONFIGS / f"{name}.yaml").to_dict() == PRESETS[name]().validate().to_dict()


def test_overrides_are_typed():
    cfg = load_config(preset="tiny", overrides=["training.lr=5e-4", "unet.channel_mults=[1,2,3]",
                                                "diffusion.schedule=cosine", "data.limit=null", "conditional=false"])
    assert cfg.training.lr == 5e-4 and cfg.unet.channel_mults == (1, 2, 3)
    assert cfg.diffusion.schedule == "cosine" and cfg.data.limit is None and cfg.conditional is False


def test_round_trip_through_dict():
    cfg = load_config(preset="demo")
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override,needle", [
    ("training.steps=0", "training.steps must be >= 1"),
    ("training.steps=1.5", "must be an integer"),
    ("training.steps=true", "must be an integer"),
    ("diffusion.schedule=quadratic", "diffusion.schedule must be one of"),
    ("diffusion.prediction=score", "diffusion.prediction must be one of"),
    ("autoencoder.factor=3", "autoencoder.factor must be one of"),
    ("unet.attention_levels=[5]", "attention_levels must index levels"),
    ("training.lr=abc", "must be a number"),
    ("training.lr=.inf", "must be finite"),
    ("nosuch=1", "unknown config key 'nosuch'"),
    ("training=3", "training must be a mapping"),
    (["diffusion.prediction=eps", "diffusion.zero_terminal_snr=true"], "needs prediction 'v'"),
    ("device=tpu", "device must be auto, cpu or cuda"),
    ("justakey", "must look like section.key=value"),
])
def test_bad_values_are_refused(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        load_config(preset="tiny", overrides=override if isinstance(override, list) else [override])


def test_bad_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("preset: huge\n")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config(tmp_path / "c.yaml")
