import cv2
import numpy as np
import pytest
import torch

from osdface.face import FaceRestorer
from osdface.face.alignment import invert_affine
from osdface.face.background import (
    ModelUpsampler,
    ResizeUpsampler,
    RRDBNet,
    create_bg_upsampler,
    load_rrdbnet,
)
from osdface.face.parsing import FaceParser, ParseNet, load_parsenet
from osdface.face.paste import paste_faces


@pytest.fixture(scope="module")
def restorer(tiny_pipe, yunet):
    return FaceRestorer(tiny_pipe, detector=yunet, batch_size=4)


@pytest.fixture(scope="module")
def astro_result(restorer, astronaut):
    return restorer.restore(astronaut)


def _support(res, shape):
    """Where any face's paste mask is non-zero (image space)."""
    ones = [np.full_like(f.lq, 255) for f in res.faces]
    m = paste_faces(np.zeros(shape, np.uint8), ones, [f.inverse_affine for f in res.faces],
                    [f.mask for f in res.faces], upscale=res.upscale)
    return m[..., 0] > 0


def test_restore_astronaut_changes_only_the_face(astro_result, astronaut):
    res = astro_result
    assert res.image.shape == astronaut.shape and res.image.dtype == np.uint8
    assert len(res.faces) == 1
    f = res.faces[0]
    assert f.lq.shape == (64, 64, 3) and f.restored.shape == (64, 64, 3)  # tiny pipeline: 64-px crops
    inside = _support(res, astronaut.shape)
    np.testing.assert_array_equal(res.image[~inside], astronaut[~inside])
    x0, y0, x1, y1 = f.detection.box.astype(int)
    assert inside[y0:y1, x0:x1].mean() > 0.9, "the mask covers the face box"
    assert np.abs(res.image[y0:y1, x0:x1].astype(int) - astronaut[y0:y1, x0:x1]).mean() > 2, "the face changed"
    np.testing.assert_array_equal(invert_affine(f.affine), f.inverse_affine)


def test_upscale_sizes_background_and_alpha(tiny_pipe, yunet, astronaut):
    alpha = np.tile(np.linspace(0, 255, 512).astype(np.uint8), (512, 1))
    r = FaceRestorer(tiny_pipe, detector=yunet, upscale=2, bg_upsampler="bicubic")
    prepared = r.prepare(np.dstack([astronaut, alpha]))
    np.testing.assert_array_equal(prepared.rgb, astronaut)
    white = [np.full_like(f.lq, 255) for f in prepared.faces]  # paste-back is under test, not the model
    res = r.finish(prepared, white)
    assert res.image.shape == (1024, 1024, 3) and res.alpha.shape == (1024, 1024)
    expect_bg = cv2.resize(astronaut, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    inside = _support(res, res.image.shape)
    assert 0.01 < inside.mean() < 0.2
    np.testing.assert_array_equal(res.image[~inside], expect_bg[~inside])
    x0, y0, x1, y1 = (res.faces[0].detection.box * 2).astype(int)  # boxes stay in input pixels
    assert res.image[(y0 + y1) // 2, (x0 + x1) // 2].min() == 255, "face pasted at 2x its input position"
    res1 = FaceRestorer(tiny_pipe, detector=yunet).finish(prepared, white)
    np.testing.assert_array_equal(res1.alpha, alpha)


def test_no_face_photo_is_returned_unchanged(restorer):
    sky = np.full((90, 130, 3), 123, np.uint8)
    res = restorer.restore(sky)
    assert res.faces == []
    np.testing.assert_array_equal(res.image, sky)


def test_float_tensor_input_gives_the_same_result(restorer, astronaut, astro_result):
    res = restorer.restore(torch.from_numpy(astronaut).permute(2, 0, 1).float() / 255)
    np.testing.assert_array_equal(res.image, astro_result.image)


def test_restore_many_batches_faces_across_photos_in_order(tiny_pipe, yunet, astronaut, group_photo, astro_result):
    group, gts = group_photo
    sky = np.full((50, 60, 3), 30, np.uint8)
    calls = []

    class CountingPipe:  # the real tiny pipeline, with its batch sizes recorded
        resolution, device = tiny_pipe.resolution, tiny_pipe.device

        def __call__(self, x, **kw):
            calls.append(x.shape[0])
            return tiny_pipe(x, **kw)

    r = FaceRestorer(CountingPipe(), detector=yunet, batch_size=4, max_faces=3)
    broken = ValueError("unreadable")
    results = list(r.restore_many([astronaut, sky, broken, group]))
    assert [type(x).__name__ for x in results] == ["RestoreResult", "RestoreResult", "ValueError", "RestoreResult"]
    assert [len(x.faces) for x in (results[0], results[1], results[3])] == [1, 0, 3]
    assert calls == [4], "1 + 3 faces from different photos share one batch"
    assert np.abs(results[0].image.astype(int) - astro_result.image).max() <= 2, "batching does not change results"


def test_given_detections_and_face_filters(tiny_pipe, yunet, group_photo):
    group, gts = group_photo
    prepared = FaceRestorer(tiny_pipe, detector=yunet, max_faces=2).prepare(group)
    assert len(prepared.faces) == 2
    widths = sorted(d.width for d in yunet(group))
    assert sorted(f.detection.width for f in prepared.faces) == widths[-2:]
    one = FaceRestorer(tiny_pipe, detector=None).prepare(group, detections=yunet(group)[:1])
    assert len(one.faces) == 1
    with pytest.raises(ValueError, match="no detector"):
        FaceRestorer(tiny_pipe, detector=None).restore(group)


def test_no_paste_back_returns_crops_only(tiny_pipe, yunet, astronaut):
    r = FaceRestorer(tiny_pipe, detector=yunet, paste_back=False)
    p = r.prepare(astronaut)
    res = r.finish(p, [f.lq for f in p.faces])
    assert res.image is None and res.faces[0].restored.shape == (64, 64, 3)


# ------------------------------------------------------------------------- parsing and background models
def test_parsing_mask_limits_the_paste(tmp_path, tiny_pipe, yunet, astronaut):
    torch.manual_seed(0)
    net = ParseNet(in_size=64, out_size=64, base_ch=8, res_depth=1, ch_range=(8, 16))
    with torch.no_grad():  # class 0 (background) everywhere → nothing may be pasted
        net.out_mask_conv.conv2d.weight.zero_()
        net.out_mask_conv.conv2d.bias.copy_(torch.arange(19, 0, -1).float())
    parser = FaceParser(net, resolution=64)
    masks = parser(np.zeros((2, 64, 64, 3), np.uint8))
    assert masks.shape == (2, 64, 64) and masks.max() == 0
    r = FaceRestorer(tiny_pipe, detector=yunet, parser=parser)
    p = r.prepare(astronaut)
    res = r.finish(p, [np.zeros_like(f.lq) for f in p.faces])
    np.testing.assert_array_equal(res.image, astronaut)
    with torch.no_grad():  # class 1 (skin) everywhere → a soft mask inside the crop
        net.out_mask_conv.conv2d.bias.copy_(torch.tensor([0.0, 5.0] + [0.0] * 17))
    m = parser(np.zeros((1, 64, 64, 3), np.uint8))[0]
    assert m[32, 32] > 0.95 and m[0].max() == 0


def test_parsenet_file_loads_strict(tmp_path):
    torch.manual_seed(0)
    sd = ParseNet().state_dict()
    assert tuple(sd["encoder.0.conv2d.weight"].shape) == (64, 3, 3, 3)
    assert tuple(sd["body.9.conv2.norm.norm.running_mean"].shape) == (256,)
    assert tuple(sd["decoder.3.shortcut_func.conv2d.weight"].shape) == (64, 128, 3, 3)
    assert tuple(sd["out_mask_conv.conv2d.weight"].shape) == (19, 64, 3, 3)
    path = tmp_path / "parsing_parsenet.pth"
    torch.save(sd, path)
    net = load_parsenet(path)
    assert torch.equal(net.state_dict()["body.0.conv1.conv2d.weight"], sd["body.0.conv1.conv2d.weight"])
    with pytest.raises(FileNotFoundError, match="parsing_parsenet.pth"):
        load_parsenet(tmp_path / "missing" / "parsing_parsenet.pth")


def test_rrdbnet_upsampler_loads_and_tiles_consistently(tmp_path, astronaut):
    torch.manual_seed(0)
    net = RRDBNet(scale=2, num_feat=4, num_block=1, num_grow_ch=4)
    path = tmp_path / "RealESRGAN_x2plus.pth"
    torch.save({"params_ema": net.state_dict()}, path)
    loaded = load_rrdbnet(path)
    assert loaded.scale == 2 and len(loaded.body) == 1
    img = astronaut[100:148, 150:206]  # 48 × 56
    whole = ModelUpsampler(loaded, tile=0)(img, 2)
    tiled = ModelUpsampler(loaded, tile=20, tile_pad=16)(img, 2)
    assert whole.shape == (96, 112, 3)
    assert np.abs(whole.astype(int) - tiled).max() <= 1
    assert create_bg_upsampler(str(path)).net.scale == 2
    assert ModelUpsampler(loaded)(img, 3).shape == (144, 168, 3), "resized to the requested scale"
    with pytest.raises(ValueError, match="unknown background upsampler"):
        create_bg_upsampler("esrgan")
    assert ResizeUpsampler("lanczos")(img, 1.5).shape == (72, 84, 3)


def test_restore_many_does_not_hold_faceless_photos_behind_a_short_batch(tiny_pipe, yunet, astronaut):
    """One face, then many photos without faces: the face is restored once more than batch_size
    photos wait, so the stream does not pile up every photo until the end."""
    sky = np.full((50, 60, 3), 30, np.uint8)
    read = []

    def photos():
        for i in range(60):
            read.append(i)
            yield astronaut if i == 0 else sky

    r = FaceRestorer(tiny_pipe, detector=yunet, batch_size=8)
    results = r.restore_many(photos())
    first = next(results)
    assert len(first.faces) == 1 and first.faces[0].restored is not None
    assert len(read) <= 8 + 1, f"{len(read)} photos read before the first was handed on"
    rest = list(results)
    assert len(rest) == 59 and all(len(x.faces) == 0 for x in rest)
