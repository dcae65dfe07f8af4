"""``osdface.models`` is a real package (a wheel built by setuptools' find_packages includes it) whose
documented re-exports resolve."""

import importlib

import osdface.models


def test_models_is_a_regular_package_with_working_reexports():
    assert osdface.models.__file__ is not None  # a namespace package has no __init__ file
    for name in osdface.models.__all__:
        cls = getattr(osdface.models, name)
        module = importlib.import_module(osdface.models._LAZY[name])
        assert cls is getattr(module, name)


def test_setuptools_finds_every_subpackage():
    from pathlib import Path

    from setuptools import find_packages

    src = Path(osdface.models.__file__).parents[2]
    found = set(find_packages(str(src)))
    on_disk = {".".join(p.relative_to(src).parts) for p in (src / "osdface").rglob("*")
               if p.is_dir() and any(p.glob("*.py")) and "__pycache__" not in p.parts}
    assert on_disk <= found, f"folders with modules but no __init__.py: {sorted(on_disk - found)}"
