"""The streaming JSON-lines report of a collection run (``--report run.jsonl``).

Issue 15: one line per photo, appended and flushed as soon as the photo is written, so a run that
is killed keeps every row it finished; a re-run with ``--skip-existing`` reads the rows back,
skips the photos already reported and appends the rest, so each photo is reported once overall.

A row is ``{"input", "output", "faces", "error"}``: ``output`` is ``None`` and ``error`` the
reason (one line, naming the file) when the photo failed; ``faces`` lists the detections
(:meth:`osdface.face.types.Detection.to_json`), empty when no face was found.

A kill can leave the last line half-written; :func:`read_rows` drops it and
:class:`JsonlReport` cuts it off before appending. The file is a log, not a document: it is
appended in place (one report per process; shards write one each).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import OSDFaceError
from ..utils.logging import get_logger

logger = get_logger(__name__)

ROW_KEYS = ("input", "output", "faces", "error")


class ReportFileError(OSDFaceError, ValueError):
    """A JSON-lines report to resume is malformed (a complete line that is not a report row)."""


def read_rows(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """Rows of an existing report and the byte length of its complete lines.

    A last line without its newline (a killed writer) is left out of both.

    Raises:
        ReportFileError: a complete line is not a JSON object with an ``input`` (file and line named).
    """
    path = Path(path)
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    rows = []
    for n, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReportFileError(f"{path}: line {n} is not JSON ({e}); not a report of osdface restore") from None
        if not isinstance(row, dict) or not isinstance(row.get("input"), str):
            raise ReportFileError(f"{path}: line {n} is not a report row (no \"input\")")
        rows.append(row)
    return rows, end


class JsonlReport:
    """Append report rows to ``path``, one flushed line each.

    Args:
        path: the ``.jsonl`` file.
        resume: keep the rows already there (a half-written last line is cut off); otherwise the
            file is started empty (the caller checked that replacing it is allowed).
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.previous: list[dict[str, Any]] = []
        if resume and self.path.exists():
            self.previous, end = read_rows(self.path)
            if end != self.path.stat().st_size:
                logger.info("%s: dropping a half-written last line left by an interrupted run", self.path)
                os.truncate(self.path, end)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        else:
            self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def done_inputs(self) -> set[str]:
        """The ``input`` of every row already in the file (before this run)."""
        return {r["input"] for r in self.previous}

    def write(self, row: dict[str, Any]) -> None:
        """Append one row as a line and flush it to the OS (it survives a killed process)."""
        # ASCII with escapes: a file name that is not UTF-8 (a lone surrogate) round-trips through
        # json.loads, where ensure_ascii=False could not be encoded to the UTF-8 file
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlReport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
