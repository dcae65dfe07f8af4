"""Torch datasets of aligned faces: on-the-fly LQ synthesis for training, paired folders for evaluation.

Items are dicts ``{"lq": (3, H, W) float32 in [0, 1], "gt": (3, H, W) float32 in [0, 1],
"path": str, "index": int}`` (RGB), so the default ``DataLoader`` collate gives ``(B, 3, H, W)``
batches in the package's public convention. Pixel work is OpenCV/NumPy (no Python loops over
pixels); decoding goes through :func:`osdface.image.read_image`.

:class:`DegradedFaceDataset` is deterministic per image: the flip and every degradation parameter
come from :func:`osdface.data.degradation.image_seed` ``(seed, relative path, epoch)``, so an item
is identical whatever the worker count, batch size or access order. With ``undecodable="replace"``
(what training uses) an undecodable file does not stop a run: it is skipped (a warning names it,
the trainer logs the count) and another image, chosen from the same seed, takes its place, so a
resumed run still sees the same data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..constants import FACE_SIZE, IMAGE_EXTENSIONS
from ..errors import OSDFaceError
from ..image import ImageError, read_image, to_tensor
from ..utils.logging import get_logger
from .degradation import DegradationConfig, DegradationSpec, Degrader, image_seed
from .files import list_images

__all__ = ["DegradedFaceDataset", "PairedFolderDataset", "DatasetError", "DataFolderNotFoundError",
           "list_images"]  # list_images: re-export

logger = get_logger(__name__)


class DatasetError(OSDFaceError, ValueError):
    """A data folder cannot be used (no images, unmatched pairs) or the degradation config is invalid."""


class DataFolderNotFoundError(OSDFaceError, FileNotFoundError):
    """A data folder does not exist."""


def _list_images(root: Path, recursive: bool = True) -> list[str]:
    try:
        return list_images(root, recursive=recursive)
    except FileNotFoundError as e:
        raise DataFolderNotFoundError(str(e)) from None


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(h, w, 3)`` → ``(size, size, 3)``: INTER_AREA to shrink, bicubic to enlarge."""
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_CUBIC
    return cv2.resize(img, (size, size), interpolation=interp)


class DegradedFaceDataset(Dataset):
    """HQ aligned faces from one or more folders, with LQ synthesised on the fly (docs/method.md §7).

    Args:
        roots: one folder or several (e.g. FFHQ and FFHQR); images are found recursively and
            pooled (uniform sampling over the union).
        degradation: a preset name (``"daefr"``, ``"osediff-face"``), a YAML path, a mapping
            (optionally with ``preset: NAME``) or a :class:`~osdface.data.degradation.DegradationConfig`
            (a training config's ``data.degradation`` section).
        size: side of the square output; HQ images of another size are resized (area/bicubic).
        hflip: random horizontal flip (probability 0.5, drawn per image and epoch).
        seed: global non-negative seed.
        undecodable: what an image that cannot be decoded does when read: ``"raise"`` its
            :class:`~osdface.image.ImageError` (default), or ``"replace"`` it (training, see below).

    Each image's identity is its POSIX path relative to its root, prefixed with the root's
    folder name when there are several roots (``"ffhq/00001.png"``); with ``seed`` and the epoch
    it fixes the flip and all degradation parameters.

    Call :meth:`set_epoch` before iterating a new epoch. The epoch lives in a shared-memory
    tensor, so it also reaches ``persistent_workers=True`` DataLoader workers (set it before the
    epoch's ``iter(loader)``, not while a loader is mid-epoch).

    With ``undecodable="replace"``, an image that cannot be decoded (corrupt, truncated, deleted
    during the run) is skipped: a warning names it, :attr:`undecodable_mask` marks it (shared with DataLoader workers, so the
    trainer can log the count) and another image takes its place, drawn from a permutation seeded
    by the item's own seed (the same replacement in every run). Its flip and degradation still come
    from the skipped item's seed.

    Raises:
        DataFolderNotFoundError: a missing root (a ``FileNotFoundError``).
        DatasetError: a root without images, or an invalid degradation (a ``ValueError``).
        ImageError: (when reading an item) an undecodable image, or with ``"replace"`` when no
            image of the dataset can be decoded.
    """

    def __init__(
        self,
        roots: str | os.PathLike | Sequence[str | os.PathLike],
        degradation: DegradationSpec = "daefr",
        size: int = FACE_SIZE,
        hflip: bool = True,
        seed: int = 0,
        undecodable: Literal["raise", "replace"] = "raise",
    ) -> None:
        if isinstance(roots, (str, os.PathLike)):
            roots = [roots]
        self.roots = [Path(r) for r in roots]
        if not self.roots:
            raise DatasetError("DegradedFaceDataset needs at least one folder")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if undecodable not in ("raise", "replace"):
            raise ValueError(f"undecodable must be 'raise' or 'replace', got {undecodable!r}")
        self.undecodable = undecodable
        try:
            self.degrader = Degrader(degradation)
        except OSDFaceError:
            raise
        except ValueError as e:  # (a bad degradation config is a ConfigError, re-raised above, naming the key)
            raise DatasetError(str(e)) from None
        self.size = int(size)
        self.hflip = bool(hflip)
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # visible to worker processes
        prefixes = self._root_prefixes(self.roots)
        self.files: list[Path] = []
        self.keys: list[str] = []
        for root, prefix in zip(self.roots, prefixes):
            rel = _list_images(root)
            if not rel:
                raise DatasetError(f"{root}: folder contains no images ({', '.join(IMAGE_EXTENSIONS)})")
            self.files.extend(root / r for r in rel)
            self.keys.extend(prefix + r for r in rel)
        #: 1 for every file found undecodable (in any worker process); shared memory like the epoch
        self.undecodable_mask = torch.zeros(len(self.files), dtype=torch.uint8).share_memory_()
        logger.info("DegradedFaceDataset: %d images from %d folder(s)", len(self.files), len(self.roots))

    @staticmethod
    def _root_prefixes(roots: list[Path]) -> list[str]:
        if len(roots) == 1:
            return [""]
        names = [r.resolve().name or "root" for r in roots]
        out = []
        for i, n in enumerate(names):
            out.append(f"{n}/" if names.count(n) == 1 else f"{n}#{i}/")
        return out

    @property
    def config(self) -> DegradationConfig:
        """The degradation ranges in use."""
        return self.degrader.config

    @property
    def epoch(self) -> int:
        """The current epoch (0 until :meth:`set_epoch` is called)."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: each epoch draws new flips and degradations (deterministically)."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.files)

    def undecodable_files(self) -> list[Path]:
        """The files found undecodable so far (by this process or its DataLoader workers)."""
        return [self.files[i] for i in torch.nonzero(self.undecodable_mask).flatten().tolist()]

    def _try_read(self, index: int) -> np.ndarray | None:
        """RGB pixels of file ``index``, or ``None`` (marked and warned once) when it cannot be decoded."""
        if self.undecodable_mask[index]:
            return None
        try:
            return read_image(self.files[index]).rgb
        except ImageError as e:  # names the file and the reason
            if self.undecodable == "raise":
                raise
            self.undecodable_mask[index] = 1
            logger.warning("skipping an undecodable training image (another image takes its place): %s", e)
            return None

    def _read_or_replace(self, index: int, seed: int) -> tuple[int, np.ndarray]:
        """``(index of the file used, its pixels)``: file ``index``, or the first decodable file of a
        permutation seeded by ``seed`` when it cannot be decoded."""
        rgb = self._try_read(index)
        if rgb is not None:
            return index, rgb
        for j in np.random.default_rng((seed, 2)).permutation(len(self)).tolist():
            if j != index and (rgb := self._try_read(j)) is not None:
                return j, rgb
        roots = ", ".join(str(r) for r in self.roots)
        raise ImageError(f"none of the {len(self)} training images in {roots} can be decoded "
                         f"(e.g. {self.files[index]}); see the warnings above")

    def sample(self, index: int) -> dict[str, Any]:
        """One item as uint8 arrays plus the drawn parameters (for manifests and debugging).

        Returns:
            ``{"lq": (H, W, 3) uint8, "gt": (H, W, 3) uint8, "path": str, "key": str,
            "seed": int, "epoch": int, "hflip": bool, "params": dict}``; ``path`` and ``key`` are
            those of the replacement when file ``index`` cannot be decoded.
        """
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index = index % len(self)
        epoch = self.epoch
        seed = image_seed(self.seed, self.keys[index], epoch)
        index, rgb = self._read_or_replace(index, seed)
        key = self.keys[index]
        gt = _resize(rgb, self.size)
        flip = self.hflip and bool(np.random.default_rng((seed, 1)).random() < 0.5)
        if flip:
            gt = np.ascontiguousarray(gt[:, ::-1])
        lq, params = self.degrader(gt, seed)
        return {"lq": lq, "gt": gt, "path": str(self.files[index]), "key": key, "seed": seed,
                "epoch": epoch, "hflip": flip, "params": params}

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.sample(index)
        return {"lq": to_tensor(s["lq"])[0], "gt": to_tensor(s["gt"])[0], "path": s["path"], "index": int(index)}


class PairedFolderDataset(Dataset):
    """LQ/GT image pairs from two folders, matched by file stem (evaluation sets such as CelebA-Test).

    Args:
        lq_dir: folder of LQ images (non-recursive).
        gt_dir: folder of GT images; every LQ stem must have a GT file with the same stem
            (extra GT files are ignored with a log message).
        size: resize both images to ``size × size`` (area/bicubic); ``None`` keeps the file sizes
            (LQ and GT may then differ in size, and batching needs equal sizes).

    Items: ``{"lq", "gt": (3, H, W) float32 in [0, 1], "path": LQ path, "gt_path": str, "index"}``.

    Raises:
        ValueError: empty folder, duplicate stems in a folder, or LQ stems without a GT partner
            (the message lists them).
    """

    def __init__(self, lq_dir: str | os.PathLike, gt_dir: str | os.PathLike, size: int | None = None) -> None:
        self.lq_dir, self.gt_dir = Path(lq_dir), Path(gt_dir)
        if size is not None and size < 1:
            raise ValueError(f"size must be positive or None, got {size}")
        self.size = size
        lq = self._by_stem(self.lq_dir)
        gt = self._by_stem(self.gt_dir)
        missing = sorted(set(lq) - set(gt))
        if missing:
            shown = ", ".join(missing[:10]) + (f" … ({len(missing)} in all)" if len(missing) > 10 else "")
            raise DatasetError(f"{self.gt_dir}: no GT image for LQ stem(s) {shown}")
        extra = set(gt) - set(lq)
        if extra:
            logger.info("%s: %d GT image(s) without an LQ partner ignored", self.gt_dir, len(extra))
        self.pairs = [(lq[s], gt[s]) for s in sorted(lq)]

    @staticmethod
    def _by_stem(folder: Path) -> dict[str, Path]:
        files = _list_images(folder, recursive=False)
        if not files:
            raise DatasetError(f"{folder}: folder contains no images ({', '.join(IMAGE_EXTENSIONS)})")
        out: dict[str, Path] = {}
        for name in files:
            stem = Path(name).stem
            if stem in out:
                raise DatasetError(f"{folder}: two images share the stem {stem!r} ({out[stem].name}, {name})")
            out[stem] = folder / name
        return out

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, path: Path) -> np.ndarray:
        rgb = read_image(path).rgb
        return rgb if self.size is None else _resize(rgb, self.size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        lq_path, gt_path = self.pairs[index]
        return {
            "lq": to_tensor(self._load(lq_path))[0],
            "gt": to_tensor(self._load(gt_path))[0],
            "path": str(lq_path),
            "gt_path": str(gt_path),
            "index": int(index),
        }

