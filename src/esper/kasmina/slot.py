"""SeedSlot: a pre-allocated insertion point that can grow a seed (paper §3, §2.4).

Forward semantics, by stage (y = h + c(α)·δ(h, s), see blend.py):

| stage                              | forward                                  | seed input |
|------------------------------------|------------------------------------------|------------|
| DORMANT, GERMINATED, EMBARGOED, RESETTING | `h` itself (same object, no op)   | –          |
| TRAINING                           | h + (δ − δ.detach())  (== h bit for bit) | h.detach() |
| BLENDING, HOLDING, PRUNED (fading) | h + c(α)·δ                               | h.detach() |
| COMMITTED                          | the Phage: h + δ, α folded into the seed | h          |

Isolation ends at commit: from then on the host upstream learns through the seed path too.

Whatever a seed computes, the host never sees a non-finite δ: its inf/NaN elements are zeroed in the
forward (so TRAINING stays bit-identical to the slot-free host even when `δ − δ.detach()` would be
NaN), and a seed whose output went non-finite on a finite input raises its `fault` flag, which the
engine reads once per tick and the governor blames (a device tensor: no host sync per forward).

Telemetry (the activation probe, the fault flag) is recorded by training forwards only, those run
with gradients enabled: an evaluation or a measurement under `no_grad` (`esper.kasmina.probe`)
leaves a slot's telemetry as it found it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from esper.contracts import (
    Actor,
    AlphaCurve,
    Blueprint,
    IllegalTransition,
    Lifecycle,
    LifecycleConfig,
    Op,
    SeedSpec,
    SlotTelemetry,
    Stage,
    Style,
    Topology,
)
from esper.contracts.lifecycle import check
from esper.kasmina.alpha import AlphaSchedule
from esper.kasmina.blend import Blend
from esper.kasmina.blueprints import SeedModule, build_seed
from esper.kasmina.layers import channel_dim
from esper.kasmina.phage import Phage, Target
from esper.kasmina.probe import probing
from esper.kasmina.stream import Compaction, StreamSite, Widening

_IDENTITY, _TRAINING, _BLENDING, _PHAGE = range(4)


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the G2 maturity gate (TRAINING → BLENDING), paper §3.2."""

    min_training_ticks: int = 1
    """Ticks a seed must spend in TRAINING before it may blend."""
    vanishing_grad: float = 1e-8
    """Seed gradient RMS at or below this is 'vanishing'."""
    exploding_grad: float = 1e2
    """Seed gradient RMS at or above this is 'exploding'."""
    min_grad_ratio: float = 1e-3
    """Lowest acceptable seed/host gradient-RMS ratio."""
    max_grad_ratio: float = 1e3
    """Highest acceptable seed/host gradient-RMS ratio."""
    probe_alpha: float = 0.1
    """α of the small test blend used by the activation probe."""
    max_probe_shift: float = 0.5
    """Largest acceptable RMS(y − h)/RMS(h) under the test blend."""
    probe_samples: int = 32
    """How many samples of the slot input the probe keeps."""


@dataclass(frozen=True)
class GateReport:
    passed: bool
    reasons: tuple[str, ...]
    """Why it failed (empty when passed)."""
    metrics: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "failed: " + "; ".join(self.reasons)
        shown = ", ".join(f"{k}={v:.3g}" for k, v in self.metrics.items())
        return f"G2 {verdict} ({shown})"


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _per_sample(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ...) broadcastable against `like`."""
    return m.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.float().pow(2).mean().sqrt()


class SeedSlot(nn.Module):
    """An identity until a seed is germinated into it. Place it anywhere in a forward pass."""

    def __init__(
        self,
        channels: int,
        topology: Topology | str = Topology.CNN,
        name: str | None = None,
        *,
        lifecycle: LifecycleConfig | None = None,
        gate: GateConfig | None = None,
    ) -> None:
        super().__init__()
        self.channels, self.topology = channels, Topology(topology)
        self.lifecycle = Lifecycle(name or "slot", lifecycle or LifecycleConfig())
        self.gate_config = gate or GateConfig()
        self.seed: SeedModule | None = None
        self.blend: Blend | None = None
        self.phage: Phage | None = None
        self.spec: SeedSpec | None = None
        self.schedule = AlphaSchedule()
        self.pending = (1.0, 5, AlphaCurve.LINEAR)  # α target, tempo ticks, curve of the 1st ramp
        self.last_gate: GateReport | None = None
        self.contribution: float | None = None
        self.contribution_tick: int | None = None
        self.seed_id: str | None = None
        self.register_buffer("coef", torch.zeros(()), persistent=False)
        self._grad: torch.Tensor | None = None  # Σ seed‖g‖², Σ host RMS², steps (this tick)
        self._probe: torch.Tensor | None = None
        self._fault: torch.Tensor | None = None  # 0-d bool, see `fault`
        self._mode = _IDENTITY
        self._ablation: torch.Tensor | None = None  # per-sample 0/1 multiplier, see `ablating`
        self.absorbed = 0
        """Parameters a committed widening added to the host's layers (0 otherwise)."""
        self.site: StreamSite | None = None
        """Where this slot sits on its host's residual stream (built-in hosts), for WIDEN."""

    # -- identity ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.lifecycle.slot

    @name.setter
    def name(self, value: str) -> None:
        self.lifecycle.slot = value

    @property
    def stage(self) -> Stage:
        return self.lifecycle.stage

    @property
    def alpha(self) -> float:
        return self.schedule.value

    def extra_repr(self) -> str:
        bp = self.spec.blueprint.name if self.spec else "-"
        return (
            f"{self.name!r}, channels={self.channels}, topology={self.topology.value}, "
            f"stage={self.stage.name}, blueprint={bp}, alpha={self.alpha:.3f}"
        )

    # -- forward -------------------------------------------------------------------------------
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self._mode == _IDENTITY or self.widening:
            return h  # a widening acts through the stream layers it wraps, not here
        dim = channel_dim(self.topology)
        extra = h.shape[dim] - self.channels
        if extra > 0:  # the stream was widened after this seed was born: it acts on its channels
            mine, rest = h.split([self.channels, extra], dim)
            return torch.cat([self._seed_forward(mine.contiguous()), rest], dim)
        return self._seed_forward(h)

    def _seed_forward(self, h: torch.Tensor) -> torch.Tensor:
        mode = self._mode
        if mode == _PHAGE:
            y = self.phage(h, self._ablation)
            self._flag(torch.isfinite(y).all(), h)  # committed tissue: blamed, not masked
            return y
        x = h.detach()  # isolation: the seed path sends nothing back into the host before commit
        s = self.seed(x)
        if mode == _TRAINING:
            if self._probe is None and torch.is_grad_enabled():
                self._probe = x[: self.gate_config.probe_samples].clone()
            d = self._screen(self.blend.delta(x, s, x), x)
            return h + (d - d.detach())  # straight-through: forward h, backward as if α = 1
        coef = self.coef if self._ablation is None else self.coef * _per_sample(self._ablation, h)
        return h + coef * self._screen(self.blend.delta(h, s, x), x)

    @property
    def widening(self) -> bool:
        """Does this slot hold a (not yet committed) WIDEN seed?"""
        return isinstance(self.seed, Widening)

    @property
    def widening_live(self) -> bool:
        """Do this slot's widening's channels run (TRAINING, BLENDING, HOLDING, fading)?"""
        return self._mode in (_TRAINING, _BLENDING)

    def gate(self, r: torch.Tensor) -> torch.Tensor:
        """A widening's read-out r as the host receives it: cancelled in the forward in TRAINING
        (straight-through: backward as if α = 1), scaled by the blend coefficient (and the
        per-sample ablation) after."""
        if self._mode == _TRAINING:
            return r - r.detach()
        coef = self.coef if self._ablation is None else self.coef * _per_sample(self._ablation, r)
        return coef * r

    def _screen(self, d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """δ with its non-finite elements zeroed (their gradient too); flags the seed."""
        ok = torch.isfinite(d)
        self._flag(ok.all(), x)
        return torch.where(ok, d, 0.0)

    def _flag(self, output_finite: torch.Tensor, x: torch.Tensor) -> None:
        """Raise `fault` when the output is non-finite although the input was finite (with a
        non-finite input the fault lies upstream, in the host). Training forwards only."""
        if not torch.is_grad_enabled():
            return
        fault = ~output_finite & torch.isfinite(x).all()
        self._fault = fault if self._fault is None else self._fault | fault

    @property
    def fault(self) -> torch.Tensor | None:
        """0-d bool on the slot's device: did its seed (or phage) turn a finite input into a
        non-finite output since the tick began? None: nothing ran through it."""
        return self._fault

    def reset_tick_telemetry(self) -> None:
        """Forget this tick's gradient sums, activation probe and fault flag: at the end of a
        tick, and when the engine rolls back (a failed attempt must leave no trace)."""
        self._grad = self._probe = self._fault = None

    @property
    def ablatable(self) -> bool:
        """Does the seed change the forward output (so that ablating it means something)?"""
        return self._mode in (_BLENDING, _PHAGE)

    def set_ablation(self, multiplier: torch.Tensor | None) -> None:
        """Scale this seed's contribution per sample (0 = α forced to 0 for that sample). The
        engine uses it to evaluate every seed's α=0 ablation in one fused, replicated batch."""
        self._ablation = multiplier

    # -- lifecycle operations ------------------------------------------------------------------
    def germinate(
        self,
        spec: SeedSpec,
        *,
        actor: Actor = Actor.TAMIYO,
        alpha_target: float = 1.0,
        tempo_ticks: int = 5,
        alpha_curve: AlphaCurve = AlphaCurve.LINEAR,
        seed_id: str | None = None,
        init_seed: int | None = None,
    ) -> None:
        """Instantiate `spec` here (DORMANT → GERMINATED). The first ramp is fixed now.
        `init_seed`: initialise the seed from a private generator with this seed, so that its
        weights depend on nothing else (the engine derives it from the run's seed, the slot and
        the tick); None draws from torch's global stream."""
        self._check(actor, Op.GERMINATE)
        if init_seed is None:
            seed, blend = self.build(spec)
        else:
            with torch.random.fork_rng(devices=[]):  # modules are built, and initialised, on CPU
                torch.manual_seed(init_seed)
                seed, blend = self.build(spec)
        if isinstance(seed, Widening):
            seed.install(self)  # its layers are sane by construction (the host's, wider)
        else:
            self._sanity_check(seed)
        self.seed, self.blend, self.spec = seed, blend, spec
        self.pending = (alpha_target, tempo_ticks, alpha_curve)
        self.seed_id = seed_id
        self.lifecycle.apply(actor, Op.GERMINATE)
        self._refresh()

    def build(self, spec: SeedSpec) -> tuple[SeedModule, Blend]:
        """A fresh seed module and its blend operator for this slot, on the slot's device."""
        if spec.blueprint is Blueprint.WIDEN:
            seed: SeedModule | Widening = self._widening(spec)
            blend = Blend(Style.RESIDUAL, self.channels, self.topology, learned=False)
            return seed.to(self.coef.device), blend.to(self.coef.device)
        seed = build_seed(spec, self.topology, self.channels)
        blend = Blend(spec.style, self.channels, self.topology, learned=_has_params(seed))
        return seed.to(self.coef.device), blend.to(self.coef.device)

    def _widening(self, spec: SeedSpec) -> Widening:
        if self.site is None:
            raise IllegalTransition(
                self.name,
                self.stage,
                Actor.TAMIYO,
                Op.GERMINATE,
                "WIDEN needs a host that declares its residual stream (the built-in CNN, MLP "
                "and transformer hosts); a slot in a user's module cannot widen",
            )
        k = max(1, math.ceil(self.site.stream.width * spec.channel_width))
        return Widening(self.site, k)

    def advance(self, *, actor: Actor = Actor.TAMIYO) -> Stage:
        """GERMINATED → TRAINING; TRAINING → BLENDING (G2 must have passed); BLENDING → HOLDING
        (the α ramp must be finished)."""
        self._check(actor, Op.ADVANCE)
        if self.stage is Stage.TRAINING:
            report = self.last_gate
            if report is None or not report.passed:
                why = "G2 gate not evaluated" if report is None else str(report)
                raise IllegalTransition(self.name, self.stage, actor, Op.ADVANCE, why)
            target, tempo, curve = self.pending
            self.schedule = AlphaSchedule(0.0, target, tempo, curve, delay=self.spec.warmup_ticks)
        elif self.stage is Stage.BLENDING and not self.schedule.done:
            why = f"α ramp not finished ({self.schedule.ticks_left} ticks left)"
            raise IllegalTransition(self.name, self.stage, actor, Op.ADVANCE, why)
        self.lifecycle.apply(actor, Op.ADVANCE)
        self._refresh()
        return self.stage

    def set_alpha_target(
        self,
        target: float,
        ticks: int,
        curve: AlphaCurve = AlphaCurve.LINEAR,
        *,
        actor: Actor = Actor.TAMIYO,
    ) -> None:
        """Start a new ramp from the current α (continuous) to `target`."""
        self._check(actor, Op.SET_ALPHA_TARGET)
        self.schedule = self.schedule.retarget(target, ticks, curve)
        self.lifecycle.apply(actor, Op.SET_ALPHA_TARGET)
        self._refresh()

    def fossilize(self, *, actor: Actor = Actor.TAMIYO) -> Phage | Compaction:
        """HOLDING → COMMITTED: fold α into the seed and rewrap it as a Phage (custody to
        Emrakul). The α machinery leaves the forward path; isolation ends. A widening is
        compacted into the host's layers instead (`Widening.compact`)."""
        self._check(actor, Op.FOSSILIZE)
        seed, blend = self.seed, self.blend
        if isinstance(seed, Widening):  # compacted into the host: no phage, nothing left here
            self.absorbed = self.seed_param_count()
            compaction = seed.compact(self, blend.coefficient(self.alpha))
            self.seed = self.blend = None
            self.lifecycle.apply(actor, Op.FOSSILIZE)
            self._refresh()
            return compaction
        seed.scale_output_(blend.coefficient(self.alpha))
        self.seed = self.blend = None
        self.phage = Phage(
            seed, blend if blend.style in (Style.VALVE, Style.GATE) else None, name=self.name
        )
        self.lifecycle.apply(actor, Op.FOSSILIZE)
        self._refresh()
        return self.phage

    def prune(self, *, actor: Actor = Actor.TAMIYO, fade_ticks: int | None = None) -> None:
        """Begin removal: α fades to 0 over `fade_ticks` (default from config), then the seed is
        dropped and the slot goes PRUNED → EMBARGOED → RESETTING → DORMANT on the clock. Tamiyo
        prunes live seeds; the engine prunes in emergencies (no fade) and lyses committed phages
        (`lyse`); Emrakul never deletes."""
        op = Op.EMERGENCY_PRUNE if actor is Actor.TOLARIA else Op.PRUNE
        self._remove(actor, op, fade_ticks)

    def lyse(self, *, actor: Actor = Actor.TOLARIA, fade_ticks: int | None = None) -> None:
        """Physical removal of a committed phage, by the engine (its LysisGovernor) only: it
        fades from its current sedation over `fade_ticks`, then the slot is freed."""
        self._remove(actor, Op.LYSE, fade_ticks)

    def _remove(self, actor: Actor, op: Op, fade_ticks: int | None) -> None:
        self._check(actor, op)
        if self.absorbed:
            raise IllegalTransition(
                self.name,
                self.stage,
                actor,
                op,
                "a committed widening is host tissue: its channels are lysed as channel groups",
            )
        fade = self.lifecycle.config.prune_fade_ticks if fade_ticks is None else fade_ticks
        if op is Op.EMERGENCY_PRUNE or (self.phage is None and self.alpha == 0.0):
            fade = 0  # emergencies do not wait, and a seed at α = 0 has nothing to fade
        if self.phage is not None:
            self.phage.schedule_prune(fade)
        else:
            self.schedule = self.schedule.retarget(0.0, fade, AlphaCurve.LINEAR)
        self.lifecycle.apply(actor, op)
        self._refresh()

    def sedate(self, target: Target, value: float = 0.0, *, actor: Actor = Actor.EMRAKUL) -> None:
        """Emrakul's soft gating of a committed phage: SEDATE (value 0) or WEAKEN (a factor)."""
        self._check(actor, Op.SEDATE if value == 0.0 else Op.WEAKEN)
        self.phage.apply_sedation_mask(target, value)

    def lift(self, target: Target, *, actor: Actor = Actor.EMRAKUL) -> None:
        self._check(actor, Op.LIFT)
        self.phage.lift(target)

    def tick(self, t: int) -> Stage:
        """The engine's clock, once per control tick: advance α, then the lifecycle."""
        self.lifecycle.check_tick(t)  # a repeated tick must not move α or a fade either
        if self.stage in (Stage.BLENDING, Stage.HOLDING, Stage.PRUNED):
            self.schedule = self.schedule.step()
        fade_done = self.phage.tick() if self.phage is not None else self.schedule.done
        stage = self.lifecycle.tick(t, fade_done=fade_done)
        if stage in (Stage.EMBARGOED, Stage.RESETTING, Stage.DORMANT) and self._holds_module():
            self._clear()
        self.reset_tick_telemetry()
        self._refresh()
        return stage

    # -- G2 maturity gate ----------------------------------------------------------------------
    def evaluate_gate(self) -> GateReport:
        """Gradient health plus a bounded activation probe under a small test blend (§3.2)."""
        cfg, reasons = self.gate_config, []
        if self.stage is not Stage.TRAINING:
            self.last_gate = GateReport(False, (f"stage is {self.stage.name}, not TRAINING",))
            return self.last_gate
        seed_rms, host_rms, ratio = self._gradient_health()
        metrics = {"seed_grad_rms": seed_rms, "host_grad_rms": host_rms, "grad_ratio": ratio}
        if self.lifecycle.ticks_in_stage < cfg.min_training_ticks:
            reasons.append(
                f"only {self.lifecycle.ticks_in_stage} of {cfg.min_training_ticks} training ticks"
            )
        if not _has_params(self.seed):
            pass  # nothing to train (NOOP): only the probe applies
        elif self._grad is None:
            reasons.append("no gradients observed")
        elif not seed_rms > cfg.vanishing_grad:
            reasons.append(f"vanishing seed gradient (rms {seed_rms:.2e})")
        elif not seed_rms < cfg.exploding_grad:
            reasons.append(f"exploding seed gradient (rms {seed_rms:.2e})")
        elif not cfg.min_grad_ratio <= ratio <= cfg.max_grad_ratio:
            reasons.append(
                f"seed/host gradient ratio {ratio:.2e} outside "
                f"[{cfg.min_grad_ratio:g}, {cfg.max_grad_ratio:g}]"
            )
        shift = 0.0 if self.widening else self._probe_shift()  # a widening's forward is the STE's
        if shift is None:
            reasons.append("no activation probe captured")
        else:
            metrics["probe_shift"] = shift
            if not shift <= cfg.max_probe_shift:
                reasons.append(
                    f"test blend at α={cfg.probe_alpha} shifts activations by "
                    f"{shift:.3g} > {cfg.max_probe_shift}"
                )
        self.last_gate = GateReport(not reasons, tuple(reasons), metrics)
        return self.last_gate

    def _probe_shift(self) -> float | None:
        if self._probe is None:
            return None
        x = self._probe
        c = self.blend.coefficient(self.gate_config.probe_alpha)
        with probing(self.seed), probing(self.blend):
            y = x + c * self.blend.delta(x, self.seed(x), x)
        return float(_rms(y - x) / _rms(x).clamp_min(1e-12))

    # -- gradient telemetry --------------------------------------------------------------------
    def observe_gradients(self, host_grad_rms: torch.Tensor) -> None:
        """Accumulate this step's seed and host gradient statistics (no host sync)."""
        if self.stage not in (Stage.TRAINING, Stage.BLENDING, Stage.HOLDING):
            return
        params = [*self.seed.parameters(), *self.blend.parameters()]
        grads = [p.grad.float() for p in params if p.grad is not None]
        host = host_grad_rms.float()
        seed_sq = torch.stack([g.pow(2).sum() for g in grads]).sum() if grads else host * 0
        step = torch.stack([seed_sq, host.pow(2), torch.ones_like(host)])
        self._grad = step if self._grad is None else self._grad + step

    def _gradient_health(self) -> tuple[float, float, float]:
        if self._grad is None:
            return 0.0, 0.0, 0.0
        seed_sq, host_sq, steps = self._grad.tolist()
        n = max(1, self.seed_param_count())
        seed_rms = (seed_sq / steps / n) ** 0.5
        host_rms = (host_sq / steps) ** 0.5
        return seed_rms, host_rms, seed_rms / host_rms if host_rms > 0 else float("inf")

    # -- telemetry -----------------------------------------------------------------------------
    def seed_param_count(self) -> int:
        """The seed's parameters (a committed widening's now live in the host's layers: its
        count is kept, so rent prices it as any committed seed)."""
        mods = [m for m in (self.seed, self.blend, self.phage) if m is not None]
        return self.absorbed + sum(p.numel() for m in mods for p in m.parameters())

    def telemetry(self) -> SlotTelemetry:
        seed_rms, host_rms, ratio = self._gradient_health()
        return SlotTelemetry(
            name=self.name,
            stage=self.stage,
            ticks_in_stage=self.lifecycle.ticks_in_stage,
            alpha=self.effective_alpha,
            alpha_target=self.schedule.target,
            alpha_curve=self.schedule.curve,
            alpha_ticks_left=self.schedule.ticks_left,
            seed_grad_norm=seed_rms,
            host_grad_norm=host_rms,
            grad_ratio=ratio,
            param_count=self.seed_param_count(),
            spec=self.spec,
            contribution=self.contribution,
            contribution_tick=self.contribution_tick,
            gate_passed=None if self.last_gate is None else self.last_gate.passed,
            seed_id=self.seed_id,
            topology=self.topology,
            channels=self.channels,
        )

    @property
    def effective_alpha(self) -> float:
        """α as the host feels it: the schedule's α; a phage runs at 1, or at its module-level
        sedation while it fades out."""
        if self.phage is None:
            return self.alpha
        return float(self.phage.sedation) if self.phage.module_sedated else 1.0

    # -- internals -----------------------------------------------------------------------------
    def _check(self, actor: Actor, op: Op) -> None:
        check(self.name, self.stage, actor, op)

    def _holds_module(self) -> bool:
        return self.seed is not None or self.phage is not None

    def _clear(self) -> None:
        if isinstance(self.seed, Widening):
            self.seed.uninstall(self)
        self.seed = self.blend = self.phage = None
        self.absorbed = 0
        self.spec = self.last_gate = self.seed_id = None
        self.contribution = self.contribution_tick = None
        self.schedule = AlphaSchedule()

    def _refresh(self) -> None:
        """Recompute the forward mode and the blend coefficient after any change."""
        stage = self.stage
        if self.phage is not None and stage in (Stage.COMMITTED, Stage.PRUNED):
            self._mode = _PHAGE
        elif stage is Stage.TRAINING:
            self._mode = _TRAINING
        elif self.seed is not None and stage in (Stage.BLENDING, Stage.HOLDING, Stage.PRUNED):
            self._mode = _BLENDING
            self.coef.fill_(self.blend.coefficient(self.alpha))
        else:
            self._mode = _IDENTITY
        if stage is Stage.PRUNED and self._mode == _BLENDING and self.schedule.done:
            self._mode = _IDENTITY  # faded out (or removed at once): the seed no longer runs

    @torch.no_grad()
    def _sanity_check(self, seed: nn.Module) -> None:
        """GERMINATED means 'instantiated and sane': shape preserved, finite output."""
        c = self.channels
        shape = {Topology.CNN: (2, c, 4, 4), Topology.SEQ: (2, 4, c), Topology.VEC: (2, c)}
        # A private generator: germinating must not move the run's RNG stream.
        x = torch.randn(shape[self.topology], generator=torch.Generator().manual_seed(0))
        x = x.to(self.coef.device)
        y = seed(x)
        if y.shape != x.shape or not torch.isfinite(y).all():
            raise RuntimeError(
                f"slot {self.name!r}: seed {type(seed).__name__} failed its "
                f"sanity check (shape {tuple(y.shape)} for input {tuple(x.shape)})"
            )
