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


def test_degradation_is_a_nested_typed_section(tmp_path):
    from osdface.data.degradation import PRESETS, DegradationConfig

    # shipped configs name a preset: the section resolves to it (the same degradations as before)
    for name in ("vre-paper.yaml", "vre-tiny.yaml"):
        assert load_vre_config(CONFIGS / name).data.degradation == PRESETS["daefr"]
    assert VREExperiment().data.degradation == PRESETS["daefr"]
    base = CONFIGS / "vre-tiny.yaml"
    cfg = load_vre_config(base, ["data.degradation.blur_sigma=[0.1,10]", "data.degradation.jpeg_range=[30, 40]"])
    assert isinstance(cfg.data.degradation, DegradationConfig)
    assert cfg.data.degradation.jpeg_range == (30, 40) and cfg.data.degradation.kernel_size == 41
    assert load_vre_config(base, ["data.degradation=osediff-face"]).data.degradation == PRESETS["osediff-face"]
    # a preset set first, then one field of it
    cfg = load_vre_config(base, ["data.degradation=osediff-face", "data.degradation.jpeg_range=null"])
    assert cfg.data.degradation.jpeg_range is None and cfg.data.degradation.blur_sigma == (1.0, 15.0)
    # a mapping with preset + overrides, and a degradation YAML path
    p = tmp_path / "exp.yaml"
    p.write_text("data:\n  degradation: {preset: osediff-face, gray_prob: 0.1}\n")
    cfg = load_vre_config(p)
    assert cfg.data.degradation.gray_prob == 0.1 and cfg.data.degradation.downsample_range == (1.0, 30.0)
    cfg = load_vre_config(p, ["data.degradation.gray_prob=0.2"])
    assert cfg.data.degradation.gray_prob == 0.2 and cfg.data.degradation.downsample_range == (1.0, 30.0)
    p.write_text(f"data:\n  degradation: {CONFIGS / 'degradations' / 'osediff-face.yaml'}\n")
    assert load_vre_config(p).data.degradation == PRESETS["osediff-face"]
    # the resolved config shows the full section and loads back to the same config
    text = dump_yaml(cfg)
    assert yaml.safe_load(text)["data"]["degradation"]["downsample_range"] == [1.0, 30.0]
    assert from_dict(VREExperiment, yaml.safe_load(text)) == cfg


@pytest.mark.parametrize("override, message", [
    ("data.degradation=strong", r"data\.degradation: unknown degradation preset 'strong'; choose from"),
    ("data.degradation.sigma=1", r"unknown config key 'data\.degradation\.sigma' \(did you mean 'blur_sigma'\?\)"),
    ("data.degradation.blur_sigma=[5, 1]", r"data\.degradation\.blur_sigma: low 5 is above high 1"),
    ("data.degradation.blur_sigma=[0, 1]", r"data\.degradation\.blur_sigma\[0\] must be ≥ 1e-06, got 0"),
    ("data.degradation.jpeg_range=[1, 2, 3]", r"data\.degradation\.jpeg_range: expected 2 items, got 3"),
    ("data.degradation.kernel_size=40", r"data\.degradation\.kernel_size must be odd, got 40"),
    ("data.degradation={preset: nope}", r"data\.degradation\.preset: unknown degradation preset 'nope'"),
])
def test_bad_degradation_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_vre_config(CONFIGS / "vre-tiny.yaml", [override])


def test_bad_degradation_in_a_file_names_the_file_and_key(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("data:\n  degradation:\n    preset: daefr\n    gray_prob: 2\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: data\.degradation\.gray_prob must be ≤ 1, got 2"):
        load_vre_config(p)
    deg = tmp_path / "deg.yaml"
    deg.write_text("blur_sigmaa: [1, 2]\n")
    p.write_text(f"data:\n  degradation: {deg}\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: data\.degradation: .*deg\.yaml: unknown config key 'blur_sigmaa'"):
        load_vre_config(p)
