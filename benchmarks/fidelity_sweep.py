"""Fidelity knob sweep (docs/fidelity.md): PSNR to the LQ and SFace identity similarity vs W, and a figure.

The synthetic LQ set: FFHQ-aligned 512-px crops of the two real faces in ``tests/assets`` (Kodak
``kodim04`` and ``skimage.data.astronaut``), each degraded with 4 seeds of the ``daefr`` preset
(:class:`osdface.data.degradation.Degrader`): 8 LQ faces. Each is restored by
:class:`osdface.face.FaceRestorer` (default wavelet colour fix) at W = 0, 0.25, 0.5, 0.75, 1.

Weights: ``--model DIR`` (an ``osdface convert`` folder) or, by default, the **tiny random model**
of :func:`osdface.testing.tiny_pipeline` (seed 0, 64-px, untrained): no OSDFace release weights
exist offline here, so the numbers show the mechanism of the knob, not restoration quality.

    python benchmarks/fidelity_sweep.py --out benchmarks/results/fidelity-tiny.json \\
        --figure docs/images/fidelity-tiny.jpg
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

WS = (0.0, 0.25, 0.5, 0.75, 1.0)
ASSETS = Path(__file__).resolve().parents[1] / "tests" / "assets" / "face"


def hq_faces(detector) -> list[np.ndarray]:
    from PIL import Image
    from skimage import data

    from osdface.face.restorer import align_faces

    photos = [np.asarray(Image.open(ASSETS / "kodim04.jpg").convert("RGB")), data.astronaut()]
    return [align_faces(p, detector, 512)[0].lq for p in photos]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: the tiny random model, seed 0)")
    ap.add_argument("--seeds", type=int, default=4, help="degradations per face")
    ap.add_argument("--out", type=Path, help="JSON results file")
    ap.add_argument("--figure", type=Path, help="PNG: one face at each W (first column: the LQ)")
    args = ap.parse_args(argv)

    from osdface.data.degradation import Degrader
    from osdface.face import FaceRestorer
    from osdface.face.detection import YuNetDetector
    from osdface.face.identity import IdentityScorer
    from osdface.pipelines import OSDFacePipeline
    from osdface.testing import tiny_pipeline

    pipe = OSDFacePipeline.from_pretrained(args.model) if args.model else tiny_pipeline(0)
    weights = args.model or "osdface.testing.tiny_pipeline(seed=0): tiny random untrained model, 64 px"
    deg = Degrader("daefr")
    hq = hq_faces(YuNetDetector())
    lq = np.stack([deg(h, seed=s)[0] for h in hq for s in range(args.seeds)])
    gt = np.stack([h for h in hq for _ in range(args.seeds)])
    scorer = IdentityScorer()
    rows, outs = [], {}
    for w in WS:
        out = FaceRestorer(pipe, detector=None, face_size=512, fidelity=w, batch_size=4).restore_crops(lq)
        outs[w] = out
        rows.append({
            "fidelity": w,
            "psnr_to_lq": float(np.mean([psnr(o, q) for o, q in zip(out, lq)])),
            "identity_to_lq": float(np.mean(scorer(lq, out))),
            "identity_to_hq": float(np.mean(scorer(gt, out))),
        })
        print(f"W={w:.2f}  PSNR to LQ {rows[-1]['psnr_to_lq']:6.2f} dB  identity to LQ "
              f"{rows[-1]['identity_to_lq']:.3f}  to HQ {rows[-1]['identity_to_hq']:.3f}")
    result = {"weights": weights, "faces": int(len(lq)), "degradation": f"daefr preset, seeds 0..{args.seeds - 1}",
              "identity": "SFace cosine (osdface.face.identity)", "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.figure:
        import cv2
        from PIL import Image

        i = args.seeds  # the astronaut, first degradation
        tiles = [lq[i]] + [outs[w][i] for w in WS]
        tiles = [cv2.resize(t, (192, 192), interpolation=cv2.INTER_AREA) for t in tiles]
        strip = np.concatenate(tiles, axis=1)
        label = np.full((24, strip.shape[1], 3), 255, np.uint8)
        for k, text in enumerate(["LQ"] + [f"W={w:g}" for w in WS]):
            cv2.putText(label, text, (k * 192 + 8, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate([label, strip], axis=0)).save(args.figure, quality=88, optimize=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
