"""A grown model exported as plain PyTorch loads and runs where Esper is not installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn
from typer.testing import CliRunner

import esper
from _engine_helpers import small_config
from conftest import grow, host_input, small_cnn, small_mlp, small_transformer
from esper.cli import app
from esper.contracts import Blueprint, SeedSpec, Stage
from esper.kasmina import slots_of
from esper.run import grown_model, start_run

SITE = Path(torch.__file__).resolve().parents[1]  # torch's (and safetensors') site-packages

# Run with `python -S` (no site: the editable install's .pth finder never loads) and only the
# libraries' directory on the path, from a scratch directory: Esper cannot be imported there.
LOADER = textwrap.dedent(
    """
    import sys
    sys.path.append({site!r})
    try:
        import esper
    except ImportError:
        pass
    else:
        raise SystemExit("esper is importable: the test would prove nothing")
    import torch
    from safetensors.torch import load_file, save_file

    x = load_file("input.safetensors")["x"]
    program = torch.export.load("model.pt2").module()
    out = {{"program": program(x)}}
    program.load_state_dict(load_file("model.safetensors"))  # the weights file fits it
    out["reloaded"] = program(x)
    save_file({{k: v.contiguous() for k, v in out.items()}}, "output.safetensors")
    """
)

HOSTS: dict[str, Callable[[], nn.Module]] = {
    "cnn": small_cnn,
    "mlp": small_mlp,
    "transformer": small_transformer,
}


def run_without_esper(folder: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    safetensors.torch.save_file({"x": x.contiguous()}, str(folder / "input.safetensors"))
    done = subprocess.run(
        [sys.executable, "-S", "-c", LOADER.format(site=str(SITE))],
        cwd=folder,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return safetensors.torch.load_file(str(folder / "output.safetensors"))


@pytest.mark.parametrize("kind", list(HOSTS))
def test_a_grown_host_runs_without_esper(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = HOSTS[kind]()
    x = host_input(model)
    first, second = list(slots_of(model).values())[:2]
    grow(model, first, x, SeedSpec(Blueprint.WIDEN), Stage.COMMITTED)
    other = Blueprint.MLP if kind == "mlp" else Blueprint.CONV_LIGHT
    grow(model, second, x, SeedSpec(other), Stage.COMMITTED)
    program, weights = esper.export(model, x[:2], tmp_path / "model")
    assert (program.name, weights.name) == ("model.pt2", "model.safetensors")
    batch = torch.cat([x, x, x])  # another batch size than the example's
    model.eval()
    with torch.no_grad():
        want = model(batch)
    got = run_without_esper(tmp_path, batch)
    assert torch.allclose(got["program"], want, atol=1e-6, rtol=0)
    assert torch.equal(got["reloaded"], got["program"])


def test_esper_export_writes_a_runs_grown_model(tmp_path: Path) -> None:
    run = start_run(small_config(4), run_dir=tmp_path / "r")
    run.run()
    run.store.close()
    result = CliRunner().invoke(app, ["export", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    program = torch.export.load(str(tmp_path / "r" / "model.pt2")).module()
    model, task = grown_model(tmp_path / "r")
    model.eval()
    x = task.val_x[:5]
    with torch.no_grad():
        assert torch.allclose(program(x), model(x), atol=1e-6, rtol=0)
        assert torch.allclose(model(x), run.env.model.eval()(x), atol=0, rtol=0)


def test_export_refuses_what_it_cannot_rebuild(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", str(tmp_path / "nothing")])
    assert result.exit_code != 0 and "Traceback" not in result.output
