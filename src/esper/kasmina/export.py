"""Export a grown model as plain PyTorch: it loads and runs without Esper installed.

Two files: a `torch.export` program (`.pt2`: the graph of aten ops and its weights; load it with
`torch.export.load(path).module()`) and a safetensors file of the same weights under the
program's parameter names (`safetensors.torch.load_file`, then `load_state_dict` on the loaded
module). The forward is traced in eval mode under `no_grad`, so every slot's current stage is
baked in (a dormant slot disappears, a committed seed is plain layers); the batch dimension stays
dynamic.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from esper.contracts.errors import EsperError
from esper.contracts.files import atomic_write
from esper.kasmina.probe import probing


class ExportError(EsperError, RuntimeError):
    """The model could not be traced or written as a standalone program."""


def export_model(
    model: nn.Module, example_input: torch.Tensor, out: str | Path
) -> tuple[Path, Path]:
    """Write `out` (a `.pt2` program) and `out` with suffix `.safetensors` (its weights); returns
    both paths. `example_input` is a batch the model accepts (its batch size may be anything)."""
    out = Path(out).with_suffix(".pt2")
    batch = torch.export.Dim("batch", min=1)
    try:
        with probing(model):
            program = torch.export.export(
                model, (example_input,), dynamic_shapes=({0: batch},), strict=False
            )
    except Exception as e:  # torch raises many kinds here; the user needs the why
        raise ExportError(f"torch.export could not trace the model: {e}") from e
    weights = {k: v.detach().contiguous().clone() for k, v in program.state_dict.items()}
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write(out, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    side = out.with_suffix(".safetensors")
    atomic_write(side, lambda tmp: save_file(weights, str(tmp)))
    return out, side
