import numpy as np
import pytest
import torch

from osdface.face.detection import (
    DETECTORS,
    DetectorWeightsNotFoundError,
    RetinaFaceDetector,
    create_detector,
    select_faces,
)
from osdface.face.retinaface import RetinaFaceNet, decode_boxes, decode_landmarks, nms, prior_boxes
from osdface.face.types import Detection


def _iou(a, b):
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)


def test_yunet_finds_the_astronaut_with_a_sensible_box(yunet, astronaut):
    dets = yunet(astronaut)
    assert len(dets) == 1
    d = dets[0]
    # MTCNN (facenet-pytorch) puts this face at [182, 64, 267, 174]; Haar at [177, 66, 272, 161]
    assert _iou(d.box, [182, 64, 267, 174]) > 0.75
    assert 0.6 < d.score <= 1.0
    lm = d.landmarks
    assert np.all((lm >= d.box[:2]) & (lm <= d.box[2:])), "landmarks must lie inside the box"
    assert lm[0, 0] < lm[2, 0] < lm[1, 0], "eye (image left), nose, eye (image right)"
    assert lm[3, 0] < lm[4, 0] and lm[3, 1] > lm[2, 1] and lm[0, 1] < lm[2, 1], "mouth below nose below eyes"


def test_yunet_finds_every_face_of_a_group_photo(yunet, group_photo):
    rgb, gts = group_photo
    dets = yunet(rgb)
    matched = []
    for gt in gts:
        hits = [d for d in dets if np.linalg.norm(d.center - gt["center"]) < 0.3 * gt["size"]]
        assert len(hits) == 1, f"face at {gt['center']} (size {gt['size']:.0f}) found {len(hits)} times"
        d = hits[0]
        assert 0.7 * gt["size"] < d.width < 1.4 * gt["size"]
        matched.append(d)
    assert len(dets) == len(gts), "no false positives"
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)


def test_yunet_no_face_on_a_face_free_image(yunet):
    rng = np.random.default_rng(0)
    sky = np.clip(rng.normal(150, 8, (240, 320, 3)), 0, 255).astype(np.uint8)
    assert yunet(sky) == []


def test_detector_downscales_large_photos_and_maps_back(astronaut):
    from osdface.face.detection import YuNetDetector

    big = np.kron(astronaut, np.ones((3, 3, 1), np.uint8))  # 1536², face at 3×
    d_full = YuNetDetector(max_side=0)(big)[0]
    d_small = YuNetDetector(max_side=512)(big)[0]  # detected at 512, mapped back
    assert _iou(d_full.box, d_small.box) > 0.85
    assert np.abs(d_full.landmarks - d_small.landmarks).max() < 12


def _det(x0, y0, s, score=0.9):
    return Detection([x0, y0, x0 + s, y0 + s], score, np.full((5, 2), [x0 + s / 2, y0 + s / 2]))


@pytest.mark.parametrize("shape", [(4, 16800), (2, 8000), (1, 3000), (3, 3000)])
def test_yunet_degenerate_strips_give_no_absurd_boxes(yunet, astronaut, shape):
    """The photo squeezed into a strip a few pixels high: YuNet emits NaN or boxes at ±1e24 there
    (measured: (2, 8000) → x ≈ -4.8e24); only finite boxes of positive size inside the image remain."""
    import cv2

    strip = cv2.resize(astronaut, (shape[1], shape[0]))  # bilinear, as measured
    for det in yunet(strip):
        x1, y1, x2, y2 = det.box
        assert np.isfinite(det.box).all() and np.isfinite(det.landmarks).all()
        assert x2 > x1 and y2 > y1 and x1 < shape[1] and y1 < shape[0] and x2 > 0 and y2 > 0


def test_select_faces_filters():
    dets = [_det(0, 0, 30, 0.99), _det(100, 100, 80, 0.95), _det(300, 10, 50, 0.9), _det(180, 180, 10, 0.8)]
    size = (400, 400)
    assert select_faces(dets, size) == dets
    assert select_faces(dets, size, min_face_size=20) == dets[:3]
    two = select_faces(dets, size, max_faces=2)
    assert two == [dets[1], dets[2]], "largest two, kept in score order"
    assert select_faces(dets, size, only_center_face=True) == [dets[3]]
    assert select_faces(dets, size, only_center_face=True, min_face_size=20) == [dets[1]]
    assert select_faces([], size, only_center_face=True) == []


def test_factory_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown detector 'dlib'; choose from \['yunet'"):
        create_detector("dlib")
    monkeypatch.setenv("OSDFACE_HOME", str(tmp_path))
    with pytest.raises(DetectorWeightsNotFoundError, match="detection_Resnet50_Final.pth") as e:
        create_detector("retinaface_resnet50")
    assert str(tmp_path / "face") in str(e.value)
    assert set(DETECTORS) == {"yunet", "retinaface_resnet50", "retinaface_mobile0.25"}


# ------------------------------------------------------------------------------------ RetinaFace
def test_retinaface_state_dict_layout_matches_facexlib():
    r50 = RetinaFaceNet("resnet50").state_dict()
    expect = {
        "body.conv1.weight": (64, 3, 7, 7), "body.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "body.layer4.2.bn3.running_var": (2048,), "fpn.output1.0.weight": (256, 512, 1, 1),
        "fpn.merge2.0.weight": (256, 256, 3, 3), "ssh1.conv3X3.0.weight": (128, 256, 3, 3),
        "ssh3.conv7x7_3.1.bias": (64,), "ClassHead.0.conv1x1.weight": (4, 256, 1, 1),
        "BboxHead.2.conv1x1.weight": (8, 256, 1, 1), "LandmarkHead.1.conv1x1.bias": (20,),
    }
    for k, shape in expect.items():
        assert tuple(r50[k].shape) == shape, k
    assert not any(k.startswith("body.fc") for k in r50)
    mnet = RetinaFaceNet("mobilenet0.25").state_dict()
    assert tuple(mnet["body.stage1.0.0.weight"].shape) == (8, 3, 3, 3)
    assert tuple(mnet["body.stage3.1.3.weight"].shape) == (256, 256, 1, 1)
    assert tuple(mnet["fpn.output3.0.weight"].shape) == (64, 256, 1, 1)


def test_priors_and_decoding():
    pri = prior_boxes("mobilenet0.25", 64, 96)
    # 2 anchors per cell at strides 8, 16, 32
    assert pri.shape == ((8 * 12 + 4 * 6 + 2 * 3) * 2, 4)
    torch.testing.assert_close(pri[0], torch.tensor([4 / 96, 4 / 64, 16 / 96, 16 / 64]))
    torch.testing.assert_close(pri[1], torch.tensor([4 / 96, 4 / 64, 32 / 96, 32 / 64]))
    boxes = decode_boxes(torch.zeros(len(pri), 4), pri)
    torch.testing.assert_close(boxes[0], torch.tensor([-4 / 96, -4 / 64, 12 / 96, 12 / 64]))
    loc = torch.zeros(1, 4)
    loc[0, 2] = np.log(2) / 0.2  # doubles the width
    torch.testing.assert_close(decode_boxes(loc, pri[:1])[0, 2] - decode_boxes(loc, pri[:1])[0, 0],
                               torch.tensor(32 / 96))
    lm = decode_landmarks(torch.zeros(1, 10), pri[:1])
    torch.testing.assert_close(lm, pri[:1, :2].repeat(1, 5))
    keep = nms(np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], float), np.array([0.8, 0.9, 0.7]), 0.4)
    assert keep.tolist() == [1, 2]


def test_retinaface_detector_loads_a_facexlib_style_file(tmp_path, astronaut):
    torch.manual_seed(0)
    net = RetinaFaceNet("mobilenet0.25")
    with torch.no_grad():  # make exactly one anchor type of the coarsest level fire everywhere
        for head in net.ClassHead:
            head.conv1x1.weight.zero_()
            head.conv1x1.bias.copy_(torch.tensor([5.0, -5.0, 5.0, -5.0]))
        net.ClassHead[2].conv1x1.bias.copy_(torch.tensor([-5.0, 5.0, 5.0, -5.0]))
        for head in (*net.BboxHead, *net.LandmarkHead):
            head.conv1x1.weight.zero_()
            head.conv1x1.bias.zero_()
    path = tmp_path / "detection_mobilenet0.25_Final.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)  # DataParallel prefix
    det = RetinaFaceDetector(path, network="mobilenet0.25", score_threshold=0.5, nms_threshold=0.4)
    dets = det(astronaut)
    # stride-32 anchors of size 256 centred on the grid; NMS thins them to a non-overlapping set
    assert dets and all(abs(d.width - 256) < 1e-3 and abs(d.height - 256) < 1e-3 for d in dets)
    centres = np.array([d.center for d in dets])
    assert np.allclose((centres - 16) % 32, 0, atol=1e-3)
    assert np.allclose(dets[0].landmarks, dets[0].center, atol=1e-3)
    assert all(d.score == pytest.approx(1 / (1 + np.exp(-10)), abs=1e-4) for d in dets)
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a RetinaFace-resnet50 state dict"):
        RetinaFaceDetector(bad)


def test_yunet_file_is_shipped_in_the_package(tmp_path, monkeypatch):
    """The default detector's ONNX file comes from osdface/assets/ (issue 17), byte-identical to the
    OpenCV Zoo int8 file whose SHA-256 and licence assets/README.md records."""
    import hashlib
    from pathlib import Path

    import osdface
    from osdface.face.detection import YUNET_FILE, find_yunet_model

    monkeypatch.setenv("OSDFACE_HOME", str(tmp_path))  # no user copy
    path = find_yunet_model()
    assets = Path(osdface.__file__).parent / "assets"
    assert path == assets / YUNET_FILE
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    readme = (assets / "README.md").read_text()
    assert digest == "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10" and digest in readme
    assert "MIT" in readme
