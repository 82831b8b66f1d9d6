"""Determinism (paper §4.2): seed every RNG, force deterministic kernels, capture RNG state.

Seeding alone is not determinism (an earlier implementation stopped there): kernels must be
deterministic too, and checkpoints must carry every RNG state so a resumed run draws the same
numbers as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from esper.contracts.errors import ConfigError


def seed_everything(seed: int, device: torch.device) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) and turn on deterministic algorithms."""
    if device.type == "cuda":
        # cuBLAS needs a fixed workspace for deterministic GEMMs; must be set before first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.use_deterministic_algorithms(True)


@dataclass(frozen=True)
class RunSeeds:
    """How one run's seed maps to every random stream the run uses: the one rule, followed by
    every driver (`esper grow`, `esper.grow`, vectorised training, evaluation, audits), so that
    one config and seed give one run whichever drives it.

    | stream      | seeded by                         | used for                                 |
    |-------------|-----------------------------------|------------------------------------------|
    | split       | `seed`                            | which digits samples are validation      |
    | host        | `torch.manual_seed(seed)`         | the host's initial weights; then the     |
    |             |                                   | episode's own torch CPU stream           |
    | data        | a generator seeded with `seed`    | the order of training batches            |
    | germination | `derived_seed(seed, "germinate",  | each seed's initial weights (common      |
    |             |   slot, tick)`                    | random numbers: independent of the rest) |
    | policy      | `seed`                            | a policy's own generator (random policy, |
    |             |                                   | a learned policy sampling its actions)   |
    """

    seed: int

    @property
    def split(self) -> int:
        return self.seed

    @property
    def host(self) -> int:
        return self.seed

    @property
    def data(self) -> int:
        return self.seed

    @property
    def policy(self) -> int:
        return self.seed

    def germination(self, slot: str, tick: int) -> int:
        return derived_seed(self.seed, "germinate", slot, tick)


def derived_seed(*parts: object) -> int:
    """A seed in [0, 2**63) that depends on `parts` alone (e.g. a run's seed, a slot, a tick),
    stable across processes and Python versions (unlike `hash`)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def rng_state() -> dict[str, torch.Tensor]:
    """Every RNG's state as tensors (weights-only checkpoint friendly)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    np_state = np.random.get_state()
    state["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    state["numpy_meta"] = torch.tensor([np_state[2], np_state[3]], dtype=torch.int64)
    state["numpy_gauss"] = torch.tensor([np_state[4]], dtype=torch.float64)
    py = random.getstate()
    state["python"] = torch.tensor([py[0], *py[1]], dtype=torch.int64)
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    meta = state["numpy_meta"].tolist()
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            meta[0],
            meta[1],
            float(state["numpy_gauss"][0]),
        )
    )
    py = state["python"].tolist()
    random.setstate((py[0], tuple(py[1:]), None))


def pick_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when present, else CPU. A request for CUDA without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    return device
