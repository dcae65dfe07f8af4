"""osdface.io.model_folders: the one reader/writer of SD base folders, LoRA folders, the official
layout and model folders (issue 13), and osdface.io.names: every file name once."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from osdface.errors import ModelFileError, WeightsNotFoundError
from osdface.io import model_folders as mf
from osdface.io import names
from osdface.models.prompt_encoder import PromptAdapter
from osdface.testing import tiny_components, tiny_lora_state_dict, tiny_unet


def _lora_unet(seed=0):
    """A tiny UNet with an unmerged peft LoRA attached (rank 4)."""
    unet = tiny_unet(seed)
    lora = mf.LoraWeights(names.LORA_WEIGHTS_NAME, tiny_lora_state_dict(unet, seed))
    mf.apply_lora(unet, lora, fuse=False)
    return unet


def _forward(unet):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(z, 399, encoder_hidden_states=ctx).sample


def test_names_are_the_released_and_written_ones(official_layout, tmp_path):
    base, weights = official_layout
    assert sorted(p.name for p in weights.iterdir()) == sorted(names.OFFICIAL_FILES)
    for sub, config in names.BASE_MODEL_SUBFOLDERS.items():
        assert (base / sub / config).is_file()
    from osdface.pipelines import OSDFacePipeline

    pipe = OSDFacePipeline.from_official(base, weights, fuse_lora=False)
    out = pipe.save_pretrained(tmp_path / "m", fuse_lora=False)
    assert (out / names.MODEL_INDEX).is_file()
    for name in names.WEIGHTED_COMPONENTS:
        assert (out / name / names.COMPONENT_CONFIG_NAMES[name]).is_file()
        assert (out / name / names.WEIGHTS_NAME).is_file()
    assert (out / names.SCHEDULER / names.SCHEDULER_CONFIG_NAME).is_file()
    assert (out / names.LORA_SUBFOLDER / names.LORA_WEIGHTS_NAME).is_file()
    assert (out / names.LORA_SUBFOLDER / names.LORA_CONFIG_NAME).is_file()


def test_old_homes_of_the_names_still_import():
    from osdface.pipelines.pipeline_osdface import LORA_SUBFOLDER, LORA_WEIGHTS_NAME
    from osdface.training.checkpoint import WEIGHTS_NAME
    from osdface.weights import BASE_MODEL_SUBFOLDERS, OFFICIAL_FILES, OFFICIAL_VRE_FILE

    assert (LORA_SUBFOLDER, LORA_WEIGHTS_NAME) == (names.LORA_SUBFOLDER, names.LORA_WEIGHTS_NAME)
    assert WEIGHTS_NAME == names.WEIGHTS_NAME and OFFICIAL_VRE_FILE == names.OFFICIAL_VRE_FILE
    assert OFFICIAL_FILES == names.OFFICIAL_FILES and BASE_MODEL_SUBFOLDERS == names.BASE_MODEL_SUBFOLDERS


def test_lora_folder_round_trip_and_one_adapter_config(tmp_path):
    """The pipeline's unet_lora/ and the training checkpoint's are written by the same function."""
    from osdface.training.generator import LoraFolder

    unet = _lora_unet()
    assert LoraFolder(unet).config() == mf.lora_adapter_config(unet)
    cfg = mf.lora_adapter_config(unet)
    assert cfg["format"] == "peft" and cfg["key_prefix"] == names.LORA_KEY_PREFIX and cfg["r"] == 4
    LoraFolder(unet).save_pretrained(tmp_path / "ckpt_lora")
    mf.write_lora_folder(tmp_path / "lora", unet)
    for d in ("ckpt_lora", "lora"):
        assert json.loads((tmp_path / d / names.LORA_CONFIG_NAME).read_text()) == cfg
    read = mf.read_lora_folder(tmp_path / "lora")
    assert read.alpha == cfg["lora_alpha"] and read.file == tmp_path / "lora" / names.LORA_WEIGHTS_NAME
    expected = mf.lora_state_dict(unet)
    assert sorted(read.state_dict) == sorted(expected)
    assert all(k.startswith(names.LORA_KEY_PREFIX) for k in expected)
    assert all(torch.equal(read.state_dict[k], expected[k]) for k in expected)


def test_read_lora_folder_names_what_is_missing(tmp_path):
    mf.write_lora_folder(tmp_path / "lora", _lora_unet())
    (tmp_path / "lora" / names.LORA_CONFIG_NAME).unlink()
    with pytest.raises(WeightsNotFoundError, match=rf"lora: LoRA folder is incomplete, missing {names.LORA_CONFIG_NAME}"):
        mf.read_lora_folder(tmp_path / "lora")


def test_apply_lora_merged_equals_attached():
    base = tiny_unet(0)
    lora = mf.LoraWeights(names.LORA_WEIGHTS_NAME, tiny_lora_state_dict(base, 0))
    merged, attached = tiny_unet(0), tiny_unet(0)
    mf.apply_lora(merged, lora, fuse=True)
    mf.apply_lora(attached, lora, fuse=False)
    assert not getattr(merged, "peft_config", None) and attached.peft_config
    torch.testing.assert_close(_forward(merged), _forward(attached), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_forward(merged), _forward(base))


def test_official_layout_round_trip(tmp_path):
    from osdface.weights import load_official_adapter_state_dict, load_official_vre_state_dict

    c = tiny_components(0)
    unet = _lora_unet()
    lora = mf.lora_state_dict(unet, torch.float32)
    assert mf.official_layout_taken(tmp_path / "out") == []
    paths = mf.write_official_layout(c["vre"], c["prompt_adapter"], lora, tmp_path / "out")
    assert [p.name for p in paths] == list(names.OFFICIAL_FILES)
    assert mf.official_layout_taken(tmp_path / "out") == list(names.OFFICIAL_FILES)
    vre_sd = load_official_vre_state_dict(paths[0], expected=c["vre"].state_dict())
    assert all(torch.equal(vre_sd[k], v) for k, v in c["vre"].state_dict().items())
    adapter = mf.read_official_adapter(paths[1], c["vre"].config.embed_dim, unet.config.cross_attention_dim)
    assert isinstance(adapter, PromptAdapter)
    assert all(torch.equal(adapter.state_dict()[k], v) for k, v in c["prompt_adapter"].state_dict().items())
    assert load_official_adapter_state_dict(paths[1]).keys() == c["prompt_adapter"].state_dict().keys()
    got = mf.read_lora_file(paths[2])
    assert got.alpha is None and all(torch.equal(got.state_dict[k], v) for k, v in lora.items())


def test_official_adapter_with_wrong_keys_names_the_file(tmp_path):
    c = tiny_components(0)
    path = tmp_path / names.OFFICIAL_ADAPTER_FILE
    torch.save({"conv1.weight": torch.zeros(1), "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ModelFileError, match=rf"{names.OFFICIAL_ADAPTER_FILE}: not the OSDFace prompt adapter") as e:
        mf.read_official_adapter(path, c["vre"].config.embed_dim, c["unet"].config.cross_attention_dim)
    assert all(p in str(e.value) for p in ("missing", "unexpected ['extra.weight']", "conv1.weight (1,) != "))


def test_base_model_checks_are_shared_by_pipeline_and_training(official_layout, tmp_path):
    """A base folder whose UNet declares more than its file holds: one message from every reader."""
    from osdface.pipelines import OSDFacePipeline
    from osdface.training.generator import load_base_model

    base, weights = official_layout
    bad = tmp_path / "sd"
    shutil.copytree(base, bad)
    cfg_file = bad / names.UNET / names.CONFIG_NAME
    cfg = json.loads(cfg_file.read_text())
    cfg["block_out_channels"] = [4096, 4096]
    cfg_file.write_text(json.dumps(cfg))
    messages = []
    for read in (lambda: mf.check_base_model(bad), lambda: load_base_model(bad),
                 lambda: OSDFacePipeline.from_official(bad, weights)):
        with pytest.raises(ModelFileError, match="declares a UNet of") as e:
            read()
        messages.append(str(e.value))
    assert len(set(messages)) == 1 and messages[0].startswith(str(cfg_file))


def test_base_model_timestep_and_latent_checks(official_layout, tmp_path):
    base, _ = official_layout
    parts = mf.load_base_model(base)
    assert sorted(parts) == [names.SCHEDULER, names.UNET, names.VAE]
    bad = tmp_path / "sd"
    shutil.copytree(base, bad)
    sched = bad / names.SCHEDULER / names.SCHEDULER_CONFIG_NAME
    cfg = json.loads(sched.read_text())
    cfg["num_train_timesteps"] = 100
    sched.write_text(json.dumps(cfg))
    mf.check_base_model(bad)  # no timestep asked for
    with pytest.raises(ModelFileError, match="does not include OSDFace's timestep 399"):
        mf.check_base_model(bad, timestep=399)


def test_load_module_folder_refuses_before_building(tmp_path):
    adapter = PromptAdapter(32, 64)
    adapter.save_pretrained(tmp_path / "a")
    assert isinstance(mf.load_module_folder(PromptAdapter, tmp_path / "a", "prompt adapter"), PromptAdapter)
    cfg_file = tmp_path / "a" / names.CONFIG_NAME
    cfg = json.loads(cfg_file.read_text())
    cfg["out_channels"] = 4096
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="declares a prompt adapter of .* MiB of weights"):
        mf.load_module_folder(PromptAdapter, tmp_path / "a", "prompt adapter")
    cfg_file.unlink()
    with pytest.raises(WeightsNotFoundError, match="prompt adapter config not found"):
        mf.load_module_folder(PromptAdapter, tmp_path / "a", "prompt adapter")


def test_model_folder_round_trip(official_layout, tmp_path):
    from osdface.pipelines import OSDFacePipeline

    base, weights = official_layout
    pipe = OSDFacePipeline.from_official(base, weights, fuse_lora=False)
    path = mf.write_model_folder(tmp_path / "m", vae=pipe.vae, unet=pipe.unet, vre=pipe.vre,
                                 prompt_adapter=pipe.prompt_adapter, scheduler=pipe.scheduler,
                                 timestep=pipe.timestep, resolution=pipe.resolution, fuse_lora=False)
    folder = mf.read_model_folder(path)
    assert (folder.timestep, folder.resolution) == (pipe.timestep, pipe.resolution)
    assert folder.lora is not None and folder.lora.file == path / names.LORA_SUBFOLDER / names.LORA_WEIGHTS_NAME
    index = json.loads((path / names.MODEL_INDEX).read_text())
    assert index["_class_name"] == names.PIPELINE_CLASS_NAME
    assert {k: tuple(index[k]) for k in mf.COMPONENT_CLASSES} == mf.COMPONENT_CLASSES
    unet_sd = load_file(str(path / names.UNET / names.WEIGHTS_NAME))
    assert not any("lora" in k for k in unet_sd)
