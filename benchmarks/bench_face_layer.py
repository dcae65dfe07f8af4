"""Time the face layer alone (detection, alignment, colour fix, paste-back) on a 1920×1280 group photo.

The photo is composited from real offline faces (scikit-image's astronaut and the Kodak kodim04
crop in ``tests/assets/face``) at several sizes and tilts. The restoration model is *not* run:
restored crops are stood in by the aligned inputs, because only the pre/post-processing is timed.
Each stage is run ``--repeats`` times after a warm-up; the median is reported.

To express the face layer as a fraction of one face's restoration time with the real architecture,
pass the JSON printed by ``benchmarks/bench_restore.py`` (``--restore-json``) or a number
(``--seconds-per-face``).

    .venv/bin/python benchmarks/bench_face_layer.py
    .venv/bin/python benchmarks/bench_restore.py > r.json && .venv/bin/python benchmarks/bench_face_layer.py --restore-json r.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def group_photo(width: int, height: int, n_faces: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Composite ``n_faces`` real faces (40–200 px, tilted up to ±25°) on a smooth random background."""
    from PIL import Image
    from skimage import data

    astro = np.ascontiguousarray(data.astronaut())
    kodim = np.asarray(Image.open(ROOT / "tests" / "assets" / "face" / "kodim04.jpg").convert("RGB"))
    sources = [(astro, (223.0, 120.0), 90.0), (kodim, (253.0, 175.0), 282.0)]
    rng = np.random.default_rng(seed)
    canvas = cv2.GaussianBlur(cv2.resize(rng.integers(60, 200, (height // 40, width // 40, 3)).astype(np.uint8),
                                         (width, height), interpolation=cv2.INTER_CUBIC), (0, 0), 4)
    cols = int(np.ceil(np.sqrt(n_faces * width / height)))
    rows = int(np.ceil(n_faces / cols))
    for i in range(n_faces):
        src, (fx, fy), fsize = sources[i % 2]
        target = rng.uniform(40, 200)
        scale, angle = target / fsize, rng.uniform(-25, 25)
        cx = (i % cols + 0.5) * width / cols
        cy = (i // cols + 0.5) * height / rows
        m = cv2.getRotationMatrix2D((fx, fy), angle, scale)
        m[:, 2] += np.array([cx, cy]) - np.array([fx, fy])
        warped = cv2.warpAffine(src, m, (width, height), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        mask = cv2.warpAffine(np.ones(src.shape[:2], np.float32), m, (width, height))
        mask = cv2.GaussianBlur(cv2.erode(mask, np.ones((5, 5), np.uint8)), (0, 0), 3)[..., None]
        canvas = np.rint(mask * warped + (1 - mask) * canvas).astype(np.uint8)
    return canvas, n_faces


def median_time(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1280)
    ap.add_argument("--faces", type=int, default=8)
    ap.add_argument("--face-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--retinaface", action="store_true",
                    help="also time RetinaFace-R50/MobileNet (random weights: architecture cost only)")
    ap.add_argument("--restore-json", help="output of benchmarks/bench_restore.py (seconds_per_face is read)")
    ap.add_argument("--seconds-per-face", type=float, help="one face's restoration time, if no --restore-json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)

    from osdface.color import wavelet_color_fix
    from osdface.face.alignment import estimate_affine, invert_affine, warp_face
    from osdface.face.background import ResizeUpsampler
    from osdface.face.detection import RetinaFaceDetector, YuNetDetector
    from osdface.face.paste import paste_faces, soft_mask
    from osdface.face.retinaface import RetinaFaceNet
    from osdface.image import to_tensor

    photo, n_placed = group_photo(args.width, args.height, args.faces)
    s = args.face_size
    result: dict = {"benchmark": "face_layer", "machine": machine(), "opencv": cv2.__version__,
                    "photo": [args.width, args.height], "faces_placed": n_placed, "face_size": s,
                    "repeats": args.repeats, "seconds": {}}
    sec = result["seconds"]

    yunet = YuNetDetector()
    sec["detect_yunet"], dets = median_time(lambda: yunet(photo), args.repeats)
    result["faces_found"] = len(dets)
    if args.retinaface:
        for net_name in ("mobilenet0.25", "resnet50"):
            det = RetinaFaceDetector(net=RetinaFaceNet(net_name), network=net_name, score_threshold=0.99)
            sec[f"detect_retinaface_{net_name}_random_weights"], _ = median_time(lambda d=det: d(photo), 1)

    def align():
        out = []
        for d in dets:
            a = estimate_affine(d.landmarks, s)
            out.append((warp_face(photo, a, s), invert_affine(a)))
        return out

    sec["align_all_faces"], aligned = median_time(align, args.repeats)
    crops = np.stack([c for c, _ in aligned])
    lq = to_tensor(list(crops))

    sec["color_fix_wavelet_all_faces"], _ = median_time(lambda: wavelet_color_fix(lq, lq), args.repeats)
    base = soft_mask(s)
    areas = [d.area for d in dets]
    invs = [inv for _, inv in aligned]
    sec["paste_back_x1"], _ = median_time(
        lambda: paste_faces(photo, list(crops), invs, [base] * len(dets), 1.0, areas), args.repeats)
    up = ResizeUpsampler("lanczos")
    sec["background_lanczos_x2"], bg2 = median_time(lambda: up(photo, 2), args.repeats)
    sec["paste_back_x2"], _ = median_time(
        lambda: paste_faces(bg2, list(crops), invs, [base] * len(dets), 2.0, areas), args.repeats)
    total = sec["detect_yunet"] + sec["align_all_faces"] + sec["color_fix_wavelet_all_faces"] + sec["paste_back_x1"]
    result["face_layer_total_x1"] = total
    result["face_layer_per_face_x1"] = total / max(len(dets), 1)
    result["seconds"] = {k: round(v, 4) for k, v in sec.items()}

    spf = args.seconds_per_face
    if args.restore_json:
        r = json.loads(Path(args.restore_json).read_text())
        spf = min(run["seconds_per_face"] for run in r["runs"]) if "runs" in r else r["seconds_per_face"]
    if spf:
        result["restore_seconds_per_face"] = spf
        result["face_layer_fraction_of_one_face_restore"] = round(total / spf, 4)
        result["face_layer_fraction_of_photo_restore"] = round(total / (total + spf * len(dets)), 4)
    result["face_layer_total_x1"] = round(total, 4)
    result["face_layer_per_face_x1"] = round(result["face_layer_per_face_x1"], 4)
    emit(result)


if __name__ == "__main__":
    main()
