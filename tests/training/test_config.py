"""Experiment configs: YAML → frozen typed dataclasses, dotted overrides, unknown keys and type errors."""

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from osdface.training.config import ConfigError, dump_yaml, from_dict, load_config, to_dict
from osdface.training.vre import VREExperiment, load_vre_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_are_the_paper_recipe():
    cfg = VREExperiment()
    assert (cfg.model.vqgan.n_embed, cfg.model.vqgan.embed_dim) == (1024, 512)
    assert cfg.model.vqgan.ch_mult == (1, 2, 2, 2, 4, 8) and cfg.model.vqgan.input_normalization == "official"
    assert cfg.optim.betas == (0.5, 0.9)
    assert cfg.loss.vq_beta == 0.25 and cfg.loss.gan == 0.8 and cfg.loss.gan_kind == "hinge"
    assert math.isclose(math.exp(cfg.loss.assoc_logit_scale_init), 1 / 0.07)
    assert (cfg.model.discriminator.ndf, cfg.model.discriminator.n_layers) == (64, 3)


def test_shipped_configs_load_and_paper_yaml_matches_defaults():
    paper = load_vre_config(CONFIGS / "vre-paper.yaml")
    default = VREExperiment()
    assert paper.model == default.model and paper.loss == default.loss and paper.optim == default.optim
    tiny = load_vre_config(CONFIGS / "vre-tiny.yaml")
    from osdface.testing import TINY_VRE_CONFIG

    # what the exported VRE needs to plug into osdface.testing.tiny_components()
    assert tiny.model.vqgan.embed_dim == TINY_VRE_CONFIG["embed_dim"]
    assert tiny.model.vqgan.resolution == TINY_VRE_CONFIG["resolution"] == tiny.data.size


def test_frozen():
    cfg = VREExperiment()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 3


def test_overrides_are_typed():
    cfg = load_vre_config(CONFIGS / "vre-tiny.yaml", [
        "optim.lr=1e-4",                 # YAML 1.1 reads this as a string; float fields accept it
        "train.batch_size=3",
        "model.vqgan.ch_mult=[1, 2]",
        "loss.adaptive_gan_weight=false",
        "model.init_hq=/some/run",
        "phase=lq",
        "train.mixed_precision=no",      # YAML 1.1 reads "no" as false
    ])
    assert cfg.train.mixed_precision == "no"
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.batch_size == 3
    assert cfg.model.vqgan.ch_mult == (1, 2)
    assert cfg.loss.adaptive_gan_weight is False
    assert cfg.model.init_hq == "/some/run"
    assert cfg.phase == "lq"
    # untouched values come from the file, not the defaults
    assert cfg.model.vqgan.n_embed == 16


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "did you mean 'lr'"),
    ("modle.vqgan.ch=32", "did you mean 'model'"),
    ("model.vqgan.ch.x=1", "is not a section"),
    ("train.batch_size=2.5", "expected an integer"),
    ("train.batch_size=two", "expected an integer"),
    ("loss.adaptive_gan_weight=1", "expected true/false"),
    ("phase=stage3", "is not one of"),
    ("model.vqgan.ch_mult=4", "expected a list"),
    ("optim.betas=[0.5]", "expected 2 items"),
    ("train.max_steps=0", "must be ≥ 1"),
    ("no_equals_sign", "key.sub=value"),
])
def test_bad_overrides_raise(override, message):
    with pytest.raises(ConfigError, match=message):
        load_vre_config(CONFIGS / "vre-tiny.yaml", [override])


def test_unknown_key_in_file_raises(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("phase: hq\nloss:\n  l1: 1.0\n  lpisp: 2.0\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'loss.lpisp' \(did you mean 'lpips'\?\)"):
        load_vre_config(p)
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_vre_config(p)
    with pytest.raises(FileNotFoundError):
        load_vre_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips():
    cfg = load_vre_config(CONFIGS / "vre-tiny.yaml", ["optim.betas=[0.9, 0.99]", "model.init_lq=x"])
    text = dump_yaml(cfg)
    again = from_dict(VREExperiment, yaml.safe_load(text))
    assert again == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.99]


def test_generic_loader_on_another_schema(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Inner:
        ratio: float | None = None
        tags: dict[str, int] = dataclasses.field(default_factory=dict)

    @dataclasses.dataclass(frozen=True)
    class Outer:
        inner: Inner = dataclasses.field(default_factory=Inner)
        name: str = "x"

    p = tmp_path / "c.yaml"
    p.write_text("inner: {ratio: 2, tags: {a: 1}}\n")
    cfg = load_config(Outer, p, ["inner.tags={b: 2}", "name=run"])
    assert cfg.inner.ratio == 2.0 and isinstance(cfg.inner.ratio, float)
    assert cfg.inner.tags == {"b": 2} and cfg.name == "run"
    assert load_config(Outer, p, ["inner.ratio=null"]).inner.ratio is None
    with pytest.raises(ConfigError, match="inner.tags.a"):
        load_config(Outer, p, ["inner.tags={a: x}"])
