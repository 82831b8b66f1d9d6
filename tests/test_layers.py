"""Layering that holds at run time: the vocabulary loads without torch or the engine, and `esper`
itself loads nothing until its API is used (the import-linter contracts in pyproject.toml check
the static imports; `make test` runs them)."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_vocabulary_imports_no_torch_and_no_engine() -> None:
    loaded = _modules_after("import esper.contracts")
    assert "torch" not in loaded and "numpy" not in loaded
    assert not {m for m in loaded if m.startswith("esper.") and not m.startswith("esper.contracts")}


def test_esper_grow_is_resolved_on_first_use() -> None:
    assert "esper.api" not in _modules_after("import esper")
    assert "esper.api" in _modules_after("import esper; esper.grow")
