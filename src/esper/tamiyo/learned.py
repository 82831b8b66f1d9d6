"""The learned growth policy: TamiyoNet behind the `Policy` protocol, saved weights-only.

A policy is layout-free: it reads each slot by what it is (`tamiyo.features`) and scores the
slots as a set (`TamiyoNet`), so one policy acts on any host with SeedSlots — the built-in
hosts, or a user's module with any number of slots of mixed topologies. A policy file stores no
slot layout, only the specs it was trained with (observation, blueprint library, ops); `load`
refuses a file made for other specs. One forward pass acts on observations of any hosts: a
batch is padded to its largest slot count, and the padding is never read or picked.

File format (safetensors): `net.*` the network's parameters, `norm.global.*` and `norm.slot.*`
the running normaliser statistics; the header's metadata holds the specs as JSON strings.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from esper.contracts import (
    HEADS,
    TAMIYO_OPS,
    AlphaCurve,
    AlphaSpeed,
    AlphaTarget,
    Blueprint,
    FactoredAction,
    Observation,
    Op,
    Style,
    Tempo,
)
from esper.contracts.errors import EsperError
from esper.kasmina import save_tensors
from esper.tamiyo.features import (
    GLOBAL_DIM,
    OBS_SPEC,
    SLOT_DIM,
    FeatureBatch,
    RunningNormalizer,
    featurize_batch,
)
from esper.tamiyo.masks import action_masks
from esper.tamiyo.network import ActOut, TamiyoNet
from esper.tamiyo.policies import Decision

FORMAT = "esper.tamiyo.policy"
VERSION = 2
BLUEPRINT_LIBRARY = "kasmina-14-v1"  # the blueprint head's meaning (14: WIDEN); run.SPEC_VERSIONS


class PolicyLoadError(EsperError, RuntimeError):
    """A policy file that is missing, corrupt, or made for another spec."""


class PolicyStep(NamedTuple):
    """One batched act: the decisions and what a rollout buffer stores."""

    decisions: list[Decision]
    g: torch.Tensor
    """(B, GLOBAL_DIM) normalised."""
    s: torch.Tensor
    """(B, S, SLOT_DIM) normalised, padded to the batch's largest slot count (`out.valid`)."""
    out: ActOut


class LearnedPolicy:
    name = "learned"

    def __init__(self, *, hidden: int = 128, seed: int = 0, deterministic: bool = False) -> None:
        self.hidden = hidden
        self.deterministic = deterministic
        self.update_normalizers = False  # True while collecting rollouts for training
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = TamiyoNet(GLOBAL_DIM, SLOT_DIM, hidden)
        self.global_norm = RunningNormalizer(GLOBAL_DIM)
        self.slot_norm = RunningNormalizer(SLOT_DIM)
        self.generator = torch.Generator().manual_seed(seed)
        self.source: str | None = None
        """The file this policy was loaded from, if any."""

    # -- acting ---------------------------------------------------------------------------------
    def act(self, obs: Observation) -> Decision:
        return self.step([obs]).decisions[0]

    def act_batch(self, observations: Sequence[Observation]) -> list[Decision]:
        """One forward pass for all (hosts of any sizes)."""
        return self.step(observations).decisions

    def step(self, observations: Sequence[Observation]) -> PolicyStep:
        """Act on every observation in one forward pass; also return what a rollout stores."""
        g, s, valid = self.batch(observations, update=self.update_normalizers)

        def mask_fn(b: int, op: Op | None = None, slot: int | None = None) -> dict[str, list[bool]]:
            # As the engine records a WAIT: no slot, so the blueprint head is unconstrained.
            return action_masks(observations[b], op, None if op is Op.WAIT else slot)

        out = self.net.act(g, s, mask_fn, self.generator, self.deterministic, valid)
        decisions = [self._decision(out, b) for b in range(len(observations))]
        return PolicyStep(decisions, g, s, out)

    @torch.no_grad()
    def value(self, observations: Sequence[Observation]) -> torch.Tensor:
        """(B,) V(s), without sampling or touching the normalisers (GAE's bootstrap value)."""
        return self.net.encode(*self.batch(observations, update=False))[2]

    def features(
        self, observations: Sequence[Observation], update: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (B, GLOBAL_DIM), (B, S, SLOT_DIM) of observations with one slot count;
        `update` folds them into the stats. `batch` takes hosts of mixed sizes."""
        g, s, valid = self.batch(observations, update)
        if not bool(valid.all()):
            raise ValueError("observations have different slot counts; use `batch`")
        return g, s

    def batch(self, observations: Sequence[Observation], update: bool = False) -> FeatureBatch:
        """`featurize_batch`, normalised (padded slots stay zero and stay out of the slot
        statistics); `update` folds the real rows into the stats first."""
        g, s, valid = featurize_batch(observations)
        if update:
            self.global_norm.update(g)
            self.slot_norm.update(s[valid])
        s = torch.where(valid.unsqueeze(-1), self.slot_norm(s), torch.zeros(()))
        return FeatureBatch(self.global_norm(g), s, valid)

    def _decision(self, out: ActOut, b: int) -> Decision:
        i = dict(zip(HEADS, out.actions[b].tolist(), strict=True))
        n = int(out.valid[b].sum())  # the row's own slots (padding follows them)
        own = {h: slice(None) if h != "slot" else slice(n) for h in HEADS}
        action = FactoredAction(
            op=TAMIYO_OPS[i["op"]],
            slot=i["slot"],
            blueprint=Blueprint(i["blueprint"]),
            style=Style(i["style"]),
            tempo=Tempo(i["tempo"]),
            alpha_target=AlphaTarget(i["alpha_target"]),
            alpha_speed=AlphaSpeed(i["alpha_speed"]),
            alpha_curve=AlphaCurve(i["alpha_curve"]),
        )
        how = "argmax" if self.deterministic else "sampled"
        return Decision(
            action,
            mask={h: out.masks[h][b, own[h]].tolist() for h in HEADS},
            probs={h: out.probs[h][b, own[h]].tolist() for h in HEADS},
            entropy={h: float(out.entropy[b, k]) for k, h in enumerate(HEADS)},
            value=float(out.value[b]),
            reason=f"{how}, p = {float(out.logprob[b].exp()):.3f}",
        )

    # -- resumable state (the sampling RNG and the normalisers; weights live in the file) --------
    def state_dict(self) -> dict[str, Any]:
        rng = base64.b64encode(self.generator.get_state().numpy().tobytes()).decode("ascii")
        norms = {
            key: {k: v.tolist() for k, v in norm.state_dict().items()}
            for key, norm in (("global", self.global_norm), ("slot", self.slot_norm))
        }
        return {"rng": rng, "normalizers": norms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raw = base64.b64decode(state["rng"])
        self.generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        for key, norm in (("global", self.global_norm), ("slot", self.slot_norm)):
            norm.load_state_dict(
                {
                    k: torch.tensor(v, dtype=torch.float64)
                    for k, v in state["normalizers"][key].items()
                }
            )

    # -- weights-only files -----------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "obs_spec": OBS_SPEC,
            "global_dim": GLOBAL_DIM,
            "slot_dim": SLOT_DIM,
            "blueprint_library": BLUEPRINT_LIBRARY,
            "blueprints": [b.name for b in Blueprint],
            "ops": [op.name for op in TAMIYO_OPS],
            "hidden": self.hidden,
        }

    def save(self, path: str | Path) -> None:
        tensors = {f"net.{k}": v.detach().contiguous() for k, v in self.net.state_dict().items()}
        for key, norm in (("global", self.global_norm), ("slot", self.slot_norm)):
            tensors |= {f"norm.{key}.{k}": v.contiguous() for k, v in norm.state_dict().items()}
        meta = {k: json.dumps(v) for k, v in self.metadata().items()}
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, *, seed: int = 0, deterministic: bool = False) -> LearnedPolicy:
        """Load a saved policy; refuse it unless it was trained with this Esper's specs."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (OSError, SafetensorError, json.JSONDecodeError) as e:
            raise PolicyLoadError(f"{path}: not a readable policy file: {e}") from e
        _check_specs(path, meta)
        policy = cls(hidden=meta["hidden"], seed=seed, deterministic=deterministic)
        policy.source = str(path)
        net_state = {k.removeprefix("net."): v for k, v in tensors.items() if k.startswith("net.")}
        try:
            policy.net.load_state_dict(net_state, strict=True)
            for key, norm in (("global", policy.global_norm), ("slot", policy.slot_norm)):
                norm.load_state_dict(
                    {k: tensors[f"norm.{key}.{k}"] for k in ("mean", "var", "count")}
                )
        except (RuntimeError, KeyError, ValueError) as e:
            raise PolicyLoadError(f"{path}: weights do not fit the network: {e}") from e
        return policy


def _check_specs(path: str | Path, meta: dict[str, Any]) -> None:
    if meta.get("format") != FORMAT:
        raise PolicyLoadError(f"{path}: format {meta.get('format')!r}; expected {FORMAT!r}")
    here = {  # the library first: it names what changed when a policy predates a new blueprint
        "blueprint_library": BLUEPRINT_LIBRARY,
        "obs_spec": OBS_SPEC,
        "global_dim": GLOBAL_DIM,
        "slot_dim": SLOT_DIM,
        "blueprints": [b.name for b in Blueprint],
        "ops": [op.name for op in TAMIYO_OPS],
        "version": VERSION,
    }
    for key, want in here.items():
        if meta.get(key) != want:
            raise PolicyLoadError(
                f"{path}: policy was saved with {key} = {meta.get(key)!r}, "
                f"this Esper uses {want!r}; retrain the policy"
            )
