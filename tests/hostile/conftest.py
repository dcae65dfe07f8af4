"""The hostile-input corpus, built once per session (tiny seeded models; a few seconds).

When the session includes the memory-bomb tests, their child process is started right after the
corpus is built, so it runs while the in-process cases do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from .corpus import CappedRun, Case, build_corpus, start_capped


@dataclass
class Corpus:
    root: Path
    cases: dict[str, Case]
    capped: CappedRun | None = None

    @property
    def pristine(self) -> Path:
        return self.root / "_pristine"

    @property
    def inputs(self) -> Path:
        return self.pristine / "inputs"


@pytest.fixture(scope="session")
def hostile(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    corpus = Corpus(root, {c.name: c for c in build_corpus(root)})
    if any(item.get_closest_marker("capped") for item in request.session.items):
        corpus.capped = start_capped(corpus.cases, corpus.pristine, tmp_path_factory.mktemp("capped"))
    yield corpus
    if corpus.capped is not None and corpus.capped.proc.poll() is None:
        corpus.capped.proc.kill()
        corpus.capped.proc.communicate()


def pytest_configure(config):
    config.addinivalue_line("markers", "capped: runs in the memory-capped child process (tests/hostile)")
