"""Issue 12: every subcommand that reads models, run on every case of the hostile-input corpus.

That is the diffusion model inputs (restore, convert, train generator, export), the face-layer
files (restore / align: --detector-weights, --parsing-model, --bg-upsampler) and the metric
weight files (evaluate / benchmark-table --weights-dir).

For each (case, subcommand): no exception escapes ``osdface.cli.main`` (no traceback), the exit
code is 2 (1 only where restore reports a per-input failure, e.g. non-finite output from NaN
weights), stderr's last line is ``osdface: error: ...`` naming the offending file, stderr gives no
advice to load a file unsafely (``weights_only=False``, numpy's ``allow_pickle``), nothing is written
to the output folder (not even hidden temp files), every input file is byte-identical afterwards and
no code from a file ran. See ``corpus.py`` for the cases.

Memory bombs run in one child process whose ``RLIMIT_AS`` is calibrated there: the child first
runs each subcommand on the pristine tiny inputs, reads its peak address space (``VmPeak``, about
4.5 GB on the CPU-only CI machine: torch + diffusers + cv2 mappings) and caps at that + 1 GiB
(:data:`corpus.CAP_MARGIN`); a bomb that an unguarded loader materialises needs 2-3 GB more.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from osdface.cli import main

from .corpus import (
    ACCEPT,
    CAP_MARGIN,
    CAPPED_CONTROLS,
    CONTROLS,
    FAMILY_COMMANDS,
    PER_INPUT_COMMANDS,
    PRISTINE_DIRS,
    REFUSE,
    REFUSE_OR_ACCEPT,
    REFUSE_OR_FAIL_INPUT,
    SPECS,
    Case,
    argv_for,
    pristine_case,
    sha256_tree,
)

IN_PROCESS = [(s.name, cmd) for s in SPECS if not s.bomb for cmd in FAMILY_COMMANDS[s.family]]
CAPPED = [(s.name, cmd) for s in SPECS if s.bomb for cmd in FAMILY_COMMANDS[s.family]]


def _ids(pairs):
    return [f"{name}::{cmd}" for name, cmd in pairs]


def _listing(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def names_file(case: Case, message: str) -> bool:
    """``message`` names the offending file: ``unet/config.json``-style, or its folder's path and its name."""
    return case.needle in message or (case.offending.name in message and str(case.offending.parent) in message)


def judge(case: Case, command: str, rc, exception: str | None, stderr: str, out: Path,
          before: dict[str, str], after: dict[str, str], shorten: str = "") -> list[str]:
    """Everything wrong with one run; empty = the run behaved."""
    problems: list[str] = []
    if exception:
        problems.append(f"exception escaped main: {exception}")
    allowed = {REFUSE: {2}, REFUSE_OR_FAIL_INPUT: {1, 2} if command in PER_INPUT_COMMANDS else {2},
               REFUSE_OR_ACCEPT: {0, 2}, ACCEPT: {0}}[case.expect]
    if not exception and rc not in allowed:
        problems.append(f"exit code {rc}, expected {' or '.join(map(str, sorted(allowed)))}")
    if "Traceback" in stderr:
        problems.append("stderr holds a traceback")
    if "weights_only=False" in stderr:
        problems.append("stderr suggests weights_only=False")
    if "load it unsafely" in stderr or "pickle.load()" in stderr:
        problems.append("stderr suggests loading the pickle unsafely (numpy's allow_pickle / pickle.load advice)")
    if case.marker.exists():
        problems.append("code from the file ran (its os.system payload created the marker)")
    changed = sorted({k for k in before if before[k] != after.get(k)} | (set(after) - set(before)))
    if changed:
        problems.append(f"inputs changed/added/removed: {[Path(k).name for k in changed][:5]}")
    refused = case.expect != ACCEPT and not (case.expect == REFUSE_OR_ACCEPT and rc == 0)
    if refused:
        written = _listing(out)
        if rc == 1:
            written = [w for w in written if (out / w).is_file()]
        if written:
            problems.append(f"wrote into the output folder: {written[:4]}")
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("osdface: error:")]
        if not exception:
            if rc == 1:
                if not any(names_file(case, ln) for ln in errors):
                    problems.append(f"no 'osdface: error:' line names {case.needle}")
            elif not lines or not lines[-1].startswith("osdface: error:"):
                problems.append(f"last stderr line is not 'osdface: error: ...': {lines[-1][:160] if lines else ''!r}")
            elif not names_file(case, lines[-1]):
                problems.append(f"error does not name {case.needle}: {lines[-1][:200]!r}")
    msg = [p.replace(shorten, "…") if shorten else p for p in problems]
    return msg


def _report(case: Case, command: str, problems: list[str]) -> str:
    return f"{case.name} × {command}: " + " | ".join(problems)


# ----------------------------------------------------------------------------------- in process
@pytest.mark.parametrize(("case_name", "command"), IN_PROCESS, ids=_ids(IN_PROCESS))
def test_hostile_input(case_name, command, hostile, tmp_path, capsys):
    case = hostile.cases[case_name]
    out = tmp_path / "out"
    out.mkdir()
    roots = case.input_roots(hostile.inputs)
    before = sha256_tree(roots)
    argv = argv_for(case, command, hostile.inputs, out)
    capsys.readouterr()
    rc, exception = None, None
    try:
        rc = main(argv)
    except BaseException as e:  # noqa: BLE001 - anything escaping main is the failure being measured
        exception = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    stderr = capsys.readouterr().err
    problems = judge(case, command, rc, exception, stderr, out, before, sha256_tree(roots), str(hostile.root))
    assert not problems, _report(case, command, problems)


# ------------------------------------------------------------------------------------ controls
@pytest.mark.parametrize(("family", "command"), CONTROLS, ids=[f"{f}::{c}" for f, c in CONTROLS])
def test_pristine_inputs_work(family, command, hostile, tmp_path, capsys):
    """The corpus' valid originals run cleanly: refusals above are about the hostile file, not the harness."""
    case = pristine_case(hostile.pristine, family)
    out = tmp_path / "out"
    out.mkdir()
    if command == "train-resume":  # writes into the run: resume a copy
        case.run = Path(shutil.copytree(case.run, tmp_path / "run"))
        out = case.run / "export"
    roots = [hostile.pristine / d for d in PRISTINE_DIRS]
    before = sha256_tree(roots)
    assert main(argv_for(case, command, hostile.inputs, out)) == 0, capsys.readouterr().err[-2000:]
    assert sha256_tree(roots) == before
    assert [p for p in out.rglob("*") if p.is_file()]


# -------------------------------------------------------------------------- memory bombs (child)
@pytest.fixture(scope="session")
def capped_records(hostile):
    assert hostile.capped is not None, "the capped child was not started"
    return hostile.capped.collect()


@pytest.mark.capped
def test_memory_cap_is_calibrated_on_a_normal_run(hostile, capped_records):
    """The child ran each subcommand on the pristine inputs cleanly before capping itself."""
    controls = [r for r in capped_records if "control" in r]
    assert len(controls) == len(CAPPED_CONTROLS), hostile.capped.ended
    assert all(r["rc"] == 0 and not r["exception"] for r in controls), [r["stderr"][-500:] for r in controls]
    cal = next(r["calibration"] for r in capped_records if "calibration" in r)
    assert cal["cap"] == cal["vm_peak"] + CAP_MARGIN
    print(f"RLIMIT_AS for the bombs: VmPeak of a normal tiny run {cal['vm_peak'] / 2**30:.2f} GiB "
          f"+ {CAP_MARGIN / 2**30:.0f} GiB = {cal['cap'] / 2**30:.2f} GiB")


@pytest.mark.capped
@pytest.mark.parametrize(("case_name", "command"), CAPPED, ids=_ids(CAPPED))
def test_memory_bomb_under_a_cap(case_name, command, hostile, capped_records):
    case = hostile.cases[case_name]
    out, roots, before = hostile.capped.state[(case_name, command)]
    rec = next((r for r in capped_records if r.get("case") == case_name and r.get("command") == command), None)
    assert rec is not None, f"{case_name} × {command}: no result: {hostile.capped.ended}"
    problems = judge(case, command, rec["rc"], rec["exception"], rec["stderr"], out, before, sha256_tree(roots),
                     str(hostile.root))
    assert not problems, _report(case, command, problems)
