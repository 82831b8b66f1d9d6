"""The README's Python examples run as written (in a scratch directory: they write `runs/`)."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def examples(section: str) -> list[str]:
    """The ```python blocks of the README section headed `section`."""
    text = README.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.DOTALL)


GROWING = examples("Growing your own model")


def test_the_section_has_its_three_examples() -> None:
    assert len(GROWING) == 3
    assert "BasicBlock" in GROWING[1] and "GPT2LMHeadModel" in GROWING[2]


@pytest.mark.parametrize("code", GROWING, ids=["sequential", "resnet", "huggingface"])
def test_a_growing_example_runs_as_written(
    code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "transformers" in code and importlib.util.find_spec("transformers") is None:
        pytest.skip("Hugging Face transformers is not installed (pip install 'esper[hf]')")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {"__name__": "__readme__"}
    exec(compile(code, str(README), "exec"), scope)  # our own README
    result = scope["result"]
    assert (tmp_path / result.run_dir / "run.sqlite").is_file()
    assert math.isfinite(result.final_metric)
    if "BasicBlock" in code or "transformers" in code:  # the examples that show growth do grow
        assert result.germinated, "the example was meant to show a seed growing"
