"""VQ autoencoder and PatchGAN discriminator of stage 1."""

import json
from pathlib import Path

import pytest
import torch

from osdface.models.discriminator import NLayerDiscriminator
from osdface.models.prompt_encoder import VisualPromptEncoder
from osdface.models.vqgan import VQAutoencoder
from osdface.testing import TINY_VRE_CONFIG

SHAPES = Path(__file__).resolve().parents[1] / "data" / "vre_state_dict_shapes.json"
TINY = {k: v for k, v in TINY_VRE_CONFIG.items() if k != "num_tokens"}


def test_paper_vqgan_vre_keys_match_the_official_layout():
    table = json.loads(SHAPES.read_text())
    key = next(k for k, v in table.items() if isinstance(v, dict) and "quant_conv.weight" in v)
    with torch.device("meta"):
        model = VQAutoencoder()
    vre = {k: tuple(v.shape) for k, v in model.vre_state_dict().items()}
    assert vre == {k: tuple(s) for k, s in table[key].items()}
    assert len(vre) == 173
    assert model.codebook.shape == (1024, 512)


def test_quantizer_picks_nearest_code_and_passes_gradients():
    torch.manual_seed(0)
    m = VQAutoencoder(**TINY)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = m(x)
    r = 64 // 2 ** (len(TINY["ch_mult"]) - 1)
    assert out.recon.shape == x.shape and out.h.shape == (2, 32, r, r) and out.indices.shape == (2, r, r)
    flat = out.h.permute(0, 2, 3, 1).reshape(-1, 32)
    brute = torch.cdist(flat, m.codebook).argmin(1)
    assert torch.equal(out.indices.reshape(-1), brute)
    assert torch.allclose(out.codes.permute(0, 2, 3, 1).reshape(-1, 32), m.codebook[brute])
    out.recon.mean().backward()
    # every trainable parameter but the dictionary takes part in the forward (DDP relies on it);
    # the attention blocks' norm2 (cross-attention only) is frozen
    unused = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None and "quantize" not in n]
    assert unused == []
    assert all(not p.requires_grad for n, p in m.named_parameters() if ".norm2." in n and ".attn" in n)
    # straight-through: the encoder gets a gradient through the quantiser
    assert m.encoder.conv_in.weight.grad.abs().sum() > 0
    assert m.codebook.grad is None or m.codebook.grad.abs().sum() == 0  # only the VQ loss moves codes


def test_input_normalisation_matches_the_vre():
    torch.manual_seed(1)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    for norm in ("official", "standard"):
        m = VQAutoencoder(**TINY, input_normalization=norm)
        vre = m.to_visual_prompt_encoder(num_tokens=8)
        assert isinstance(vre, VisualPromptEncoder) and vre.config.input_normalization == norm
        assert torch.allclose(vre.encode_features(x), m.encode(x), atol=1e-6)
    a = VQAutoencoder(**TINY, input_normalization="official")
    b = VQAutoencoder(**TINY, input_normalization="standard")
    b.load_state_dict(a.state_dict())
    assert torch.allclose(a.encode(x), b.encode(2 * x - 1), atol=1e-5)


def test_vqgan_and_discriminator_round_trip(tmp_path):
    torch.manual_seed(2)
    m = VQAutoencoder(**TINY)
    m.save_pretrained(tmp_path / "vq")
    m2 = VQAutoencoder.from_pretrained(tmp_path / "vq")
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(m(x).recon, m2(x).recon)
    d = NLayerDiscriminator(ndf=16, n_layers=2).eval()
    d.save_pretrained(tmp_path / "d")
    d2 = NLayerDiscriminator.from_pretrained(tmp_path / "d").eval()
    assert torch.equal(d(x), d2(x))


@pytest.mark.parametrize("n_layers, norm", [(3, "batch"), (2, "group"), (1, "none")])
def test_patchgan_shapes_and_gradients(n_layers, norm):
    d = NLayerDiscriminator(ndf=32, n_layers=n_layers, norm=norm)
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    y = d(x)
    # stride-2 layers: n_layers; then two stride-1 4x4 convs (each −1)
    side = 64 // 2**n_layers - 2
    assert y.shape == (2, 1, side, side)
    y.mean().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in d.parameters())
    with pytest.raises(ValueError, match="unknown norm"):
        NLayerDiscriminator(norm="instance")


def test_paper_discriminator_matches_taming_layout():
    # taming NLayerDiscriminator(3, 64, 3, BatchNorm): conv 3→64 (+bias), 64→128, 128→256 (stride 2, no
    # bias, BN), 256→512 (stride 1, no bias, BN), 512→1 (+bias); keys main.<i>.* as in taming/DAEFR
    d = NLayerDiscriminator()
    expected = (3 * 64 * 16 + 64) + (64 * 128 * 16 + 256) + (128 * 256 * 16 + 512) + (256 * 512 * 16 + 1024) \
        + (512 * 16 + 1)
    assert sum(p.numel() for p in d.parameters()) == expected == 2_765_633
    keys = set(d.state_dict())
    assert {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.running_mean", "main.11.weight",
            "main.11.bias"} <= keys
