"""Evaluation reports: JSON (``{"metrics", "per_image"}``), CSV and Markdown tables in the paper's layout."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

#: Column titles and order of the paper's tables (docs/method.md §9); other metrics follow in given order.
PAPER_TITLES = {
    "psnr": "PSNR", "ssim": "SSIM", "psnr_y": "PSNR(Y)", "ssim_y": "SSIM(Y)",
    "lpips": "LPIPS", "lpips_vgg": "LPIPS(VGG)", "dists": "DISTS", "clipiqa": "C-IQA", "maniqa": "M-IQA",
    "musiq": "MUSIQ", "niqe": "NIQE", "ids": "Deg.", "ids_facenet": "Deg.(FaceNet)", "lmd": "LMD",
    "fid": "FID", "fid_ffhq": "FID(FFHQ)", "fid_hq": "FID(HQ)",
}
TABLE1_ORDER = ("lpips", "dists", "musiq", "niqe", "ids", "ids_facenet", "lmd", "fid_ffhq", "fid_hq", "fid")
TABLE2_ORDER = ("clipiqa", "maniqa", "musiq", "niqe", "fid", "fid_ffhq")


def _fmt(v: float, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def order_metrics(names, layout: str = "table1") -> list[str]:
    """Paper column order first (Table 1 or 2), then the remaining names as given."""
    order = TABLE1_ORDER if layout == "table1" else TABLE2_ORDER
    first = [m for m in order if m in names]
    return first + [m for m in names if m not in first]


def report_paths(out: str | os.PathLike) -> dict[str, Path]:
    """The files :meth:`EvalReport.save` writes for ``out``: ``{"json": out, "markdown": .md, "csv": .csv}``."""
    out = Path(out)
    return {"json": out, "markdown": out.with_suffix(".md"), "csv": out.with_suffix(".csv")}


def _title(name: str, lower_better: bool | None) -> str:
    arrow = "" if lower_better is None else ("↓" if lower_better else "↑")
    return PAPER_TITLES.get(name, name) + arrow


@dataclass
class EvalReport:
    """Result of evaluating one folder.

    Attributes:
        metrics: ``{metric: mean}`` (set-level metrics: the set value).
        per_image: ``{file name: {metric: value}}``.
        lower_better: ``{metric: bool}`` (arrow direction).
        problems: ``["file: what went wrong", ...]`` (files that were skipped).
        meta: free-form (folders, device, weights).
    """

    metrics: dict[str, float]
    per_image: dict[str, dict[str, float]]
    lower_better: dict[str, bool] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else v

        return {
            "metrics": {k: clean(v) for k, v in self.metrics.items()},
            "per_image": {f: {k: clean(v) for k, v in d.items()} for f, d in self.per_image.items()},
            "lower_better": self.lower_better,
            "problems": self.problems,
            "meta": self.meta,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> EvalReport:
        d = json.loads(text)
        nan = float("nan")
        return cls(
            metrics={k: nan if v is None else v for k, v in d["metrics"].items()},
            per_image={f: {k: nan if v is None else v for k, v in m.items()} for f, m in d["per_image"].items()},
            lower_better=d.get("lower_better", {}), problems=d.get("problems", []), meta=d.get("meta", {}),
        )

    def to_csv(self) -> str:
        """One row per image plus a final ``mean`` row."""
        names = list(self.metrics)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["file", *names])
        for f, d in self.per_image.items():
            w.writerow([f, *[_fmt(d[m], 6) if m in d else "" for m in names]])
        w.writerow(["mean", *[_fmt(self.metrics[m], 6) for m in names]])
        return buf.getvalue()

    def to_markdown(self, method: str = "result", layout: str = "table1") -> str:
        """A one-row table in the paper's layout (↑/↓ arrows)."""
        return benchmark_table({method: self}, layout=layout)

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``out`` (JSON) plus ``.md`` and ``.csv`` beside it, atomically.

        Raises:
            OutputPathError: ``out`` ends in ``.md`` or ``.csv``, so two of the files would be one.
        """
        from ..errors import OutputPathError
        from ..utils.io import write_text_atomic

        paths = report_paths(out)
        if len(set(paths.values())) < len(paths):
            raise OutputPathError(f"{out}: the JSON report and its .md/.csv siblings would be the same file; "
                                  "give a .json path")
        write_text_atomic(paths["json"], self.to_json() + "\n")
        write_text_atomic(paths["markdown"], self.to_markdown(self.meta.get("method", "result")))
        write_text_atomic(paths["csv"], self.to_csv())
        return paths


def benchmark_table(reports: dict[str, EvalReport], layout: str = "table1", digits: int = 4) -> str:
    """Markdown table: one row per method, paper column order, best **bold**, second _italic_."""
    names: list[str] = []
    lower: dict[str, bool] = {}
    for r in reports.values():
        for m in r.metrics:
            if m not in names:
                names.append(m)
        lower.update(r.lower_better)
    names = order_metrics(names, layout)
    header = "| Method | " + " | ".join(_title(m, lower.get(m)) for m in names) + " |"
    lines = [header, "|---|" + "---|" * len(names)]
    ranks: dict[str, dict[str, int]] = {}
    for m in names:
        vals = [(r.metrics.get(m), k) for k, r in reports.items()]
        vals = [(v, k) for v, k in vals if v is not None and not math.isnan(v)]
        if len(reports) > 1 and m in lower:
            vals.sort(key=lambda t: t[0] if lower[m] else -t[0])
            ranks[m] = {k: i for i, (_, k) in enumerate(vals)}
    for k, r in reports.items():
        cells = []
        for m in names:
            s = _fmt(r.metrics.get(m, float("nan")), digits)
            rank = ranks.get(m, {}).get(k)
            cells.append(f"**{s}**" if rank == 0 else f"_{s}_" if rank == 1 else s)
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
