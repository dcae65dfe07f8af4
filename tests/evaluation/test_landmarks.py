"""LMD (FAN WFLW landmarks, VQFR protocol): checkpoint layout, reference fixture, pre-processing, decoding.

Fixtures in ``data/`` (made once by a scratch script from the reference sources, see
``lmd_reference.json["about"]``):

* ``lmd_keys.json``: key/shape table of AdaptiveWingLoss ``FAN(4, False, False, 98)`` — the layout of
  ``alignment_WFLW_4HG.pth`` (VQFR loads it with ``strict=True``);
* ``lmd_{a,a2,b,b2}.png`` + ``lmd_reference.json``: VQFR's ``FAN.get_landmarks`` and
  ``get_landmark_distance`` on those PNGs with a 2-hourglass FAN holding :func:`seeded_state`
  weights (seed 13, regenerated here: too large to store), plus VQFR's ``calculate_points`` on sparse
  heat maps. Decoded landmarks and LMD must match to 1e-9 (the decoding is discrete; the float
  margins of the stored case are > 2e-5 relative); heat-map statistics to 1e-4 relative.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from osdface.evaluation.landmarks import (
    FAN,
    CoordConv,
    LMDMetric,
    decode_heatmaps,
    heatmaps_to_pixels,
    landmark_distance,
    load_fan_checkpoint,
    preprocess,
)
from osdface.weights import WeightsNotFoundError

DATA = Path(__file__).parent / "data"
REF = json.loads((DATA / "lmd_reference.json").read_text())


def seeded_state(shapes, seed=0):
    """Deterministic, order-independent random weights for a FAN layout ``{key: shape}``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(shapes):
        shape = tuple(shapes[k])
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(0)
            continue
        u = torch.rand(shape, generator=g, dtype=torch.float64)
        if k.endswith("running_var") or (len(shape) == 1 and k.endswith("weight")):
            v = 0.5 + u
        elif k.endswith("running_mean") or k.endswith("bias"):
            v = (u - 0.5) * 0.4
        else:
            v = (2 * u - 1) * math.sqrt(3.0 / math.prod(shape[1:]))
        out[k] = v.float()
    return out


def _read_png(name: str) -> torch.Tensor:
    import cv2

    bgr = cv2.imread(str(DATA / name))  # as VQFR's script reads it
    return torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(2, 0, 1)[None].float() / 255.0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ref_metric():
    m = LMDMetric(pretrained=False, num_modules=REF["num_modules"])
    m.net.load_state_dict(seeded_state({k: v.shape for k, v in m.net.state_dict().items()}, REF["seed"]))
    return m


@pytest.fixture(scope="module")
def images():
    return {k: _read_png(v["file"]) for k, v in REF["images"].items()}


# ---------------------------------------------------------------------------------------------
# (1) released checkpoint layout
# ---------------------------------------------------------------------------------------------


def _key_table():
    return {k: tuple(s) for k, s in json.loads((DATA / "lmd_keys.json").read_text())["keys"]}


def test_state_dict_is_the_released_layout():
    table = _key_table()
    assert len(table) == 1137
    own = {k: tuple(v.shape) for k, v in FAN().state_dict().items()}
    assert own == table


def test_released_container_loads(tmp_path):
    table = _key_table()
    g = torch.Generator().manual_seed(1)
    sd = {k: (torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g))
          for k, s in table.items()}
    torch.save({"state_dict": sd}, tmp_path / "alignment_WFLW_4HG.pth")
    m = LMDMetric(weights_dir=tmp_path)
    got = m.net.state_dict()
    keys = ("conv1.conv.weight", "m3.b2_plus_1.conv3.weight", "l3.bias", "al2.weight", "bn_end0.running_var",
            "conv2.downsample.2.weight")
    for k in keys:
        assert torch.equal(got[k], sd[k]), k
    assert not m.net.training and not any(p.requires_grad for p in m.net.parameters())


def test_alternative_containers_and_refusals(tmp_path):
    model = FAN(num_modules=1)
    good = seeded_state({k: v.shape for k, v in model.state_dict().items()}, 3)
    # DataParallel prefix, bare dict, no num_batches_tracked (pre-0.4.1 files): accepted
    legacy = {f"module.{k}": v for k, v in good.items() if not k.endswith("num_batches_tracked")}
    torch.save(legacy, tmp_path / "WFLW_4HG.pth")
    load_fan_checkpoint(model, tmp_path / "WFLW_4HG.pth")
    assert torch.equal(model.state_dict()["l0.weight"], good["l0.weight"])

    bad = {
        "missing": {k: v for k, v in good.items() if k != "m0.b3_2.conv1.weight"},
        "extra": {**good, "fc.weight": torch.zeros(3)},
        "shape": {**good, "l0.weight": torch.zeros(68 + 1, 256, 1, 1)},
    }
    for what, sd in bad.items():
        path = tmp_path / f"{what}.pth"
        torch.save({"state_dict": sd}, path)
        with pytest.raises(ValueError) as e:
            load_fan_checkpoint(model, path)
        msg = str(e.value)
        assert str(path) in msg
        assert {"missing": "m0.b3_2.conv1.weight", "extra": "fc.weight", "shape": "l0.weight"}[what] in msg
    # the metric refuses a 1-hourglass file in place of the 4-hourglass one, naming it
    torch.save({"state_dict": good}, tmp_path / "alignment_WFLW_4HG.pth")
    with pytest.raises(ValueError, match=r"alignment_WFLW_4HG\.pth.*missing \['al0\.bias'"):
        LMDMetric(weights_dir=tmp_path)


def test_missing_weight_file_is_named(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"alignment_WFLW_4HG\.pth.*WFLW_4HG\.pth"):
        LMDMetric(weights_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# (2) cross-implementation fixture (VQFR reference code, same seeded weights)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def port_outputs(ref_metric, images):
    """Heat maps and landmarks of our port, one batched call per same-size pair."""
    out = {}
    for pair in (("a", "a2"), ("b", "b2")):
        x = torch.cat([images[k] for k in pair])
        hm = ref_metric.heatmaps(x).double()
        pts = heatmaps_to_pixels(decode_heatmaps(hm), *x.shape[-2:])
        for i, k in enumerate(pair):
            out[k] = (hm[i], pts[i])
    return out


@pytest.mark.parametrize("name", ["a", "a2", "b", "b2"])
def test_matches_vqfr_reference(port_outputs, images, name):
    r = REF["images"][name]
    hm, pts = port_outputs[name]
    assert list(images[name].shape[-2:]) == r["shape_hw"]
    assert hm.shape == (98, 64, 64) and pts.shape == (98, 2) and pts.dtype == torch.float64
    line = hm.reshape(98, -1)
    np.testing.assert_allclose(line.amax(1).numpy(), r["hm_max"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(line.mean(1).numpy(), r["hm_mean"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(pts.numpy(), np.array(r["landmarks"]), rtol=0, atol=1e-9)


def test_lmd_matches_vqfr_reference(ref_metric, port_outputs, images):
    lmd_a, lmd_b = REF["lmd"]["a2|a"], REF["lmd"]["b2|b"]
    assert lmd_a > 0.05 and lmd_b > 1.0  # the fixture pairs really differ
    d = landmark_distance(port_outputs["b2"][1][None], port_outputs["b"][1][None])
    np.testing.assert_allclose(d.numpy(), [lmd_b], rtol=0, atol=1e-9)
    # through the metric: (pred, gt) batches; LMD(x, x) == 0
    a, a2 = images["a"], images["a2"]
    vals = ref_metric(torch.cat([a2, a]), torch.cat([a, a]))
    assert vals.shape == (2,) and vals.dtype == torch.float64 and torch.isfinite(vals).all()
    np.testing.assert_allclose(vals.numpy(), [lmd_a, 0.0], rtol=0, atol=1e-9)
    assert vals[1].item() == 0.0


def test_batch_of_two_equals_two_singles_and_is_deterministic(ref_metric, port_outputs, images):
    singles = torch.cat([ref_metric.landmarks(images["a2"]), ref_metric.landmarks(images["a"])])
    assert torch.equal(singles, torch.stack([port_outputs["a2"][1], port_outputs["a"][1]]))
    ref_metric.batch_size = 1  # the metric's own chunking gives the same
    try:
        chunked = ref_metric.landmarks(torch.cat([images["b"], images["b2"]]))
    finally:
        ref_metric.batch_size = 16
    assert torch.equal(chunked, torch.stack([port_outputs["b"][1], port_outputs["b2"][1]]))


# ---------------------------------------------------------------------------------------------
# (3) pre-processing and decoding on analytic cases
# ---------------------------------------------------------------------------------------------


def test_preprocess_is_vqfr_get_landmarks_input():
    import cv2

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 37, 53, generator=g)
    out = preprocess(x)
    assert out.shape == (2, 3, 256, 256) and out.dtype == torch.float32
    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(2):  # cv2.imread (BGR) -> resize (default INTER_LINEAR) -> [..., ::-1] -> /255
        bgr = np.ascontiguousarray(u8[i][..., ::-1])
        want = cv2.resize(bgr, (256, 256))[..., ::-1].transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        assert np.array_equal(out[i].numpy(), want)
        area = cv2.resize(bgr, (256, 256), interpolation=cv2.INTER_AREA)[..., ::-1].transpose(2, 0, 1) / 255.0
        assert not np.allclose(out[i].numpy(), area)
    # RGB order kept, [0, 1] range (not [-1, 1]), uint8 rounding first
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 100.4 / 255
    p = preprocess(red)
    assert torch.all(p[0, 0] == torch.tensor(100 / 255.0)) and p[0, 1:].abs().max() == 0


def test_coordinate_channels():
    # identity 1x1 conv exposes the concatenated channels: input, xx (rows), yy (cols), r, boundary xx/yy
    cc = CoordConv(1, 6, with_boundary=True, kernel_size=1, bias=False).double()
    with torch.no_grad():
        cc.conv.weight.copy_(torch.eye(6, dtype=torch.float64)[:, :, None, None])
    h, w = 5, 9
    heat = torch.zeros(2, 3, h, w, dtype=torch.float64)
    heat[1, -1, 3, 6] = 0.06  # boundary channel above 0.05 in one cell of image 1 only
    out, last = cc(torch.full((2, 1, h, w), 7.0, dtype=torch.float64), heat)
    rows = torch.linspace(-1, 1, h, dtype=torch.float64)[:, None].expand(h, w)
    cols = torch.linspace(-1, 1, w, dtype=torch.float64)[None, :].expand(h, w)
    assert torch.all(out[:, 0] == 7)
    torch.testing.assert_close(out[0, 1], rows)
    torch.testing.assert_close(out[0, 2], cols)
    torch.testing.assert_close(out[0, 3], torch.sqrt(rows**2 + cols**2) / math.sqrt(2))
    assert out[0, 4:].abs().max() == 0
    assert out[1, 4].nonzero().tolist() == [[3, 6]] and out[1, 4, 3, 6] == 0.5 and out[1, 5, 3, 6] == 0.5
    assert torch.equal(last, out[:, 4:])
    # without a previous heat map (first hourglass, stem) only x, y, r are added
    assert CoordConv(3, 64, kernel_size=7).conv.in_channels == 6
    assert CoordConv(256, 256, with_boundary=True, first_one=True, kernel_size=1).conv.in_channels == 259


def _gaussian_maps(centres, size=64, sigma=1.5):
    """Heat maps ``(1, N, size, size)``: Gaussians at continuous ``(x, y)`` (cell c spans [c, c+1))."""
    c = torch.arange(size, dtype=torch.float64) + 0.5
    maps = [torch.exp(-((c[None, :] - x) ** 2 + (c[:, None] - y) ** 2) / (2 * sigma**2)) for x, y in centres]
    return torch.stack(maps)[None].float()


def test_decoding_recovers_quarter_cell_peaks():
    rng = np.random.default_rng(0)
    cells = rng.integers(2, 62, size=(98, 2))
    offsets = rng.choice([-0.25, 0.0, 0.25], size=(98, 2))
    centres = cells + 0.5 + offsets
    pts = decode_heatmaps(_gaussian_maps(centres.tolist()))
    assert pts.dtype == torch.float64
    np.testing.assert_array_equal(pts[0].numpy(), centres)
    # a generic sub-cell peak is found within the quarter-cell quantisation
    generic = cells + 0.5 + rng.uniform(-0.49, 0.49, size=(98, 2))
    err = (decode_heatmaps(_gaussian_maps(generic.tolist()))[0].numpy() - generic)
    assert np.abs(err).max() <= 0.25 + 1e-9
    # pixel coordinates of the input image: cell units times (W / 64, H / 64)
    px = heatmaps_to_pixels(pts, height=512, width=384)
    np.testing.assert_array_equal(px[0].numpy(), centres * [6.0, 8.0])


def test_decoding_vqfr_quirks():
    base = torch.full((2, 98, 64, 64), -1.0)
    base[:, :, 10, 10] = 1.0
    base[:, :, 9, 10], base[:, :, 11, 10] = 0.2, 0.5  # larger value below -> y + 0.25
    base[:, :, 0, 0] = 0.9  # cell 0
    normal = decode_heatmaps(base)
    assert torch.all(normal[..., 1] == 10.75) and torch.all(normal[..., 0] == 10.5)
    # a peak of ANOTHER landmark in the first row makes every "above" read cell 0 (0.9 > 0.5 -> y - 0.25),
    # for that image only (VQFR decodes one image at a time)
    quirk = base.clone()
    quirk[0, 97] = -1.0
    quirk[0, 97, 0, 30] = 1.0
    pts = decode_heatmaps(quirk)
    assert torch.all(pts[0, :97, 1] == 10.25) and torch.all(pts[1, :, 1] == 10.75)
    # likewise a peak in the last row makes every "below" read the last cell
    quirk = base.clone()
    quirk[1, 0] = -1.0
    quirk[1, 0, 63, 30] = 1.0
    quirk[:, :, 63, 63] = 0.1  # < 0.2 above -> y - 0.25
    pts = decode_heatmaps(quirk)
    assert torch.all(pts[1, 1:, 1] == 10.25) and torch.all(pts[0, :, 1] == 10.75)
    # x neighbours are read in the flattened map: the last column's "right" is the next row's first cell
    edge = torch.full((1, 98, 64, 64), -1.0)
    edge[0, :, 20, 63] = 1.0
    edge[0, :, 20, 62] = 0.3
    edge[0, :, 21, 0] = 0.6
    assert torch.all(decode_heatmaps(edge)[0, :, 0] == 63.75)
    # the last cell (where VQFR raises IndexError) wraps to cell 0; ties go to the first index
    last = torch.full((1, 98, 64, 64), -1.0)
    last[0, :, 63, 63] = 1.0
    last[0, :, 63, 62] = 0.0  # left
    last[0, :, 0, 0] = -0.5  # "right" after wrapping (< left -> x - 0.25)
    last[0, 1, 5, 5] = 1.0  # tie with (63, 63): first index wins
    pts = decode_heatmaps(last)
    assert pts[0, 0, 0] == 63.25 and pts[0, 1, 0] == 5.5


@pytest.mark.parametrize("case", REF["decode"], ids=[c["name"] for c in REF["decode"]])
def test_decoding_matches_vqfr_calculate_points(case):
    hm = torch.full((1, 98, 64, 64), case["background"])
    for n, r, c, v in case["entries"]:
        hm[0, n, r, c] = v
    np.testing.assert_array_equal(decode_heatmaps(hm)[0].numpy(), np.array(case["points"]))
