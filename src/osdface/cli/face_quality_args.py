"""The restore commands' fidelity, identity-check and face-size options (issue 17), in one place.

``-w/--fidelity``, ``--min-identity``, ``--keep-original``, ``--no-identity`` and ``--face-size``
are added to the whole-photo option group by :func:`add_args`; :func:`restorer_kwargs` turns them
into :class:`~osdface.face.FaceRestorer` keywords; :func:`identity_summary` is the line the CLI
prints at the end of a run. See docs/fidelity.md.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass


def add_args(g) -> None:
    """Add the options to an argparse group (or parser)."""
    g.add_argument("-w", "--fidelity", type=float, default=0.0, metavar="W",
                   help="fidelity <-> quality in [0, 1], as CodeFormer's -w: 0 (default) = the model's output, "
                        "1 = the input face; in between, a blend toward the input (docs/fidelity.md)")
    g.add_argument("--min-identity", type=float, metavar="S",
                   help="flag faces whose identity similarity (SFace cosine, input crop vs restored crop) is "
                        "below S (same person: above ~0.36); see --keep-original")
    g.add_argument("--keep-original", action="store_true",
                   help="with --min-identity: paste the original face back for flagged faces")
    g.add_argument("--no-identity", dest="identity", action="store_false",
                   help="skip the per-face identity check (SFace; on by default for whole photos)")
    g.add_argument("--face-size", type=int, metavar="PX",
                   help="paste faces at PX (e.g. 1024): restored 512 crops are upsampled with --bg-upsampler "
                        "first, so large portraits do not get a soft 512 face")


def restorer_kwargs(args: argparse.Namespace) -> dict:
    """FaceRestorer keywords from the options (absent options: the restorer's defaults)."""
    from ..errors import InvalidSettingError

    kw: dict = {"fidelity": getattr(args, "fidelity", 0.0)}
    min_id = getattr(args, "min_identity", None)
    if getattr(args, "keep_original", False) and min_id is None:
        raise InvalidSettingError("--keep-original needs --min-identity S")
    if not getattr(args, "identity", True) and min_id is not None:
        raise InvalidSettingError("--min-identity needs the identity check; drop --no-identity")
    if getattr(args, "identity", False) or min_id is not None:
        kw["identity"] = "sface"
    if min_id is not None:
        kw.update(min_identity=min_id, keep_original_below=getattr(args, "keep_original", False))
    if getattr(args, "face_size", None):
        kw["paste_face_size"] = args.face_size
    return kw


@dataclass
class IdentityTotals:
    """Running totals of the identity check over a run (constant memory, however many faces)."""

    count: int = 0
    total: float = 0.0
    low: float = math.inf
    flagged: int = 0
    kept: int = 0

    def add(self, face: dict) -> None:
        sim = float(face["identity"])
        self.count += 1
        self.total += sim
        self.low = min(self.low, sim)
        self.flagged += bool(face.get("identity_flagged"))
        self.kept += bool(face.get("kept_original"))


def collect_identity(on_row: Callable[[dict], None], into: IdentityTotals) -> Callable[[dict], None]:
    """Wrap a report-row callback so that every face's identity is also added to ``into``."""

    def wrapped(row: dict) -> None:
        for f in row.get("faces") or []:
            if isinstance(f, dict) and "identity" in f:
                into.add(f)
        on_row(row)

    return wrapped


def identity_summary(totals: IdentityTotals) -> str | None:
    """``"identity (SFace, input vs restored): mean 0.81, min 0.42 over 12 faces; 1 below --min-identity
    (kept original)"`` or ``None`` when no face was checked."""
    n = totals.count
    if not n:
        return None
    text = (f"identity (SFace, input vs restored face): mean {totals.total / n:.3f}, min {totals.low:.3f} "
            f"over {n} face{'s' if n != 1 else ''}")
    if totals.flagged:
        text += f"; {totals.flagged} below --min-identity" + (f" ({totals.kept} kept original)" if totals.kept else "")
    return text
