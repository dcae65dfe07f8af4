"""MANIQA port: checkpoint layout, pyiqa 0.1.12 equivalence (tiny fixture), pre-processing, metric contract.

Fixtures (``tests/evaluation/data``):

* ``maniqa_keys.json``: key → shape (and non-float32 dtypes) of the released checkpoints, dumped from
  pyiqa 0.1.12's ``MANIQA`` at real size (timm 1.0.31 ``vit_base_patch8_224``).
* ``maniqa_tiny.safetensors`` / ``maniqa_tiny.json``: a tiny configuration of the same network (ViT
  width 8, patch 28 → 8×8 tokens, 10 ViT blocks, window 4 with shifts) whose weights are int8 × a
  per-tensor scale (``scales`` metadata), and pyiqa's scores on three analytic images, with its
  test-time grid crops and with its ``random_crop`` fed osdface's seeded positions. Tolerance: 1e-4
  relative (observed ≤ 1e-7).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from osdface.errors import ModelFileError
from osdface.evaluation.maniqa import (
    MANIQA_VARIANTS,
    MANIQAMetric,
    MANIQANet,
    crop_positions,
    load_maniqa_weights,
    maniqa_crops,
    resize_for_crops,
)
from osdface.evaluation.weights import WEIGHT_FILES
from osdface.weights import WeightsNotFoundError

DATA = Path(__file__).parent / "data"
FIXTURE = json.loads((DATA / "maniqa_tiny.json").read_text())
TINY = {k: tuple(v) if isinstance(v, list) else v for k, v in FIXTURE["arch"].items()}
RTOL = 1e-4


def image(h: int, w: int, k: int) -> torch.Tensor:
    """The fixture's deterministic RGB test image ``(1, 3, h, w)`` in [0, 1]."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64) / h, torch.arange(w, dtype=torch.float64) / w,
                            indexing="ij")
    r = 0.5 + 0.45 * torch.sin(7.0 * xx + 3.0 * yy * yy + k)
    g = 0.5 + 0.45 * torch.cos(11.0 * xx * yy + 2.0 * k)
    b = 0.5 + 0.45 * torch.sin(5.0 * (xx - yy) + 0.7 * k) * torch.cos(13.0 * yy)
    return torch.stack([r, g, b])[None].float()


def tiny_weights() -> dict[str, torch.Tensor]:
    """The fixture's parameters (int8 × per-tensor scale, float32)."""
    from safetensors import safe_open

    with safe_open(str(DATA / "maniqa_tiny.safetensors"), "pt") as f:
        scales = json.loads(f.metadata()["scales"])
        return {k: f.get_tensor(k).float() * torch.tensor(scales[k], dtype=torch.float32) for k in f.keys()}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    """Full state dict of the tiny fixture network (parameters from the file, buffers from the architecture)."""
    sd = MANIQANet(**TINY).state_dict()
    params = tiny_weights()
    assert set(params) <= set(sd) and len(params) > 100
    sd.update(params)
    return sd


def tiny_metric(sd, **kw) -> MANIQAMetric:
    m = MANIQAMetric(pretrained=False, arch=TINY, **kw)
    m.net.load_state_dict(sd, strict=True)
    return m


def weight_file(tmp_path: Path) -> Path:
    return tmp_path / WEIGHT_FILES["maniqa"].filename


# ----------------------------------------------------------------------------------------------
# (1) checkpoint layout
# ----------------------------------------------------------------------------------------------


def test_state_dict_equals_released_key_table():
    table = json.loads((DATA / "maniqa_keys.json").read_text())
    with torch.device("meta"):
        sd = MANIQANet().state_dict()
    assert list(sd) == list(table["shapes"])
    assert {k: list(v.shape) for k, v in sd.items()} == table["shapes"]
    assert {k: str(v.dtype).replace("torch.", "") for k, v in sd.items() if v.dtype != torch.float32} == table["dtypes"]
    assert len(sd) == 316 and sum(k.startswith("vit.") for k in sd) == 152


def _released_layout(table: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random dense tensors with exactly the released keys/shapes/dtypes (rows repeat one random vector)."""
    out = {}
    for k, shape in table["shapes"].items():
        if table["dtypes"].get(k) == "int64":
            out[k] = torch.randint(0, 49, (shape[-1],), generator=generator).expand(shape).clone()
        else:
            out[k] = torch.randn(shape[-1], generator=generator).expand(shape).clone()
    return out


_CHECKED = ("vit.pos_embed", "vit.blocks.9.mlp.fc2.weight", "tablock1.0.c_q.weight", "conv1.weight",
            "swintransformer2.layers.1.blocks.1.attn_mask",
            "swintransformer1.layers.0.blocks.0.attn.relative_position_index", "fc_weight.3.bias")
_DEFECT_KEY = "swintransformer1.layers.1.blocks.0.mlp.fc1.weight"


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[dict[str, Path], dict[str, torch.Tensor]]:
    """Real-size files of the released layout (~550 MB each), written once: ``(folders by variant, checked tensors)``.

    Variants: ``plain`` (the IIGROUP/pyiqa release: a flat state dict), the defects ``missing`` /
    ``extra`` / ``shape``, and ``expanded`` (one stride-0 tensor of the right shape).
    """
    table = json.loads((DATA / "maniqa_keys.json").read_text())
    root = tmp_path_factory.mktemp("maniqa_released")
    sd = _released_layout(table, torch.Generator().manual_seed(3))
    checked = {k: sd[k].clone() for k in _CHECKED}

    def save(variant, obj):
        (root / variant).mkdir()
        torch.save(obj, weight_file(root / variant))

    save("plain", sd)
    original = sd.pop(_DEFECT_KEY)
    save("missing", sd)
    sd["vit.head_dist.weight"] = torch.zeros(3)
    save("extra", sd)
    del sd["vit.head_dist.weight"]
    sd[_DEFECT_KEY] = torch.zeros(table["shapes"][_DEFECT_KEY][0], 5)
    save("shape", sd)
    sd[_DEFECT_KEY] = original[:1, :1].expand(original.shape)  # right shape, stride 0
    save("expanded", sd)
    del sd, original
    yield {v.name: v for v in root.iterdir()}, checked
    shutil.rmtree(root, ignore_errors=True)


def test_released_layout_loads_at_real_size(released):
    dirs, sd = released
    m = MANIQAMetric(weights_dir=dirs["plain"])
    own = m.net.state_dict()
    for k in _CHECKED:
        assert torch.equal(own[k], sd[k]), k
    assert not any(p.requires_grad for p in m.net.parameters()) and not m.net.training
    assert m.net.swintransformer1.scale == 0.8  # pyiqa's default `maniqa` = KonIQ (scale 0.8)


@pytest.mark.parametrize("container", ["flat", "module", "params", "state_dict"])
def test_released_containers_accepted(tmp_path, tiny_sd, container):
    sd = dict(tiny_sd)
    obj = {"flat": sd, "module": {f"module.{k}": v for k, v in sd.items()}, "params": {"params": sd},
           "state_dict": {"state_dict": sd, "epoch": 3}}[container]
    torch.save(obj, weight_file(tmp_path))
    m = MANIQAMetric(weights_dir=tmp_path, arch=TINY)
    assert all(torch.equal(v, sd[k]) for k, v in m.net.state_dict().items())


@pytest.mark.parametrize("defect", ["missing", "extra", "shape"])
def test_mismatching_file_refused_with_its_name(released, defect):
    key = "vit.head_dist.weight" if defect == "extra" else _DEFECT_KEY
    path = weight_file(released[0][defect])
    with pytest.raises(ValueError) as e:
        MANIQAMetric(weights_dir=path.parent)
    assert str(path) in str(e.value) and key in str(e.value)


def test_expanded_tensor_refused_by_name(released):
    """A stride-0 (expanded) tensor in the released layout is refused, naming the file and the key."""
    path = weight_file(released[0]["expanded"])
    with pytest.raises(ModelFileError) as e:
        MANIQAMetric(weights_dir=path.parent)
    assert str(path) in str(e.value) and _DEFECT_KEY in str(e.value) and "expanded" in str(e.value)


def test_non_state_dict_file_refused(tmp_path):
    path = weight_file(tmp_path)
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match=str(path)):
        load_maniqa_weights(MANIQANet(**TINY), path)


# ----------------------------------------------------------------------------------------------
# (2) pyiqa 0.1.12 reference outputs (tiny configuration, shared weights)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crops", ["grid", "random"])
def test_matches_pyiqa_reference(tiny_sd, crops):
    m = tiny_metric(tiny_sd, crops=crops, seed=0)
    for h, w, k in FIXTURE["images"]:
        ref = FIXTURE["scores"][f"{h}x{w}_{k}"]
        x = image(h, w, k)
        if crops == "random":  # the reference was fed exactly these crop corners
            hh, ww = resize_for_crops(x).shape[-2:]
            assert crop_positions(hh, ww, 224, 20, "random", seed=0) == [tuple(p) for p in ref["random_positions"]]
        got = float(m(x)[0])
        want = ref["grid" if crops == "grid" else "random_seed0"]
        assert got == pytest.approx(want, rel=RTOL), (h, w, k)
    # the fixture distinguishes the two crop protocols beyond the tolerance
    r0 = FIXTURE["scores"]["240x272_0"]
    assert abs(r0["grid"] - r0["random_seed0"]) > 10 * RTOL * abs(r0["grid"])


# ----------------------------------------------------------------------------------------------
# (3) pre-processing
# ----------------------------------------------------------------------------------------------


def test_grid_crop_positions():
    # 512²: k = floor(sqrt 20) = 4 → step 72; 5 × 5 grid, the first 20 (rows 0-3) are used
    steps = [0, 72, 144, 216, 288]
    assert crop_positions(512, 512) == [(t, s) for t in steps[:4] for s in steps]
    # 240 × 272: steps (16 // 4, 48 // 4) = (4, 12)
    assert crop_positions(240, 272) == [(4 * i, 12 * j) for i in range(4) for j in range(5)]
    assert crop_positions(224, 224) == [(0, 0)] * 20
    assert crop_positions(300, 400, num=9) == [(25 * i, 58 * j) for i in range(3) for j in range(3)]
    with pytest.raises(ValueError):
        crop_positions(223, 300)


def test_random_crop_positions_seeded():
    a = crop_positions(300, 400, mode="random", seed=0)
    assert a == crop_positions(300, 400, mode="random", seed=0)
    assert a != crop_positions(300, 400, mode="random", seed=1)
    assert all(0 <= t <= 76 and 0 <= s <= 176 for t, s in a) and len(set(a)) > 15


def test_resize_rule():
    # min side <= 224 → bilinear by scale_factor (224 + 1) / min; sizes floor(n * f)
    assert resize_for_crops(torch.zeros(1, 3, 180, 200)).shape[-2:] == (225, 250)
    assert resize_for_crops(torch.zeros(1, 3, 224, 224)).shape[-2:] == (225, 225)
    x = torch.rand(1, 3, 225, 300)
    assert resize_for_crops(x) is x
    # a ramp along the width: output j samples source (j + 0.5) / f - 0.5 (half-pixel, the scale factor itself,
    # not in/out sizes: 211 → floor(211 * 1.125) = 237 columns)
    ramp = torch.arange(211, dtype=torch.float32).expand(1, 1, 200, 211)
    y = resize_for_crops(ramp)
    assert y.shape[-2:] == (225, 237)
    j = torch.arange(237, dtype=torch.float64)
    want = ((j + 0.5) / 1.125 - 0.5).clamp(0, 210)
    assert torch.allclose(y[0, 0, 100].double(), want, atol=1e-4)


def test_crops_layout():
    # pixel value = row * 1000 + col: each crop's corner tells where it was cut
    x = (torch.arange(240, dtype=torch.float64)[:, None] * 1000 + torch.arange(272)).expand(2, 3, 240, 272)
    x = x * torch.tensor([1.0, -1.0])[:, None, None, None]
    c = maniqa_crops(x, num=20)
    assert c.shape == (40, 3, 224, 224)
    corners = [(int(v) // 1000, int(v) % 1000) for v in c[:20, 0, 0, 0]]
    assert corners == crop_positions(240, 272)
    assert torch.equal(c[20:], -c[:20])  # image-major: the second image's crops follow the first's


def test_input_normalised_to_minus_one_one(tiny_sd):
    m = tiny_metric(tiny_sd)
    seen = []
    m.net.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    x = torch.cat([torch.full((1, 3, 230, 230), 0.75), torch.zeros(1, 3, 230, 230)])
    m(x)
    crops = torch.cat(seen)
    assert crops.shape == (40, 3, 224, 224)
    assert torch.all(crops[:20] == 0.5) and torch.all(crops[20:] == -1.0)


class _StubNet(torch.nn.Module):
    """Per-patch scores/weights that depend on the crop: score = crop mean, weight = 0.1 + crop index / 10."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, x):
        n = x.shape[0]
        s = x.mean(dim=(1, 2, 3))[:, None].expand(n, 4)
        idx = torch.arange(self.calls, self.calls + n, dtype=x.dtype) % 20
        self.calls += n
        return s, (0.1 + idx / 10)[:, None].expand(n, 4)


def test_score_is_one_weighted_mean_over_all_crops(tiny_sd):
    m = tiny_metric(tiny_sd, crop_batch=7)
    m.net = _StubNet()
    x = (torch.arange(260, dtype=torch.float32)[:, None] / 260 + torch.zeros(300)).expand(1, 3, 260, 300)
    got = float(m(x)[0])
    crops = maniqa_crops((x - 0.5) / 0.5)
    s = crops.mean(dim=(1, 2, 3)).double()
    w = 0.1 + torch.arange(20, dtype=torch.float64) / 10
    assert got == pytest.approx(float((w * s).sum() / w.sum()), rel=1e-6)
    assert abs(got - float(s.mean())) > 1e-3  # not the plain mean of per-crop scores


# ----------------------------------------------------------------------------------------------
# (4) missing weights, variants
# ----------------------------------------------------------------------------------------------


def test_missing_weight_file_is_named(tmp_path):
    with pytest.raises(WeightsNotFoundError) as e:
        MANIQAMetric(weights_dir=tmp_path)
    assert WEIGHT_FILES["maniqa"].filename in str(e.value) and str(tmp_path) in str(e.value)


def test_variants_and_arguments(tmp_path):
    assert MANIQA_VARIANTS["koniq"][:2] == ("maniqa", 0.8)
    no_scale = {k: v for k, v in TINY.items() if k != "scale"}
    m = MANIQAMetric(pretrained=False, arch=no_scale, train_dataset="pipal")
    assert m.net.swintransformer1.scale == 0.13 and m.net.swintransformer2.scale == 0.13
    with pytest.raises(ValueError, match="train_dataset"):
        MANIQAMetric(pretrained=False, arch=TINY, train_dataset="spaq")
    with pytest.raises(ValueError, match="crops"):
        MANIQAMetric(pretrained=False, arch=TINY, crops="center")
    with pytest.raises((ValueError, WeightsNotFoundError), match="maniqa_pipal"):
        MANIQAMetric(weights_dir=tmp_path, arch=TINY, train_dataset="pipal")
    assert (m.name, m.full_reference, m.lower_better) == ("maniqa", False, False)


# ----------------------------------------------------------------------------------------------
# (5) metric contract
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crops", ["grid", "random"])
def test_batch_equals_singles_and_deterministic(tiny_sd, crops):
    m = tiny_metric(tiny_sd, crops=crops, crop_batch=13)
    x = torch.cat([image(236, 250, 3), image(236, 250, 4)])
    both = m(x)
    singles = torch.cat([m(x[:1]), m(x[1:])])
    assert both.dtype == torch.float64 and both.shape == (2,)
    assert torch.isfinite(both).all() and both[0] != both[1]
    assert torch.allclose(both, singles, rtol=1e-6, atol=0)
    assert torch.equal(m(x), both)
    m20 = tiny_metric(tiny_sd, crops=crops, crop_batch=20)
    assert torch.allclose(m20(x), both, rtol=1e-6, atol=0)


def test_random_weights_are_seeded():
    a = MANIQAMetric(pretrained=False, arch=TINY, seed=5).net.state_dict()
    b = MANIQAMetric(pretrained=False, arch=TINY, seed=5).net.state_dict()
    c = MANIQAMetric(pretrained=False, arch=TINY, seed=6).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    assert math.isfinite(float(MANIQAMetric(pretrained=False, arch=TINY)(torch.rand(1, 3, 100, 120))[0]))
