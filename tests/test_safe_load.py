"""Foreign checkpoints are read without executing code; refusals and key checks are clear."""

import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch

from osdface.safe_load import UnsafeCheckpointError, load_torch_checkpoint
from osdface.weights import load_official_adapter_state_dict, load_official_vre_state_dict


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_lightning_style_checkpoint_with_namespace_loads(tmp_path):
    ckpt = {
        "state_dict": {"vqvae_LQ.quant_conv.weight": torch.arange(6.0).view(2, 3, 1, 1)},
        "hyper_parameters": argparse.Namespace(lr=1e-4, name="x"),
        "epoch": 2,
    }
    torch.save(ckpt, tmp_path / "a.ckpt")
    loaded = load_torch_checkpoint(tmp_path / "a.ckpt")
    assert torch.equal(loaded["state_dict"]["vqvae_LQ.quant_conv.weight"], torch.arange(6.0).view(2, 3, 1, 1))
    assert loaded["epoch"] == 2
    hp = loaded["hyper_parameters"]
    assert type(hp).__name__ == "Namespace" and not isinstance(hp, argparse.Namespace)  # inert stand-in


@pytest.mark.parametrize("zip_format", [True, False])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Evil(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_torch_checkpoint(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_plain_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UnsafeCheckpointError):
        load_torch_checkpoint(path)
    assert not marker.exists()


def test_official_vre_file_filter_and_strict_keys(official_layout, tiny_vre_config):
    from osdface.models.prompt_encoder import VisualPromptEncoder

    _, weights = official_layout
    expected = VisualPromptEncoder(**tiny_vre_config).state_dict()
    sd = load_official_vre_state_dict(weights / "associate_2.ckpt", expected=expected)
    assert set(sd) == set(expected)  # decoder, post_quant_conv, HQ branch and logit_scale dropped

    broken = dict(torch.load(weights / "associate_2.ckpt", weights_only=False)["state_dict"])  # test's own file
    del broken["vqvae_LQ.encoder.conv_in.weight"]
    broken["vqvae_LQ.encoder.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": broken}, weights.parent / "broken.ckpt")
    with pytest.raises(ValueError) as e:
        load_official_vre_state_dict(weights.parent / "broken.ckpt", expected=expected)
    msg = str(e.value)
    assert "broken.ckpt" in msg and "encoder.conv_in.weight" in msg and "encoder.extra.weight" in msg


def test_adapter_shape_mismatch_named(tmp_path):
    from osdface.models.prompt_encoder import PromptAdapter

    torch.save(PromptAdapter(16, 24).state_dict(), tmp_path / "embedding_change_weights.pth")
    with pytest.raises(ValueError, match=r"embedding_change_weights.pth.*conv1.weight"):
        load_official_adapter_state_dict(tmp_path / "embedding_change_weights.pth",
                                         expected=PromptAdapter(512, 1024).state_dict())


def test_missing_files_name_what_and_where(tmp_path, official_layout):
    from osdface.pipelines import OSDFacePipeline
    from osdface.weights import WeightsNotFoundError

    base, _ = official_layout
    empty = tmp_path / "OSDFace"
    empty.mkdir()
    with pytest.raises(WeightsNotFoundError) as e:
        OSDFacePipeline.from_official(base, empty)
    msg = str(e.value)
    for name in ("associate_2.ckpt", "embedding_change_weights.pth", "pytorch_lora_weights.safetensors"):
        assert name in msg
    assert str(empty) in msg
    with pytest.raises(WeightsNotFoundError, match=r"unet/.*vae/|missing scheduler/"):
        OSDFacePipeline.from_official(tmp_path, empty)
    with pytest.raises(WeightsNotFoundError, match="model_index.json"):
        OSDFacePipeline.from_pretrained(tmp_path)


def test_no_network_imports_in_library():
    src = Path(__file__).parents[1] / "src" / "osdface"
    text = "\n".join(p.read_text() for p in src.rglob("*.py"))
    for bad in ("hf_hub_download", "snapshot_download", "urlretrieve", "load_state_dict_from_url", "torch.hub.load"):
        assert bad not in text, bad


def test_official_files_are_each_read_once(official_layout, monkeypatch):
    import osdface.safe_load as sl  # osdface.weights imports its reader from here at call time
    from osdface.pipelines import OSDFacePipeline

    reads = []
    real = sl.load_torch_checkpoint
    monkeypatch.setattr(sl, "load_torch_checkpoint", lambda p: reads.append(Path(p).name) or real(p))
    OSDFacePipeline.from_official(*official_layout)
    assert sorted(reads) == ["associate_2.ckpt", "embedding_change_weights.pth"]


def test_legacy_and_protocol2_builtins_still_load(tmp_path):
    """Plain legacy (non-zip) files load; our own reader maps protocol-2 ``__builtin__`` names."""
    torch.save({"w": torch.arange(3.0)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(load_torch_checkpoint(tmp_path / "legacy.pth")["w"], torch.arange(3.0))
    ckpt = {"state_dict": {"w": torch.ones(2, 3).t()}, "hp": argparse.Namespace(a=1), "tags": {"x", "y"},
            "blob": bytearray(b"ab")}
    torch.save(ckpt, tmp_path / "p2.ckpt", pickle_protocol=2)
    loaded = load_torch_checkpoint(tmp_path / "p2.ckpt")
    assert loaded["tags"] == {"x", "y"} and loaded["blob"] == bytearray(b"ab")
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(3, 2))  # a permuted (transposed) view is fine
