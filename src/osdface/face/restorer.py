"""FaceRestorer: whole photos in, restored photos out (detect → align → restore → paste back).

The GFPGANer role, but stateless: nothing about one photo is kept on the object between calls,
so one restorer can serve many photos (and threads that do not share a pipeline call).

Stages, each usable on its own:

1. :meth:`FaceRestorer.prepare` — detect (or take given detections), filter, align the crops;
2. :meth:`FaceRestorer.restore_crops` — run the one-step pipeline on aligned crops in batches,
   then the colour fix;
3. :meth:`FaceRestorer.finish` — upscale the background, build the paste masks (soft, optionally
   parsing-based) and paste the faces back.

:meth:`FaceRestorer.restore` runs all three for one photo; :meth:`FaceRestorer.restore_many`
streams many photos and batches the faces of *all* of them through the pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..color import get_color_fix
from ..constants import DEFAULT_BATCH_SIZE
from ..errors import InvalidSettingError
from ..image import LoadedImage
from ..utils.logging import get_logger
from .alignment import estimate_affine, invert_affine, warp_face
from .background import ResizeUpsampler, create_bg_upsampler, output_size
from .detection import FaceDetector, create_detector, select_faces
from .paste import paste_faces, soft_mask
from .types import Detection, FaceCrop, RestoreResult

logger = get_logger(__name__)


@dataclass
class PreparedPhoto:
    """A photo after detection and alignment, before restoration (see :meth:`FaceRestorer.prepare`).

    Attributes:
        rgb: ``(H, W, 3)`` uint8 RGB input.
        alpha: ``(H, W)`` uint8 alpha or ``None``.
        faces: aligned faces (``restored`` still ``None``).
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    faces: list[FaceCrop] = field(default_factory=list)


def as_rgb_uint8(image) -> tuple[np.ndarray, np.ndarray | None]:
    """Photo in any supported form → ``((H, W, 3) uint8 RGB, (H, W) uint8 alpha or None)``.

    Accepts a :class:`~osdface.image.LoadedImage`, a uint8 array ``(H, W)``, ``(H, W, 3)`` or
    ``(H, W, 4)`` (RGBA), a float array in [0, 1], a PIL image, or a ``(3, H, W)`` /
    ``(1, 3, H, W)`` float tensor in [0, 1].
    """
    from ..image import to_tensor, to_uint8

    if isinstance(image, LoadedImage):
        return image.rgb, image.alpha
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        if image.ndim == 2:
            return np.repeat(image[..., None], 3, axis=2), None
        if image.ndim == 3 and image.shape[2] == 4:
            return np.ascontiguousarray(image[..., :3]), np.ascontiguousarray(image[..., 3])
        if image.ndim == 3 and image.shape[2] == 3:
            return np.ascontiguousarray(image), None
        raise ValueError(f"expected an (H, W, 3) RGB photo, got an array of shape {image.shape}")
    try:
        from PIL import Image

        if isinstance(image, Image.Image) and ("A" in image.getbands() or "transparency" in image.info):
            rgba = np.asarray(image.convert("RGBA"))
            return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3])
    except ImportError:  # pragma: no cover - pillow is a core dependency
        pass
    t = to_tensor(image, name="image")
    if t.shape[0] != 1:
        raise ValueError(f"restore() takes one photo, got a batch of {t.shape[0]}; use restore_many()")
    return to_uint8(t)[0], None


class FaceRestorer:
    """Restore every face of whole photos with an :class:`~osdface.pipelines.OSDFacePipeline`.

    Args:
        pipeline: the one-step pipeline (``pipe(x, output_type="pt")`` on ``(B, 3, R, R)`` in [0, 1]).
        detector: a detector name from :data:`osdface.face.detection.DETECTORS`, a
            :class:`~osdface.face.detection.FaceDetector`, or ``None`` (then detections must be
            passed to :meth:`prepare`).
        upscale: output scale of the whole photo (≥ 1; faces are pasted at that scale).
        face_size: side of the aligned crops (default: ``pipeline.resolution``).
        color_fix: ``"wavelet"``, ``"adain"`` or ``"none"`` (:mod:`osdface.color`).
        paste_back: paste restored faces into the photo; if False only the crops are returned.
        bg_upsampler: interpolation name, ``.pth`` path (Real-ESRGAN RRDBNet) or a callable
            ``(rgb, scale) -> rgb`` for the background when ``upscale > 1``.
        parser: optional face parser (``FaceParser`` or a path to ``parsing_parsenet.pth``).
        max_faces / min_face_size / only_center_face: face filters (:func:`select_faces`).
        batch_size: faces per pipeline call (default :data:`osdface.constants.DEFAULT_BATCH_SIZE`, as the CLI).
        latent: ``"mode"`` (deterministic) or ``"sample"``.
        seed: seed of the generator for ``latent="sample"``.
        mask_erode / mask_feather: paste-mask shape (fractions of the crop side).
        border: how alignment fills crop pixels outside the photo (``constant`` grey, ``reflect``...).
        fidelity: W in [0, 1], the fidelity ↔ quality knob (docs/fidelity.md): 0 (default) = the
            model's output, bit for bit; 1 = the input face.
        timestep / latent_strength: the pipeline's advanced pair (:meth:`OSDFacePipeline.__call__`);
            ``None`` / 1.0 = the official values.
        identity: per-face identity check between each LQ crop and its restored crop: ``None``
            (off, unless ``min_identity`` is set), ``"sface"`` or an
            :class:`~osdface.face.identity.IdentityScorer`. Fills ``FaceCrop.identity``.
        min_identity: flag faces whose similarity is below this (``FaceCrop.identity_flagged``);
            turns the check on.
        keep_original_below: paste the LQ face instead of the restored one for flagged faces.
        paste_face_size: side at which the restored faces are pasted (≥ ``face_size``, e.g. 1024):
            each restored crop is upsampled with ``bg_upsampler`` before paste-back, so large
            portraits do not get a soft 512 face. ``None`` = ``face_size``. Pixels outside the
            faces are untouched either way.
    """

    def __init__(self, pipeline, detector: str | FaceDetector | None = "yunet", upscale: float = 1,
                 face_size: int | None = None, color_fix: str = "wavelet", paste_back: bool = True,
                 bg_upsampler: str | Callable | None = "lanczos", parser=None, max_faces: int | None = None,
                 min_face_size: float = 0.0, only_center_face: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
                 latent: str = "mode", seed: int | None = None, mask_erode: float = 0.04,
                 mask_feather: float = 0.10, border: str = "constant", fidelity: float = 0.0,
                 timestep: int | None = None, latent_strength: float = 1.0, identity=None,
                 min_identity: float | None = None, keep_original_below: bool = False,
                 paste_face_size: int | None = None) -> None:
        if upscale < 1:
            raise InvalidSettingError(f"upscale must be >= 1, got {upscale}")
        if batch_size < 1:
            raise InvalidSettingError(f"batch_size must be >= 1, got {batch_size}")
        self.pipeline = pipeline
        self.detector = create_detector(detector) if isinstance(detector, str) else detector
        self.upscale = float(upscale)
        self.face_size = int(face_size or getattr(pipeline, "resolution", 512))
        self.color_fix_name = color_fix
        self._color_fix = get_color_fix(color_fix)
        self.paste_back = bool(paste_back)
        if isinstance(bg_upsampler, str) or bg_upsampler is None:
            bg_upsampler = create_bg_upsampler(bg_upsampler)
        self.bg_upsampler = bg_upsampler
        if isinstance(parser, (str, os.PathLike)):
            from .parsing import FaceParser

            parser = FaceParser.from_file(parser)
        self.parser = parser
        self.max_faces, self.min_face_size, self.only_center_face = max_faces, float(min_face_size), only_center_face
        self.batch_size = int(batch_size)
        self.latent, self.seed = latent, seed
        self.border = border
        self._base_mask = soft_mask(self.face_size, mask_erode, mask_feather)
        self._pipe_kwargs = self._model_settings(fidelity, timestep, latent_strength)
        self.fidelity = float(fidelity)
        if min_identity is not None and not -1.0 <= float(min_identity) <= 1.0:
            raise InvalidSettingError(f"min_identity must be a cosine similarity in [-1, 1], got {min_identity}")
        self.min_identity = None if min_identity is None else float(min_identity)
        self.keep_original_below = bool(keep_original_below)
        if keep_original_below and min_identity is None:
            raise InvalidSettingError("keep_original_below needs min_identity (--min-identity S)")
        if identity is None and min_identity is not None:
            identity = "sface"
        if isinstance(identity, str):
            if identity != "sface":
                raise InvalidSettingError(f"unknown identity recogniser {identity!r}; choose sface")
            from .identity import IdentityScorer

            identity = IdentityScorer()
        self.identity = identity
        self.paste_face_size = int(paste_face_size) if paste_face_size else self.face_size
        if self.paste_face_size < self.face_size:
            raise InvalidSettingError(f"paste_face_size {paste_face_size} is below the face size {self.face_size}")
        self._paste_mask = (self._base_mask if self.paste_face_size == self.face_size
                            else soft_mask(self.paste_face_size, mask_erode, mask_feather))

    def _model_settings(self, fidelity: float, timestep: int | None, latent_strength: float) -> dict:
        """The pipeline keywords for the fidelity knob and the advanced pair (only non-defaults, so
        pipelines without them, e.g. exported runners, work at the defaults)."""
        from ..pipelines.pipeline_osdface import check_fidelity, check_latent_strength

        kw: dict = {}
        if check_fidelity(fidelity) != 0.0:
            kw["fidelity"] = float(fidelity)
        if timestep is not None:
            kw["timestep"] = timestep
        if check_latent_strength(latent_strength) != 1.0:
            kw["latent_strength"] = float(latent_strength)
        if kw:
            import inspect

            params = inspect.signature(self.pipeline.__call__).parameters
            missing = [k for k in kw if k not in params]
            if missing:
                raise InvalidSettingError(f"{', '.join(missing)}: not supported by {type(self.pipeline).__name__} "
                                          "(use the PyTorch pipeline, --backend torch)")
        return kw

    # ------------------------------------------------------------------ stage 1: detect + align
    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Detect and filter faces on an ``(H, W, 3)`` uint8 RGB photo."""
        if self.detector is None:
            raise ValueError("this FaceRestorer has no detector; pass detections to prepare()")
        dets = self.detector(rgb)
        return select_faces(dets, rgb.shape[:2], self.max_faces, self.min_face_size, self.only_center_face)

    def prepare(self, image, detections: list[Detection] | None = None) -> PreparedPhoto:
        """Detect (unless ``detections`` are given; those are used as they are) and align the faces."""
        rgb, alpha = as_rgb_uint8(image)
        dets = self.detect(rgb) if detections is None else list(detections)
        faces = []
        for d in dets:
            affine = estimate_affine(d.landmarks, self.face_size)
            lq = warp_face(rgb, affine, self.face_size, border=self.border)
            faces.append(FaceCrop(detection=d, affine=affine, inverse_affine=invert_affine(affine), lq=lq))
        return PreparedPhoto(rgb=rgb, alpha=alpha, faces=faces)

    # ------------------------------------------------------------------ stage 2: the model
    def restore_crops(self, crops: np.ndarray) -> np.ndarray:
        """Aligned crops ``(N, S, S, 3)`` uint8 RGB → restored ``(N, S, S, 3)`` uint8 (colour-fixed)."""
        import torch
        import torch.nn.functional as F

        from ..image import to_tensor, to_uint8

        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[0] == 0:
            return np.zeros((0, self.face_size, self.face_size, 3), np.uint8)
        outs = []
        for i in range(0, crops.shape[0], self.batch_size):
            lq = to_tensor(list(crops[i:i + self.batch_size]))  # (b, 3, S, S) in [0, 1]
            gen = None
            if self.latent == "sample":
                gen = torch.Generator(device=self.pipeline.device).manual_seed(int(self.seed or 0) + i)
            pred = self.pipeline(lq, output_type="pt", latent=self.latent, generator=gen,
                                 **self._pipe_kwargs).images.float()
            if pred.shape[-1] != lq.shape[-1]:
                pred = F.interpolate(pred, size=lq.shape[-2:], mode="bicubic", align_corners=False,
                                     antialias=pred.shape[-1] > lq.shape[-1]).clamp(0, 1)
            pred = self._color_fix(pred, lq.to(pred.device, pred.dtype))
            outs.append(to_uint8(pred))
        return np.concatenate(outs)

    # ------------------------------------------------------------------ stage 3: paste back
    def finish(self, prepared: PreparedPhoto, restored: list[np.ndarray] | np.ndarray | None = None) -> RestoreResult:
        """Paste ``restored`` crops (one per face, in order) into the (upscaled) photo."""
        faces = prepared.faces
        if restored is not None:
            if len(restored) != len(faces):
                raise ValueError(f"{len(restored)} restored crops for {len(faces)} faces")
            for f, r in zip(faces, restored):
                f.restored = np.asarray(r, dtype=np.uint8)
        h, w = prepared.rgb.shape[:2]
        result = RestoreResult(image=None, faces=faces, upscale=self.upscale, input_size=(h, w))
        if faces and self.identity is not None:
            self.check_identity(faces)
        if faces and self.parser is not None:
            parse = self.parser(np.stack([f.restored for f in faces]))
            for f, pm in zip(faces, parse):
                f.mask = np.minimum(self._base_mask, pm)
        else:
            for f in faces:
                f.mask = self._base_mask
        if prepared.alpha is not None:
            result.alpha = self._resize_alpha(prepared.alpha)
        if not self.paste_back:
            return result
        bg = self.bg_upsampler(prepared.rgb, self.upscale) if self.upscale != 1 else prepared.rgb
        oh, ow = output_size(h, w, self.upscale)
        if bg.shape[:2] != (oh, ow):
            raise RuntimeError(f"background upsampler returned {bg.shape[:2]}, expected {(oh, ow)}")
        if not faces:
            result.image = bg.copy() if bg is prepared.rgb else bg
            return result
        crops, invs, masks = [f.restored for f in faces], [f.inverse_affine for f in faces], [f.mask for f in faces]
        if self.paste_face_size != self.face_size:
            crops, invs, masks = self._upsample_faces(crops, invs, masks)
        result.image = paste_faces(bg, crops, invs, masks, upscale=ow / w if self.upscale != 1 else 1.0,
                                   areas=[f.detection.area for f in faces])
        return result

    def check_identity(self, faces: list[FaceCrop]) -> None:
        """Fill ``identity`` (and ``identity_flagged`` / ``kept_original``) of restored faces."""
        sims = self.identity(np.stack([f.lq for f in faces]), np.stack([f.restored for f in faces]))
        for f, sim in zip(faces, sims):
            f.identity = float(sim)
            f.identity_flagged = self.min_identity is not None and f.identity < self.min_identity
            if f.identity_flagged:
                logger.warning("face at %s: identity similarity %.3f below --min-identity %.3f%s",
                               [round(float(v)) for v in f.detection.box], f.identity, self.min_identity,
                               "; keeping the original face" if self.keep_original_below else "")
                if self.keep_original_below:
                    f.restored, f.kept_original = f.lq.copy(), True

    def _upsample_faces(self, crops, invs, masks):
        """Restored crops upsampled to ``paste_face_size`` with the background upsampler, their
        inverse affines composed with the pixel-centre scaling, and their masks resized (a parsing
        mask) or rebuilt at the larger size (the soft mask: the same shape, so the same footprint)."""
        k = self.paste_face_size / self.face_size
        r = 1.0 / k  # big-crop pixel x → small-crop pixel r·x + (r − 1)/2 (pixel centres, as cv2.resize)
        to_small = np.array([[r, 0.0, 0.5 * r - 0.5], [0.0, r, 0.5 * r - 0.5], [0.0, 0.0, 1.0]])
        out_c, out_i, out_m = [], [], []
        for crop, inv, mask in zip(crops, invs, masks):
            big = self.bg_upsampler(np.ascontiguousarray(crop), k)
            if big.shape[:2] != (self.paste_face_size,) * 2:
                raise RuntimeError(f"background upsampler returned {big.shape[:2]} for a face, "
                                   f"expected {(self.paste_face_size,) * 2}")
            out_c.append(big)
            out_i.append(np.asarray(inv, np.float64) @ to_small)
            out_m.append(self._paste_mask if mask is self._base_mask else
                         cv2.resize(mask, (self.paste_face_size,) * 2, interpolation=cv2.INTER_LINEAR))
        return out_c, out_i, out_m

    def _resize_alpha(self, alpha: np.ndarray) -> np.ndarray:
        if self.upscale == 1:
            return alpha
        h, w = alpha.shape
        oh, ow = output_size(h, w, self.upscale)
        return cv2.resize(alpha, (ow, oh), interpolation=cv2.INTER_LINEAR)

    # ------------------------------------------------------------------ whole photos
    def restore(self, image, detections: list[Detection] | None = None) -> RestoreResult:
        """Restore every face of one photo.

        Args:
            image: see :func:`as_rgb_uint8` (RGB; uint8 or float in [0, 1]; alpha kept).
            detections: use these faces instead of running the detector.

        Returns:
            :class:`RestoreResult` with the photo (``upscale`` × the input size) and per-face crops.
        """
        prepared = self.prepare(image, detections)
        restored = self.restore_crops(np.stack([f.lq for f in prepared.faces])) if prepared.faces else []
        return self.finish(prepared, restored)

    def restore_many(self, images: Iterable) -> Iterator[RestoreResult | Exception]:
        """Restore a stream of photos, batching faces across photos (``batch_size`` per call).

        Each item may be a photo (as :meth:`restore` accepts), a :class:`PreparedPhoto`, or an
        ``Exception`` (passed through, so callers can keep failed reads in order). Yields one
        result per item, **in input order**: a :class:`RestoreResult` or the ``Exception`` that
        stopped that item (other items go on). At most ``batch_size`` faces plus the photos they
        belong to are held in memory: when more than ``batch_size`` photos wait on a short batch
        (one face, then photos without faces), the faces pending are run without waiting for more.
        """
        from .batching import PhotoFaceQueue

        batcher = PhotoFaceQueue(self.batch_size, lambda crops: self.restore_crops(np.stack(crops)))

        def results(photos) -> Iterator[RestoreResult | Exception]:
            for p in photos:
                if p.error is not None:
                    yield p.error
                    continue
                try:
                    yield self.finish(p.prepared, p.restored)
                except Exception as exc:  # noqa: BLE001 - reported per photo; traceback with -v
                    logger.debug("finishing a photo failed", exc_info=True)
                    yield exc

        for item in images:
            if not isinstance(item, (Exception, PreparedPhoto)):
                try:
                    item = self.prepare(item)
                except Exception as exc:  # noqa: BLE001 - reported per photo; traceback with -v
                    logger.debug("preparing a photo failed", exc_info=True)
                    item = exc
            yield from results(batcher.add(None, item))
        yield from results(batcher.finish())

def align_faces(image, detector: FaceDetector, size: int = 512, border: str = "constant", **filters
                ) -> list[FaceCrop]:
    """Detect and cut FFHQ-aligned ``size``-px crops (no restoration); ``filters`` as :func:`select_faces`."""
    rgb, _ = as_rgb_uint8(image)
    dets = select_faces(detector(rgb), rgb.shape[:2], **filters)
    out = []
    for d in dets:
        affine = estimate_affine(d.landmarks, size)
        out.append(FaceCrop(d, affine, invert_affine(affine), warp_face(rgb, affine, size, border=border)))
    return out


__all__ = ["FaceRestorer", "PreparedPhoto", "align_faces", "as_rgb_uint8", "ResizeUpsampler"]
