"""SeedSlot on real hosts: dormant slots are free identities, the G2 gate names what is wrong,
commit folds α into a phage and ends isolation, and pruning fades, drops and respects authority."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import fixed_loss, grow, host_input, slot_free, small_cnn, tick, train_step
from esper.contracts import (
    Actor,
    AlphaCurve,
    Blueprint,
    IllegalTransition,
    LifecycleConfig,
    SeedSpec,
    Stage,
    Style,
    Topology,
)
from esper.kasmina import (
    CNNHost,
    GateConfig,
    MLPHost,
    SeedSlot,
    TransformerHost,
    observe_gradients,
    slots_of,
)

# ---------------------------------------------------------------------------------------------
# Dormant
# ---------------------------------------------------------------------------------------------

HOST_CASES = {
    "cnn": (lambda: CNNHost(), lambda g: torch.randn(4, 1, 8, 8, generator=g)),
    "mlp": (lambda: MLPHost(), lambda g: torch.randn(4, 64, generator=g)),
    "transformer": (
        lambda: TransformerHost(),
        lambda g: torch.randint(0, 256, (2, 16), generator=g),
    ),
}


def _features_for(slot: SeedSlot) -> torch.Tensor:
    shape = {
        Topology.CNN: (2, slot.channels, 4, 4),
        Topology.SEQ: (2, 5, slot.channels),
        Topology.VEC: (2, slot.channels),
    }[slot.topology]
    return torch.randn(shape)


@pytest.mark.parametrize("host", list(HOST_CASES))
def test_dormant_slots_are_free_identities(host: str) -> None:
    torch.manual_seed(0)
    build, make_input = HOST_CASES[host]
    model = build()
    slots = slots_of(model)
    assert slots
    for slot in slots.values():
        assert slot.stage is Stage.DORMANT
        h = _features_for(slot)
        assert slot(h) is h
        assert list(slot.parameters()) == [] and slot.state_dict() == {}
    x = make_input(torch.Generator().manual_seed(1))
    plain = slot_free(model)
    assert not any(isinstance(m, SeedSlot) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    # ... and the state dicts are the same: slots add no keys while dormant
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_germinated_slot_is_still_identity() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    slot = slots_of(model)["slots.b0"]
    slot.germinate(SeedSpec(Blueprint.CONV_SMALL))
    h = _features_for(slot)
    assert slot(h) is h
    assert slot.seed is not None and slot.seed_param_count() > 0


# ---------------------------------------------------------------------------------------------
# G2 maturity gate
# ---------------------------------------------------------------------------------------------


def _training_cnn(spec: SeedSpec | None = None) -> tuple[nn.Module, SeedSlot, torch.Tensor]:
    """A small CNN host whose slots.b0 has just entered TRAINING (CONV_LIGHT by default)."""
    spec = spec or SeedSpec(Blueprint.CONV_LIGHT)
    torch.manual_seed(0)
    model = small_cnn()
    slot = slots_of(model)["slots.b0"]
    x = host_input(model)
    grow(model, slot, x, spec, Stage.TRAINING)
    return model, slot, x


def _backward(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    fixed_loss(model(x)).backward()


def test_gate_passes_for_a_healthy_seed_after_min_ticks() -> None:
    model, slot, x = _training_cnn()
    tick(slot)
    train_step(model, x)
    report = slot.evaluate_gate()
    assert report.passed and report.reasons == ()
    assert {"seed_grad_rms", "host_grad_rms", "grad_ratio", "probe_shift"} <= set(report.metrics)
    assert "G2 passed" in str(report)
    assert slot.advance() is Stage.BLENDING


def test_gate_fails_with_too_few_ticks() -> None:
    model, slot, x = _training_cnn()
    train_step(model, x)
    report = slot.evaluate_gate()
    assert not report.passed and any("0 of 1 training ticks" in r for r in report.reasons)
    with pytest.raises(IllegalTransition, match=r"G2.*training ticks"):
        slot.advance()
    assert slot.stage is Stage.TRAINING


def test_gate_min_ticks_is_configurable() -> None:
    torch.manual_seed(0)
    model = small_cnn(gate=GateConfig(min_training_ticks=3))
    slot, x = slots_of(model)["slots.b0"], host_input(model)
    grow(model, slot, x, SeedSpec(Blueprint.CONV_LIGHT), Stage.TRAINING)
    for ticks in range(4):
        train_step(model, x)
        assert slot.evaluate_gate().passed == (ticks >= 3)
        tick(slot)


def test_gate_fails_without_gradients() -> None:
    model, slot, x = _training_cnn()
    tick(slot)
    with torch.no_grad():
        model(x)  # the probe is captured, but no backward and no telemetry
    report = slot.evaluate_gate()
    assert not report.passed and "no gradients observed" in report.reasons


def test_gate_forgets_last_ticks_gradients() -> None:
    model, slot, x = _training_cnn()
    tick(slot)
    train_step(model, x)
    assert slot.evaluate_gate().passed
    tick(slot)  # a new tick: statistics and probe start afresh
    report = slot.evaluate_gate()
    assert "no gradients observed" in report.reasons
    assert "no activation probe captured" in report.reasons


def test_gate_fails_on_vanishing_gradient() -> None:
    model, slot, x = _training_cnn()
    tick(slot)
    _backward(model, x)
    for p in slot.seed.parameters():
        p.grad.zero_()
    observe_gradients(model)
    report = slot.evaluate_gate()
    assert not report.passed and any("vanishing" in r for r in report.reasons), report


def test_gate_fails_on_exploding_gradient() -> None:
    model, slot, x = _training_cnn()
    tick(slot)
    _backward(model, x)
    for p in slot.seed.parameters():
        p.grad.mul_(1e9)
    observe_gradients(model)
    report = slot.evaluate_gate()
    assert not report.passed and any("exploding" in r for r in report.reasons), report
    with pytest.raises(IllegalTransition, match=r"G2 failed.*exploding"):
        slot.advance()


def test_gate_fails_on_seed_host_gradient_ratio() -> None:
    model, slot, x = _training_cnn()
    tick(slot)
    _backward(model, x)
    slot.observe_gradients(torch.tensor(1e6))  # the host's gradients dwarf the seed's
    report = slot.evaluate_gate()
    assert not report.passed and any("ratio" in r for r in report.reasons), report


def test_gate_fails_on_large_probe_shift() -> None:
    model, slot, x = _training_cnn()
    tick(slot)
    train_step(model, x)
    assert slot.evaluate_gate().passed
    slot.seed.scale_output_(1e3)
    report = slot.evaluate_gate()
    assert not report.passed
    assert any("shifts activations" in r for r in report.reasons), report
    assert report.metrics["probe_shift"] > slot.gate_config.max_probe_shift


def test_advance_without_gate_evaluation_mentions_g2() -> None:
    model, slot, x = _training_cnn()
    tick(slot)
    train_step(model, x)
    with pytest.raises(IllegalTransition) as e:
        slot.advance()
    assert "G2" in str(e.value) and "TRAINING" in str(e.value) and "ADVANCE" in str(e.value)
    assert slot.stage is Stage.TRAINING


def test_noop_gate_needs_only_the_probe() -> None:
    model, slot, x = _training_cnn(SeedSpec(Blueprint.NOOP))
    tick(slot)
    train_step(model, x)
    report = slot.evaluate_gate()
    assert report.passed and report.metrics["probe_shift"] == 0.0


# ---------------------------------------------------------------------------------------------
# Commit (FOSSILIZE): α folded into a phage, isolation ends
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", list(Style))
@pytest.mark.parametrize("blueprint", [Blueprint.CONV_LIGHT, Blueprint.NORM, Blueprint.ATTENTION])
def test_commit_folds_alpha_and_ends_isolation(style: Style, blueprint: Blueprint) -> None:
    torch.manual_seed(0)
    model = small_cnn()
    slot, x = slots_of(model)["slots.b0"], host_input(model)
    grow(model, slot, x, SeedSpec(blueprint, style), Stage.HOLDING, target=0.7)
    assert slot.alpha == 0.7

    _backward(model, x)
    out_holding = model(x).detach()
    stem_grad_isolated = model.stem[0].weight.grad.clone()

    phage = slot.fossilize()
    assert slot.stage is Stage.COMMITTED
    assert slot.phage is phage and slot.seed is None and slot.blend is None
    assert (phage.blend is not None) == (style in (Style.VALVE, Style.GATE))
    assert slot.telemetry().alpha == 1.0  # no α any more: the phage runs at full strength
    with torch.no_grad():
        assert torch.allclose(model(x), out_holding, atol=1e-6, rtol=0)

    _backward(model, x)
    stem_grad = model.stem[0].weight.grad.clone()
    assert stem_grad.abs().sum() > 0
    # Same forward, but the upstream gradient now also flows back through the seed path.
    assert not torch.allclose(stem_grad, stem_grad_isolated, atol=1e-7, rtol=1e-5)

    stem_before = model.stem[0].weight.detach().clone()
    seed_before = [p.detach().clone() for p in phage.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(model.stem[0].weight, stem_before)
    assert all(not torch.equal(p, q) for p, q in zip(phage.parameters(), seed_before, strict=True))


def test_isolation_holds_before_commit() -> None:
    """In BLENDING the host's upstream gradient does not see the seed's Jacobian: it equals the
    gradient of a model whose seed output is a constant (detached) tensor."""
    torch.manual_seed(0)
    model = small_cnn()
    slot, x = slots_of(model)["slots.b0"], host_input(model)
    grow(model, slot, x, SeedSpec(Blueprint.CONV_LIGHT), Stage.HOLDING)
    _backward(model, x)
    got = model.stem[0].weight.grad.clone()

    frozen = copy.deepcopy(model)
    fslot = slots_of(frozen)["slots.b0"]
    seed = fslot.seed
    fslot.seed = None  # keep the module out of the graph: s(h) enters as a constant

    class Const(nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return seed(h.detach()).detach()

    fslot.seed = Const()
    frozen.zero_grad(set_to_none=True)
    fixed_loss(frozen(x)).backward()
    assert torch.equal(got, frozen.stem[0].weight.grad)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("stage", [Stage.TRAINING, Stage.BLENDING])
def test_a_non_finite_seed_never_reaches_the_host(bad: float, stage: Stage) -> None:
    """`h + (d − d.detach())` is NaN when d is inf: the slot screens δ, so a TRAINING slot stays
    bit-identical to the slot-free host (outputs and host gradients), a BLENDING one adds nothing
    where δ is non-finite, and the seed's fault flag is raised for the governor."""
    torch.manual_seed(0)
    model = small_cnn()
    slot, x = slots_of(model)["slots.b0"], host_input(model)
    grow(model, slot, x, SeedSpec(Blueprint.CONV_LIGHT), stage)
    plain = slot_free(model)
    with torch.no_grad():
        last = [p for p in slot.seed.parameters() if p.dim() == 1][-1]  # the last layer's bias
        last.fill_(bad)
    slot.reset_tick_telemetry()
    out = model(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, plain(x))  # BLENDING at α=0 and TRAINING alike
    model.zero_grad(set_to_none=True)
    plain.zero_grad(set_to_none=True)
    fixed_loss(out).backward()
    fixed_loss(plain(x)).backward()
    host = dict(plain.named_parameters())
    assert host
    for name, p in model.named_parameters():
        if name in host:
            assert torch.equal(p.grad, host[name].grad), name
    assert slot.fault is not None and bool(slot.fault)
    slot.reset_tick_telemetry()  # a rollback forgets it
    assert slot.fault is None


def test_a_non_finite_input_is_not_the_seeds_fault() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    slot, x = slots_of(model)["slots.b0"], host_input(model)
    grow(model, slot, x, SeedSpec(Blueprint.CONV_LIGHT), Stage.TRAINING)
    slot.reset_tick_telemetry()
    model(x)
    assert not bool(slot.fault)  # a healthy seed
    model(torch.full_like(x, float("nan")))
    assert not bool(slot.fault)  # the host broke first: the seed is not blamed


# ---------------------------------------------------------------------------------------------
# Prune
# ---------------------------------------------------------------------------------------------


def _holding_slot(**kw: object) -> SeedSlot:
    """slots.b0 of a small CNN host, HOLDING a CONV_LIGHT seed at α = 0.7."""
    torch.manual_seed(0)
    model = small_cnn(**kw)
    slot, x = slots_of(model)["slots.b0"], host_input(model)
    grow(model, slot, x, SeedSpec(Blueprint.CONV_LIGHT), Stage.HOLDING, target=0.7)
    return slot


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prune_fades_alpha_to_zero_over_k_ticks_then_drops(k: int) -> None:
    slot = _holding_slot()
    h = _features_for(slot)
    slot.prune(fade_ticks=k)
    assert slot.stage is Stage.PRUNED and slot.alpha == 0.7  # continuous at the prune
    alphas = []
    for j in range(1, k):
        assert tick(slot) is Stage.PRUNED
        assert slot.alpha == pytest.approx(0.7 * (1 - j / k), abs=1e-12)
        with torch.no_grad():
            assert torch.allclose(slot(h), h + slot.alpha * slot.seed(h), atol=1e-6)
        alphas.append(slot.alpha)
    assert alphas == sorted(alphas, reverse=True)
    assert tick(slot) is Stage.EMBARGOED  # α reached 0 at tick k: dropped
    assert slot.seed is None and slot.spec is None and slot.seed_param_count() == 0
    assert slot(h) is h


def test_prune_default_fade_comes_from_config() -> None:
    slot = _holding_slot(lifecycle=LifecycleConfig(prune_fade_ticks=2))
    slot.prune()
    assert tick(slot) is Stage.PRUNED and slot.alpha == pytest.approx(0.35)
    assert tick(slot) is Stage.EMBARGOED


def test_immediate_prune_drops_at_next_tick() -> None:
    slot = _holding_slot()
    h = _features_for(slot)
    slot.prune(fade_ticks=0)
    assert slot.stage is Stage.PRUNED and slot.alpha == 0.0
    assert slot(h) is h  # out of the forward at once
    assert tick(slot) is Stage.EMBARGOED and slot.seed is None


def test_emergency_prune_of_committed_slot_by_tolaria() -> None:
    slot = _holding_slot()
    slot.fossilize()
    h = _features_for(slot)
    slot.prune(actor=Actor.TOLARIA, fade_ticks=5)  # emergencies do not wait for a fade
    assert slot.stage is Stage.PRUNED
    with torch.no_grad():
        assert torch.equal(slot(h), h)
    assert tick(slot) is Stage.EMBARGOED and slot.phage is None


def test_emrakul_lysis_of_committed_slot_fades_from_current_sedation() -> None:
    slot = _holding_slot()
    phage = slot.fossilize()
    h = _features_for(slot)
    slot.sedate("module", 0.5)  # WEAKEN first
    with torch.no_grad():
        full = phage.module(h)
        assert torch.allclose(slot(h), h + 0.5 * full, atol=1e-6)
    slot.lyse(fade_ticks=4)  # the engine's LysisGovernor
    assert slot.stage is Stage.PRUNED
    for j in range(1, 4):
        with torch.no_grad():  # no jump back to full strength, then a linear fade
            assert torch.allclose(slot(h), h + 0.5 * (1 - (j - 1) / 4) * full, atol=1e-6)
        assert tick(slot) is Stage.PRUNED
    assert tick(slot) is Stage.EMBARGOED and slot.phage is None


def test_emrakul_may_only_sedate_weaken_lift_committed() -> None:
    slot = _holding_slot()
    for call in (
        lambda: slot.sedate([0]),
        lambda: slot.sedate([0], 0.5),
        lambda: slot.lift([0]),
        lambda: slot.prune(actor=Actor.EMRAKUL),
        lambda: slot.fossilize(actor=Actor.EMRAKUL),
        lambda: slot.set_alpha_target(0.5, 3, actor=Actor.EMRAKUL),
    ):
        with pytest.raises(IllegalTransition, match="emrakul"):
            call()
        assert slot.stage is Stage.HOLDING
    phage = slot.fossilize()
    h = _features_for(slot)
    with torch.no_grad():
        y = slot(h)
        slot.sedate([0, 1])
        assert phage.unit_mask_values()[:2] == [0.0, 0.0]
        assert not torch.equal(slot(h), y)
        slot.lift([0, 1])
        assert torch.equal(slot(h), y)
    for call in (  # Emrakul never deletes, not even a committed phage
        lambda: slot.prune(actor=Actor.EMRAKUL),
        lambda: slot.lyse(actor=Actor.EMRAKUL),
    ):
        with pytest.raises(IllegalTransition, match=r"emrakul may not (PRUNE|LYSE)"):
            call()
    assert slot.stage is Stage.COMMITTED
    slot.lyse()  # the engine does
    assert slot.stage is Stage.PRUNED


def test_tamiyo_may_not_touch_committed() -> None:
    slot = _holding_slot()
    slot.fossilize()
    state = (slot.stage, slot.lifecycle.ticks_in_stage, slot.phage)
    calls = {
        "GERMINATE": lambda: slot.germinate(SeedSpec(Blueprint.LORA)),
        "ADVANCE": lambda: slot.advance(),
        "SET_ALPHA_TARGET": lambda: slot.set_alpha_target(0.5, 3, AlphaCurve.LINEAR),
        "PRUNE": lambda: slot.prune(),
        "FOSSILIZE": lambda: slot.fossilize(),
        "SEDATE": lambda: slot.sedate([0], actor=Actor.TAMIYO),
        "LIFT": lambda: slot.lift([0], actor=Actor.TAMIYO),
    }
    for op, call in calls.items():
        with pytest.raises(IllegalTransition) as e:
            call()
        assert f"tamiyo may not {op} in stage COMMITTED" in str(e.value)
        assert (slot.stage, slot.lifecycle.ticks_in_stage, slot.phage) == state


# ---------------------------------------------------------------------------------------------
# Telemetry
# ---------------------------------------------------------------------------------------------


def test_telemetry_reports_the_seed() -> None:
    model, slot, x = _training_cnn()
    tick(slot)
    train_step(model, x)
    t = slot.telemetry()
    n = sum(p.numel() for p in slot.seed.parameters())
    assert t.stage is Stage.TRAINING and t.param_count == n and t.spec == slot.spec
    grads = torch.cat([p.grad.flatten() for p in slot.seed.parameters()])
    assert t.seed_grad_norm == pytest.approx(float(grads.pow(2).mean().sqrt()), rel=1e-5)
    assert t.grad_ratio == pytest.approx(t.seed_grad_norm / t.host_grad_norm, rel=1e-6)
