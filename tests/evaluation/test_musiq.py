"""MUSIQ port: released key layout, cross-implementation fixture (pyiqa 0.1.12), pre-processing.

Fixtures (``tests/evaluation/data``):

* ``musiq_keys.json``: key → shape table of pyiqa 0.1.12's ``MUSIQ()`` with the KonIQ settings
  (``num_class=1``), i.e. the layout of ``musiq_koniq_ckpt-e95806b9.pth``.
* ``musiq_tiny.safetensors`` / ``musiq_tiny.json``: float16 random weights of a tiny configuration
  of the same architecture (patch 8, hidden 16, 2 layers, hash grid 5, scales 24/40), uint8 test
  images, and the scores pyiqa's arch file (+ its ``multiscale_trans_util``) computed from them in
  float32. Tolerance: relative 1e-4 (plus 1e-6 absolute for scores near zero); the port matched
  bit-for-bit when the fixture was made.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from osdface.errors import ModelFileError
from osdface.evaluation.musiq import (
    MUSIQ,
    MUSIQMetric,
    build_musiq,
    hashed_positions,
    image_patches,
    multiscale_patches,
    resized_size,
)
from osdface.weights import WeightsNotFoundError

DATA = Path(__file__).parent / "data"
RTOL, ATOL = 1e-4, 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    from safetensors.torch import load_file

    meta = json.loads((DATA / "musiq_tiny.json").read_text())
    tensors = load_file(str(DATA / "musiq_tiny.safetensors"))
    weights = {k: v.float() for k, v in tensors.items() if not k.startswith(("image.", "dist."))}
    dist_head = {k[len("dist."):]: v.float() for k, v in tensors.items() if k.startswith("dist.")}
    images = {k[len("image."):]: v.float() / 255 for k, v in tensors.items() if k.startswith("image.")}
    return meta, weights, dist_head, images


@pytest.fixture(scope="module")
def key_table():
    return {k: tuple(v) for k, v in json.loads((DATA / "musiq_keys.json").read_text())["keys"].items()}


# ----------------------------------------------------------------------------------------------
# (1) released checkpoint layout
# ----------------------------------------------------------------------------------------------


#: keys whose loaded values are compared with the file's
_CHECKED = ("conv_root.weight", "embedding.weight", "transformer_encoder.posembed_input.position_emb", "head.weight",
            "head.bias", "transformer_encoder.transformer.encoderblock_13.mlp.fc2.weight")
_DEFECT_KEY = "transformer_encoder.transformer.encoderblock_3.attention.key.weight"


def _released_like(key_table, seed=0):
    """Random dense tensors of exactly the released layout (one random value per tensor)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(1, generator=g).expand(shape).clone() for k, shape in key_table.items()}


@pytest.fixture(scope="module")
def released(tmp_path_factory, key_table):
    """Real-size files of the released layout, written once: ``(folders by variant, checked tensors)``.

    Variants: ``plain`` (upstream name, flat state dict), ``wrapped`` (``params`` + ``module.``),
    the defects ``missing`` / ``extra`` / ``shape``, and ``expanded`` (one stride-0 tensor).
    """
    root = tmp_path_factory.mktemp("musiq_released")
    sd = _released_like(key_table)
    checked = {k: sd[k].clone() for k in _CHECKED}

    def save(variant, obj, name="musiq_koniq.pth"):
        (root / variant).mkdir()
        torch.save(obj, root / variant / name)

    save("plain", sd, "musiq_koniq_ckpt-e95806b9.pth")  # upstream name, plain state dict
    save("wrapped", {"params": {f"module.{k}": v for k, v in sd.items()}})
    original = sd.pop(_DEFECT_KEY)
    save("missing", sd)
    sd["transformer_encoder.transformer.encoderblock_14.norm1.weight"] = torch.ones(384)
    save("extra", sd)
    del sd["transformer_encoder.transformer.encoderblock_14.norm1.weight"]
    sd[_DEFECT_KEY] = torch.zeros(384, 383)
    save("shape", sd)
    sd[_DEFECT_KEY] = original[:1, :1].expand(original.shape)  # right shape, stride 0
    save("expanded", sd)
    del sd, original
    yield {v.name: v for v in root.iterdir()}, checked
    shutil.rmtree(root, ignore_errors=True)


def test_state_dict_equals_released_key_table(key_table):
    net = MUSIQ()
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert len(key_table) == 248
    assert own == key_table


def test_loads_released_layout(released):
    dirs, sd = released
    m = MUSIQMetric(weights_dir=dirs["plain"])
    got = m.net.state_dict()
    for k in _CHECKED:
        assert torch.equal(got[k], sd[k]), k
    assert not any(p.requires_grad for p in m.net.parameters()) and not m.net.training
    assert m.name == "musiq" and not m.full_reference and not m.lower_better


def test_loads_wrapped_and_prefixed_container(released):
    dirs, sd = released
    m = MUSIQMetric(weights_dir=dirs["wrapped"])
    assert torch.equal(m.net.state_dict()["head.weight"], sd["head.weight"])


@pytest.mark.parametrize("defect", ["missing", "extra", "shape"])
def test_refuses_wrong_layout_naming_file(released, defect):
    key = "encoderblock_14" if defect == "extra" else _DEFECT_KEY
    with pytest.raises(ValueError, match=r"musiq_koniq\.pth") as e:
        MUSIQMetric(weights_dir=released[0][defect])
    assert key in str(e.value)


def test_refuses_expanded_tensor_by_name(released):
    """A stride-0 (expanded) tensor in the released layout is refused, naming the file and the key."""
    with pytest.raises(ModelFileError, match=r"musiq_koniq\.pth") as e:
        MUSIQMetric(weights_dir=released[0]["expanded"])
    assert _DEFECT_KEY in str(e.value) and "expanded" in str(e.value)


# ----------------------------------------------------------------------------------------------
# (2) cross-implementation fixture
# ----------------------------------------------------------------------------------------------


def _tiny_net(meta, weights, num_class=1):
    net = build_musiq(pretrained=False, num_class=num_class, **meta["config"])
    net.load_state_dict(weights, strict=True)
    return net


def test_reproduces_reference_scores(tiny):
    meta, weights, dist_head, images = tiny
    net = _tiny_net(meta, weights)
    net5 = _tiny_net(meta, {**{k: v for k, v in weights.items() if not k.startswith("head.")}, **dist_head}, 5)
    for name, x in images.items():
        ref = meta["scores"][name]
        with torch.no_grad():
            torch.testing.assert_close(net(x), torch.tensor(ref["score"]), rtol=RTOL, atol=ATOL, msg=name)
            torch.testing.assert_close(net5(x), torch.tensor(ref["score_dist5"]), rtol=RTOL, atol=ATOL, msg=name)
            torch.testing.assert_close(net5(x, return_dist=True), torch.tensor(ref["dist5"]), rtol=RTOL, atol=ATOL)


def test_metric_with_pth_file_reproduces_reference(tiny, tmp_path):
    meta, weights, _, images = tiny
    torch.save(weights, tmp_path / "musiq_koniq.pth")
    m = MUSIQMetric(weights_dir=tmp_path, arch=meta["config"])
    out = m(images["a_37x53_b2"])
    assert out.dtype == torch.float64 and out.shape == (2,)
    torch.testing.assert_close(out, torch.tensor(meta["scores"]["a_37x53_b2"]["score"], dtype=torch.float64),
                               rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# (3) pre-processing on analytic cases
# ----------------------------------------------------------------------------------------------


def test_resized_size():
    assert resized_size(512, 512, 224) == (224, 224)
    assert resized_size(512, 512, 384) == (384, 384)
    assert resized_size(100, 200, 224) == (112, 224)
    assert resized_size(200, 100, 384) == (384, 192)
    assert resized_size(5, 448, 224) == (2, 224)  # 2.5 → 2: round half to even, like tf.round
    assert resized_size(7, 448, 224) == (4, 224)  # 3.5 → 4
    assert resized_size(3, 1000, 224) == (1, 224)
    assert resized_size(1, 1000, 224) == (1, 224)  # would be 0


def test_hashed_positions():
    assert torch.equal(hashed_positions(10, 10, 10), torch.arange(100))
    pos = hashed_positions(10, 5, 20).reshape(5, 20)
    assert torch.equal(pos[:, 0], torch.tensor([0, 20, 40, 60, 80]))
    assert torch.equal(pos[0], torch.arange(20) // 2)
    assert torch.equal(hashed_positions(10, 1, 3), torch.tensor([0, 3, 6]))
    assert torch.equal(hashed_positions(10, 7, 1), torch.tensor([0, 10, 20, 40, 50, 70, 80]))  # floor(i * 10 / 7)


def test_image_patches_same_padding_and_order():
    x = torch.arange(2 * 3 * 33 * 65, dtype=torch.float32).reshape(2, 3, 33, 65) + 1
    p, nh, nw = image_patches(x, 32)
    assert (nh, nw) == (2, 3) and p.shape == (2, 6, 3, 32, 32)
    padded = torch.zeros(2, 3, 64, 96)
    padded[:, :, 15:48, 15:80] = x  # total padding 31 = 15 before + 16 after, in both dims
    for i in range(2):
        for j in range(3):
            assert torch.equal(p[:, i * 3 + j], padded[:, :, 32 * i:32 * i + 32, 32 * j:32 * j + 32])
    p2, nh2, nw2 = image_patches(x[..., :32, :64], 32)  # exact multiple: no padding
    assert (nh2, nw2) == (1, 2) and torch.equal(p2[:, 1], x[:, :, :32, 32:64])


def test_token_layout_and_mask():
    x = torch.rand(1, 3, 100, 200) * 2 - 1
    patches, spatial, scale, mask = multiscale_patches(x)
    # 224: 112×224 → 4×7 = 28 real of 49; 384: 192×384 → 6×12 = 72 real of 144; original 4×7 = 28
    assert patches.shape == (1, 49 + 144 + 28, 3, 32, 32)
    expect_mask = torch.tensor([1] * 28 + [0] * 21 + [1] * 72 + [0] * 72 + [1] * 28, dtype=torch.bool)
    assert torch.equal(mask, expect_mask)
    assert torch.equal(scale, torch.tensor([0] * 49 + [1] * 72 + [0] * 72 + [2] * 28))  # padding: scale 0
    assert torch.equal(spatial[:28], hashed_positions(10, 4, 7)) and torch.equal(spatial[-28:], spatial[:28])
    assert torch.equal(spatial[49:121], hashed_positions(10, 6, 12))
    pad = ~mask
    assert (spatial[pad] == 0).all() and (scale[pad] == 0).all() and (patches[:, pad] == 0).all()
    # original scale: 100×200 padded to 128×224 (14 / 14 rows, 12 / 12 columns)
    assert torch.equal(patches[0, -28, :, 14:, 12:], x[0, :, :18, :20])


def test_normalisation_to_minus_one_one():
    net = MUSIQ(patch_size=8, hidden_size=8, mlp_dim=8, num_heads=2, num_layers=1, longer_side_lengths=(16, 24))
    patches, _, _, mask = net.tokens(torch.full((1, 3, 16, 16), 0.75))
    torch.testing.assert_close(patches[0, mask], torch.full_like(patches[0, mask], 0.5), rtol=0, atol=1e-6)
    patches, _, _, _ = net.tokens(torch.zeros(1, 3, 16, 16))
    assert patches[0, :4].min() == -1  # 0 → -1 (the 16 scale has 2×2 full patches)


def _keys_bicubic_1d(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of Keys cubic (a = -0.75), half-pixel centres, clamped borders, no antialias."""
    a, scale = -0.75, n_in / n_out
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * scale - 0.5
        i0 = math.floor(src)
        t = src - i0
        for k in range(-1, 3):
            d = abs(k - t)
            wgt = ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
            m[o, min(max(i0 + k, 0), n_in - 1)] += wgt
    return m


def test_resize_is_bicubic_without_antialias():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 64, 48, generator=g, dtype=torch.float64) * 2 - 1
    patches, _, _, _ = multiscale_patches(x, patch_size=8, grid_size=5, longer_side_lengths=(24, 40))
    # scale 0: 24×18, padded to 24×24 (3 + 3 columns) → 3×3 patches of 8
    img = patches[0, :9].reshape(3, 3, 3, 8, 8).permute(2, 0, 3, 1, 4).reshape(3, 24, 24)[:, :, 3:21]
    expect = np.einsum("oh,chw,pw->cop", _keys_bicubic_1d(64, 24), x[0].numpy(), _keys_bicubic_1d(48, 18))
    np.testing.assert_allclose(img.numpy(), expect, atol=1e-10)
    aa = F.interpolate(x, size=(24, 18), mode="bicubic", align_corners=False, antialias=True)
    assert (aa[0] - img).abs().max() > 1e-2  # the test can tell an anti-aliased resize apart


# ----------------------------------------------------------------------------------------------
# (4) missing weights, (5) batching / determinism
# ----------------------------------------------------------------------------------------------


def test_missing_weight_file_is_named(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"musiq_koniq\.pth.*musiq_koniq_ckpt-e95806b9\.pth"):
        MUSIQMetric(weights_dir=tmp_path)


def test_batch_equals_singles_and_is_deterministic(tiny):
    meta, _, _, _ = tiny
    m = MUSIQMetric(pretrained=False, arch=meta["config"])
    x = torch.rand(2, 3, 29, 45, generator=torch.Generator().manual_seed(3))
    both = m(x)
    singles = torch.cat([m(x[:1]), m(x[1:])])
    assert both.shape == (2,) and torch.isfinite(both).all()
    torch.testing.assert_close(both, singles, rtol=1e-5, atol=1e-6)
    assert torch.equal(m(x), both)
    assert both[0] != both[1]


def test_random_init_is_seeded_and_leaves_global_rng(tiny):
    meta = tiny[0]
    state = torch.random.get_rng_state()
    a = build_musiq(pretrained=False, **meta["config"]).state_dict()
    b = build_musiq(pretrained=False, **meta["config"]).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_float64_network_agrees_with_float32(tiny):
    meta, weights, _, images = tiny
    net = _tiny_net(meta, weights)
    x = images["b_20x12"]
    with torch.no_grad():
        torch.testing.assert_close(net.double()(x.double()).float(), torch.tensor(meta["scores"]["b_20x12"]["score"]),
                                   rtol=1e-4, atol=1e-5)
