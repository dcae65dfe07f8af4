"""Evaluate a folder of restored images (optionally against a GT folder matched by file stem)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..constants import IMAGE_EXTENSIONS
from ..errors import InvalidSettingError
from ..utils.io import is_temp_name
from ..utils.logging import get_logger
from .metrics import IdentityMetric, Metric, create_metric, metric_info
from .report import EvalReport

logger = get_logger(__name__)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder``, sorted by name.

    Hidden files and osdface temporaries (partial writes of a killed run) are skipped.

    Raises:
        InvalidSettingError: ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidSettingError(f"{folder}: no such folder")
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and not is_temp_name(p.name) and p.suffix.lower() in IMAGE_EXTENSIONS
                  and p.is_file())


def duplicate_stems(files: Sequence[Path]) -> dict[str, list[Path]]:
    """``{stem: files}`` for the stems that more than one of ``files`` share (``a.png``, ``a.jpg``)."""
    by_stem: dict[str, list[Path]] = {}
    for f in files:
        by_stem.setdefault(f.stem, []).append(f)
    return {s: fs for s, fs in by_stem.items() if len(fs) > 1}


def match_by_stem(pred_files: Sequence[Path], gt_dir: str | os.PathLike) -> tuple[dict[Path, Path], list[str]]:
    """``{pred: gt}`` for files whose stems match; problems for preds without GT or duplicate stems.

    Predictions that share a stem (``a.png`` and ``a.jpg``) are ambiguous: neither is paired, and
    one problem names all of them.
    """
    gt = {}
    problems = []
    for g in list_images(gt_dir):
        if g.stem in gt:
            problems.append(f"{g}: duplicate GT stem {g.stem!r} (also {gt[g.stem].name}); using the first")
            continue
        gt[g.stem] = g
    dups = duplicate_stems(pred_files)
    for stem, fs in dups.items():
        problems.append(f"{fs[0]}: predictions {', '.join(f.name for f in fs)} share the stem {stem!r}, so which "
                        "one to compare with the GT is ambiguous; none of them is scored (rename all but one)")
    pairs = {}
    for p in pred_files:
        if p.stem in dups:
            continue
        if p.stem in gt:
            pairs[p] = gt[p.stem]
        else:
            problems.append(f"{p}: no GT image with stem {p.stem!r} in {gt_dir}")
    return pairs, problems


def evaluate_folder(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike | None = None,
    metrics: Sequence[str] = ("psnr", "ssim", "lpips", "dists"),
    device: str | torch.device = "cpu",
    weights_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    fid_stats: str | os.PathLike | None = None,
    fid_cache_dir: str | os.PathLike | None = None,
    use_fid_cache: bool = True,
    progress: bool = True,
    built: dict[str, Metric] | None = None,
) -> EvalReport:
    """Compute ``metrics`` for every image of ``pred_dir``.

    Full-reference metrics need ``gt_dir`` (files matched by stem). ``fid`` is computed against
    ``gt_dir`` (reported as ``fid``) and/or the statistics file ``fid_stats`` (reported as
    ``fid_ffhq`` when both are given). Files that cannot be read or whose GT is missing or of a
    different size are skipped and listed in ``report.problems``; the rest are still evaluated.

    Args:
        built: already-built metrics by name (re-used across folders by ``benchmark-table``).
    """
    from tqdm.auto import tqdm

    from ..image import ImageError, read_image, to_tensor

    pred_files = list_images(pred_dir)
    if not pred_files:
        raise InvalidSettingError(f"{pred_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    names = list(dict.fromkeys(metrics))
    for n in names:
        metric_info(n)  # unknown names fail before any work
    fr = [n for n in names if metric_info(n).full_reference and not metric_info(n).set_level]
    if fr and gt_dir is None:
        raise InvalidSettingError(f"metrics {fr} need --gt (full-reference)")
    if "fid" in names and gt_dir is None and fid_stats is None:
        raise InvalidSettingError("fid needs --gt (FID against the GT set) or --fid-stats (e.g. FFHQ statistics)")

    built = dict(built or {})
    for n in names:
        if n not in built:
            built[n] = create_metric(n, device=device, weights_dir=weights_dir)
    problems: list[str] = []
    pairs: dict[Path, Path | None]
    if gt_dir is not None:
        pairs, problems = match_by_stem(pred_files, gt_dir)
        if not fr and "fid" not in names:  # NR-only: GT not needed for every file (ambiguous stems stay out)
            dups = duplicate_stems(pred_files)
            pairs = {p: pairs.get(p) for p in pred_files if p.stem not in dups}
    else:
        pairs = {p: None for p in pred_files}

    per_image: dict[str, dict[str, float]] = {}
    image_metrics = [n for n in names if not built[n].set_level]
    bar = tqdm(total=len(pairs), desc="evaluate", unit="img", disable=not progress)
    items = list(pairs.items())
    batch: list[tuple[Path, torch.Tensor, torch.Tensor | None]] = []

    def flush():
        if not batch:
            return
        pred_t = torch.cat([b[1] for b in batch])
        gt_t = torch.cat([b[2] for b in batch]) if batch[0][2] is not None else None
        for n in image_metrics:
            m = built[n]
            vals = m(pred_t, gt_t if m.full_reference else None)
            for (p, _, _), v in zip(batch, vals.tolist()):
                per_image.setdefault(p.name, {})[n] = float(v)
        bar.update(len(batch))
        batch.clear()

    for p, g in items:
        try:
            pt = to_tensor(read_image(p).rgb)
            gtt = to_tensor(read_image(g).rgb) if g is not None else None
        except ImageError as e:
            problems.append(str(e))
            bar.update(1)
            continue
        if gtt is not None and gtt.shape != pt.shape:
            problems.append(f"{p}: size {tuple(pt.shape[-2:])} differs from GT {g.name} {tuple(gtt.shape[-2:])}")
            bar.update(1)
            continue
        if batch and batch[0][1].shape != pt.shape:
            flush()
        batch.append((p, pt, gtt))
        if len(batch) >= batch_size:
            flush()
    flush()
    bar.close()

    means: dict[str, float] = {}
    lower = {}
    for n in image_metrics:
        vals = [d[n] for d in per_image.values() if n in d]
        m = built[n]
        if isinstance(m, IdentityMetric):
            means[n] = m.aggregate(vals)
        else:
            kept = [v for v in vals if not np.isnan(v)]  # inf (PSNR of identical images) is kept
            means[n] = float(np.mean(kept)) if kept else float("nan")
        lower[n] = m.lower_better

    if "fid" in names:
        from .fid import folder_features, load_statistics

        fm = built["fid"]
        good = [p for p in pairs if p.name in per_image or not image_metrics]
        feats = folder_features(good, fm.model, fm.weights_id, batch_size, fid_cache_dir, use_fid_cache, progress)
        if gt_dir is not None:
            gt_files = list_images(gt_dir)
            gfeats = folder_features(gt_files, fm.model, fm.weights_id, batch_size, fid_cache_dir, use_fid_cache,
                                     progress)
            means["fid"] = fm.distance(feats, gfeats)
            lower["fid"] = True
        if fid_stats is not None:
            key = "fid_ffhq" if gt_dir is not None else "fid"
            means[key] = fm.distance(feats, load_statistics(fid_stats))
            lower[key] = True
    for p in problems:
        logger.warning(p)
    meta = {"pred_dir": str(pred_dir), "gt_dir": str(gt_dir) if gt_dir else None, "device": str(device),
            "num_images": len(per_image) if image_metrics else len(pairs)}
    return EvalReport(metrics=means, per_image=per_image, lower_better=lower, problems=problems, meta=meta)
