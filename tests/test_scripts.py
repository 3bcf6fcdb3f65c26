"""Every benchmark and script imports: a name moved in the package is found here, not by the next person who runs
a benchmark (their `main` is not run)."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FILES = sorted([*REPO.glob("benchmarks/*.py"), *REPO.glob("scripts/*.py")])


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_it_imports(path, monkeypatch):
    monkeypatch.syspath_prepend(str(path.parent))  # benchmarks import each other
    spec = importlib.util.spec_from_file_location(f"_checked_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)) or path.parent.name == "scripts"
