"""Contact sheets for visual comparison: rows of LQ | restored | GT, as a PNG or an HTML page."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .report import EvalReport


def _tile(path: Path | None, size: int) -> np.ndarray:
    from PIL import Image

    from ..image import read_image

    if path is None:
        return np.full((size, size, 3), 127, np.uint8)
    img = Image.fromarray(read_image(path).rgb).resize((size, size), Image.BICUBIC)
    return np.asarray(img)


def contact_sheet(
    out: str | os.PathLike,
    pred_files: Sequence[Path],
    gt_dir: str | os.PathLike | None = None,
    lq_dir: str | os.PathLike | None = None,
    report: EvalReport | None = None,
    tile: int = 256,
    max_rows: int = 32,
) -> Path:
    """Write a comparison sheet; ``.html`` → a page (images referenced by path, metrics per row),
    any image suffix → one PNG/JPEG grid with columns LQ | restored | GT (missing ones grey).

    LQ and GT files are matched to the restored files by stem.
    """
    from ..image import save_image
    from ..utils.io import write_text_atomic
    from .folder import list_images

    out = Path(out)
    lq = {p.stem: p for p in list_images(lq_dir)} if lq_dir else {}
    gt = {p.stem: p for p in list_images(gt_dir)} if gt_dir else {}
    rows = list(pred_files)[:max_rows]
    if out.suffix.lower() in (".html", ".htm"):
        names = list(report.metrics) if report else []
        parts = ["<!doctype html><meta charset='utf-8'><title>osdface comparison</title>",
                 f"<style>img{{width:{tile}px}}td{{vertical-align:top;font:12px sans-serif}}</style><table>",
                 "<tr><th>file</th><th>LQ</th><th>restored</th><th>GT</th><th>metrics</th></tr>"]
        for p in rows:
            cells = [f"<td>{html.escape(p.name)}</td>"]
            for q in (lq.get(p.stem), p, gt.get(p.stem)):
                cells.append(f"<td><img src='{html.escape(q.resolve().as_uri())}'></td>" if q else "<td>–</td>")
            vals = report.per_image.get(p.name, {}) if report else {}
            cells.append("<td>" + "<br>".join(f"{html.escape(k)}: {vals[k]:.4f}" for k in names if k in vals) + "</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
        write_text_atomic(out, "\n".join(parts) + "\n")
        return out
    grid = [np.concatenate([_tile(lq.get(p.stem), tile), _tile(p, tile), _tile(gt.get(p.stem), tile)], axis=1)
            for p in rows]
    save_image(out, np.concatenate(grid, axis=0))
    return out
