"""The decay half (paper §9): phage tissue, Emrakul's actions under the LysisGovernor, ROI
telemetry from the fused evaluation, lysis at the safe boundary, and decay in whole runs."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import esper
from _engine_helpers import digits, small_config
from conftest import grow, host_input, small_cnn, small_mlp, small_transformer
from esper.config import HostConfig
from esper.contracts import (
    Actor,
    Blueprint,
    DecayAction,
    DecayObservation,
    FactoredAction,
    IllegalTransition,
    Op,
    Scope,
    SeedSpec,
    Stage,
    Topology,
    UnitROI,
)
from esper.emrakul import EmrakulConfig, HeuristicEmrakul
from esper.kasmina import (
    HiddenUnits,
    LysisError,
    MLPHost,
    SeedSlot,
    apply_model_state,
    mark_host_phages,
    mark_phage,
    model_state,
    module_cost,
    slots_of,
    tissue_of,
)
from esper.kasmina.lysis import recording_slices
from esper.run import build_episode, resume_run, start_run
from esper.simic import EconomyConfig
from esper.tolaria.decay import Decay, _slice_moments
from esper.tolaria.environment import EnvConfig, GrowthEnv
from esper.tolaria.lysis import LysisConfig
from test_export import run_without_esper

HOSTS = {"cnn": small_cnn, "mlp": small_mlp, "transformer": small_transformer}


def _grown(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A host of `kind` with its blocks marked as phages and one committed seed with units."""
    torch.manual_seed(0)
    model = HOSTS[kind]()
    mark_host_phages(model)
    x = host_input(model)
    slot = next(iter(slots_of(model).values()))
    grow(model, slot, x, SeedSpec(Blueprint.MLP), Stage.COMMITTED)
    return model, x


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------------------------------------
# Tissue: what Emrakul can act on, and who may do what
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(HOSTS))
def test_tissue_lists_host_blocks_and_committed_seeds_with_their_scope(kind: str) -> None:
    model, _ = _grown(kind)
    tissue = tissue_of(model)
    kinds = {n: (t.kind, t.scope) for n, t in tissue.items()}
    assert kinds[next(iter(slots_of(model)))] == ("seed", Scope.CHANNEL_SLICE)
    hosts = {n: s for n, (k, s) in kinds.items() if k == "host"}
    assert len(hosts) == len(model.blocks if hasattr(model, "blocks") else model.layers)
    if kind == "transformer":  # attention blocks have heads, MLP blocks channel slices
        assert hosts["layers.0"] is Scope.HEAD and hosts["layers.1"] is Scope.CHANNEL_SLICE


def test_an_unmarked_host_has_no_host_tissue_and_a_users_block_can_opt_in() -> None:
    model = small_mlp()
    assert tissue_of(model) == {}
    mark_phage(model.blocks[0], "mine")
    assert list(tissue_of(model)) == ["mine"]
    with pytest.raises(LysisError, match="no lysable units"):
        mark_phage(nn.Linear(3, 3), "plain")


@pytest.mark.parametrize("kind", list(HOSTS))
def test_sedate_then_lift_restores_the_outputs_bit_for_bit(kind: str) -> None:
    model, x = _grown(kind)
    before = _out(model, x)
    for t in tissue_of(model).values():
        t.set([0], 0.0, Actor.EMRAKUL)
    sedated = _out(model, x)
    assert not torch.equal(sedated, before)
    for t in tissue_of(model).values():
        t.set([0], 1.0, Actor.EMRAKUL)
        assert not t.mask.active  # a lifted mask does no work in the forward
    assert torch.equal(_out(model, x), before)


def test_custody_emrakul_never_deletes_and_tamiyo_never_touches_a_phage() -> None:
    model, _ = _grown("mlp")
    tissue = tissue_of(model)
    seed, host = tissue["slots.b0"], tissue["blocks.0"]
    for t in (seed, host):
        t.set([1], 0.0, Actor.EMRAKUL)
        with pytest.raises(IllegalTransition, match="emrakul may not LYSE"):
            t.lyse([1], actor=Actor.EMRAKUL)
        with pytest.raises(IllegalTransition, match="tamiyo may not SEDATE"):
            t.set([2], 0.0, Actor.TAMIYO)
        with pytest.raises(IllegalTransition, match="tolaria may not SEDATE"):
            t.set([2], 0.0, Actor.TOLARIA)
        t.set([1], 1.0, Actor.TOLARIA)  # the governor's wake-up
    with pytest.raises(LysisError, match="not fully sedated"):
        host.lyse([0])


@pytest.mark.parametrize("kind", list(HOSTS))
def test_lysis_keeps_outputs_and_removes_exactly_the_units_params(kind: str) -> None:
    model, x = _grown(kind)
    tissue = tissue_of(model)
    for t in tissue.values():
        t.set([0], 0.0, Actor.EMRAKUL)
    sedated = _out(model, x)
    count = sum(p.numel() for p in model.parameters())
    expected = sum(t.unit_params() for t in tissue.values())
    removed = sum(t.lyse([0]) for t in tissue.values())
    assert removed == expected == count - sum(p.numel() for p in model.parameters())
    assert torch.allclose(_out(model, x), sedated, atol=1e-6, rtol=0)
    after = tissue_of(model)
    assert all(after[n].units == t.units for n, t in tissue.items())


def test_a_weakened_unit_is_folded_into_the_weights_exactly() -> None:
    model, x = _grown("transformer")
    t = tissue_of(model)["layers.0"]  # heads
    t.set([1], 0.3, Actor.EMRAKUL)
    weakened = _out(model, x)
    t.fold([1])
    assert float(t.mask.mask[1]) == 1.0 and not t.mask.active
    assert torch.allclose(_out(model, x), weakened, atol=1e-6, rtol=0)


def test_checkpoints_carry_lysed_shapes_and_the_marks() -> None:
    model, x = _grown("cnn")
    for t in tissue_of(model).values():
        t.set([0, 2], 0.0, Actor.EMRAKUL)
        t.lyse([0, 2])
    meta, tensors = model_state(model)
    torch.manual_seed(1)
    fresh = small_cnn()  # not marked: the checkpoint marks it
    apply_model_state(fresh, meta, tensors)
    assert {n: t.units for n, t in tissue_of(fresh).items()} == {
        n: t.units for n, t in tissue_of(model).items()
    }
    assert torch.equal(_out(fresh, x), _out(model, x))


# ---------------------------------------------------------------------------------------------
# The engine: fused unit ablations, Emrakul's actions under the governor, the safe boundary
# ---------------------------------------------------------------------------------------------


def _env(width: int = 8, seed: int = 0) -> GrowthEnv:
    torch.manual_seed(seed)
    task = digits()
    model = MLPHost(64, width, 2, 10)
    mark_host_phages(model)
    return GrowthEnv(model, task, EnvConfig(batches_per_tick=3), device=torch.device("cpu"), seed=0)


def test_a_units_replica_in_the_fused_evaluation_equals_evaluating_it_sedated() -> None:
    env = _env()
    env.train_tick()
    units = [("blocks.0", 3), ("blocks.1", 0), ("blocks.1", 5)]
    ev = env.evaluate(units)
    tissue = tissue_of(env.model)
    for name, u in units:
        tissue[name].set([u], 0.0, Actor.EMRAKUL)
        alone = env.evaluate()
        tissue[name].set([u], 1.0, Actor.EMRAKUL)
        contribution, rise = ev.units[(name, u)]
        assert contribution == pytest.approx(ev.metric - alone.metric, abs=1e-6)
        assert rise == pytest.approx(alone.loss - ev.loss, abs=1e-5)


def _decay(env: GrowthEnv, **cfg: object) -> Decay:
    return Decay(env.model, env.slots, LysisConfig(**cfg), EconomyConfig())


def test_a_panic_in_probation_wakes_the_unit_and_makes_it_immune() -> None:
    env = _env()
    decay = _decay(env, sedation_budget=0.5, immunity_ticks=4)
    mask = tissue_of(env.model)["blocks.0"].mask
    (e,) = decay.execute([DecayAction(Op.SEDATE, "blocks.0", 2)], tick=3, baseline_loss=1.0)
    assert e.kind == "lysis_probation" and float(mask.mask[2]) == 0.0
    (panic,) = decay.after_evaluation({}, loss=1.2, tick=4)  # > 1.0 × 1.05
    assert panic.kind == "lysis_panic" and float(mask.mask[2]) == 1.0
    assert panic.payload["immune_until"] == 9
    again = decay.execute([DecayAction(Op.SEDATE, "blocks.0", 2)], tick=8, baseline_loss=1.0)
    assert again[0].kind == "lysis_refused" and "immune" in again[0].payload["reason"]
    assert float(mask.mask[2]) == 1.0
    later = decay.execute([DecayAction(Op.SEDATE, "blocks.0", 2)], tick=9, baseline_loss=1.0)
    assert later[0].kind == "lysis_probation"


def test_emrakuls_lift_ends_probation_and_unknown_units_are_refused() -> None:
    env = _env()
    decay = _decay(env, sedation_budget=0.5)
    decay.execute([DecayAction(Op.WEAKEN, "blocks.1", 4, 0.5)], tick=0, baseline_loss=1.0)
    mask = tissue_of(env.model)["blocks.1"].mask
    assert float(mask.mask[4]) == 0.5
    (lift,) = decay.execute([DecayAction(Op.LIFT, "blocks.1", 4)], tick=1, baseline_loss=1.0)
    assert lift.kind == "lysis_lifted" and not mask.active
    bad = decay.execute(
        [DecayAction(Op.SEDATE, "nowhere", 0), DecayAction(Op.SEDATE, "blocks.1", 99)], 1, 1.0
    )
    assert [e.kind for e in bad] == ["lysis_refused"] * 2


def test_the_safe_boundary_lyses_condemned_units_and_slices_their_moments() -> None:
    env = _env()
    env.train_tick()  # Adam has moments for every weight
    decay = _decay(env, sedation_budget=0.5, probation_checks=2)
    t = tissue_of(env.model)["blocks.0"]
    body, out = t.module.body[-1], t.module.out
    old = {"body": (body.weight, env.optimizer.state[body.weight]["exp_avg"].clone())}
    old["out"] = (out.weight, env.optimizer.state[out.weight]["exp_avg_sq"].clone())
    decay.execute(
        [DecayAction(Op.SEDATE, "blocks.0", 1), DecayAction(Op.SEDATE, "blocks.0", 6)], 0, 1.0
    )
    x = env.val_x[:16]
    sedated = _out(env.model, x)
    params = sum(p.numel() for p in env.model.parameters())
    assert decay.safe_boundary(env.optimizer) == []  # still in probation
    kinds = [e.kind for tick in (1, 2) for e in decay.after_evaluation({}, 0.9, tick)]
    assert kinds == ["lysis_condemned"] * 2
    events = decay.safe_boundary(env.optimizer)
    env.sync_optimizer()
    assert [e.kind for e in events] == ["lysed", "lysed"]
    # a unit of an MLP block of width 8: 8 weights + 1 bias in, 8 weights out
    assert decay.lysed_params == 2 * 17 == params - sum(p.numel() for p in env.model.parameters())
    assert torch.allclose(_out(env.model, x), sedated, atol=1e-6, rtol=0)
    keep = [u for u in range(16) if u not in (1, 6)]
    state = env.optimizer.state
    assert torch.equal(state[t.module.body[-1].weight]["exp_avg"], old["body"][1][keep])
    assert torch.equal(state[t.module.out.weight]["exp_avg_sq"], old["out"][1][:, keep])
    assert old["body"][0] not in state and decay.governor.sedated_mass == 0
    env.train_tick()  # the optimizer steps the sliced weights
    assert all(torch.isfinite(p).all() for p in env.model.parameters())


def test_units_of_a_phage_the_engine_removed_leave_the_governor() -> None:
    model, _ = _grown("mlp")
    slots = slots_of(model)
    decay = Decay(model, slots, LysisConfig(sedation_budget=0.5), EconomyConfig())
    decay.execute([DecayAction(Op.SEDATE, "slots.b0", 3)], tick=0, baseline_loss=1.0)
    assert decay.governor.sedated_mass > 0
    slots["slots.b0"].prune(actor=Actor.TOLARIA)  # an emergency prune of the committed seed
    opt = torch.optim.Adam(model.parameters())
    (e,) = decay.safe_boundary(opt)
    assert e.kind == "lysis_dropped" and e.unit == "slots.b0#3"
    assert decay.governor.sedated_mass == 0 and decay.governor.units == {}


def test_keys_of_units_after_a_lysed_one_move_down() -> None:
    env = _env()
    decay = _decay(env, sedation_budget=0.5, probation_checks=1)
    decay.history = {"blocks.0#5": [(0.1, 0.2)], "blocks.0#1": [(0.0, 0.0)]}
    decay.execute([DecayAction(Op.SEDATE, "blocks.0", 1)], 0, 1.0)
    decay.execute([DecayAction(Op.SEDATE, "blocks.0", 7)], 0, 1.0)
    decay.after_evaluation({}, 0.5, 1)  # both condemned
    decay.execute([DecayAction(Op.SEDATE, "blocks.0", 9)], 1, 1.0)  # in probation
    decay.safe_boundary(env.optimizer)
    assert decay.history == {"blocks.0#4": [(0.1, 0.2)]}
    assert list(decay.governor.units) == ["blocks.0#7"]  # unit 9 is now the 8th: index 7
    assert float(tissue_of(env.model)["blocks.0"].mask.mask[7]) == 0.0


def test_slicing_moments_follows_every_recorded_slice() -> None:
    layer = nn.Linear(4, 3)
    opt = torch.optim.Adam(layer.parameters())
    layer(torch.randn(2, 4)).sum().backward()
    opt.step()
    avg = opt.state[layer.weight]["exp_avg"].clone()
    from esper.kasmina.lysis import keep_in

    with recording_slices() as slices:
        keep_in(layer, torch.tensor([0, 3]))
    _slice_moments(opt, slices)
    assert torch.equal(opt.state[layer.weight]["exp_avg"], avg[:, [0, 3]])


ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["sedate", "weaken", "lift", "tick", "boundary"]),
        st.sampled_from(["blocks.0", "blocks.1"]),
        st.integers(0, 15),
        st.floats(0.5, 1.5),
    ),
    max_size=40,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ACTIONS)
def test_the_sedation_budget_is_never_exceeded(actions: list) -> None:
    env = _env()
    decay = _decay(env, sedation_budget=0.05, probation_checks=2, immunity_ticks=2)
    tick = 0
    for op, phage, unit, x in actions:
        tissue = tissue_of(env.model)
        unit = unit % tissue[phage].units
        if op == "tick":
            tick += 1
            decay.after_evaluation({}, x, tick)
        elif op == "boundary":
            decay.safe_boundary(env.optimizer)
        else:
            kind = {"sedate": Op.SEDATE, "weaken": Op.WEAKEN, "lift": Op.LIFT}[op]
            decay.execute([DecayAction(kind, phage, unit, 0.5)], tick, 1.0)
        g = decay.governor
        assert g.sedated_mass <= g.budget
        masked = {
            f"{n}#{u}"
            for n, t in tissue_of(env.model).items()
            for u in range(t.units)
            if float(t.mask.mask[u]) != 1.0
        }
        assert masked == set(g.units)  # a mask is on exactly while the governor holds the unit


# ---------------------------------------------------------------------------------------------
# The heuristic Emrakul
# ---------------------------------------------------------------------------------------------


def _unit(unit: int, contribution: float | None, **kw: object) -> UnitROI:
    base = dict(
        phage="p", unit=unit, scope=Scope.CHANNEL_SLICE, kind="host", params=10, rent=0.001,
        contribution=contribution, loss_delta=0.0, spread=0.0, samples=3, mask=1.0,
        state="active", immune_until=-1,
    )  # fmt: skip
    return UnitROI(**{**base, **kw})


def test_heuristic_sedates_the_worst_roi_that_costs_more_than_it_brings() -> None:
    units = (
        _unit(0, 0.01),  # pays its way
        _unit(1, 0.0, loss_delta=0.001),
        _unit(2, -0.003),  # the worst ROI
        _unit(3, 0.0, spread=0.01),  # not confident: 0 + 0.01/√3 > rent
        _unit(4, -0.01, immune_until=6),
        _unit(5, -0.01, samples=1),
        _unit(6, -0.01, loss_delta=0.5),  # the loss feels it
        _unit(7, -0.01, state="probation", mask=0.0),
        _unit(8, None),
    )
    obs = DecayObservation(tick=5, units=units, budget=100, sedated=0, loss=1.0)
    acts = HeuristicEmrakul(EmrakulConfig(max_per_tick=5)).act(obs)
    assert [(a.op, a.unit) for a in acts] == [(Op.SEDATE, 2), (Op.SEDATE, 1)]
    tight = replace(obs, sedated=85)  # room for one unit of 10 parameters
    assert [a.unit for a in HeuristicEmrakul(EmrakulConfig(max_per_tick=5)).act(tight)] == [2]
    assert HeuristicEmrakul(EmrakulConfig(max_per_tick=1)).act(obs)[0].unit == 2


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------

EAGER_LYSIS = LysisConfig(probation_checks=1, sedation_budget=0.2, units_per_tick=64)
EAGER_EMRAKUL = EmrakulConfig(min_samples=1, max_loss_rise=1.0, max_per_tick=4, z=0.0)


def _decay_config(ticks: int, **kw: object):  # type: ignore[no-untyped-def]
    return small_config(
        ticks,
        decay="heuristic",
        host=HostConfig(kind="mlp", width=16, depth=2),
        lysis=EAGER_LYSIS,
        emrakul=EAGER_EMRAKUL,
        **kw,
    )


def test_a_run_with_decay_lyses_records_and_resumes_across_lysis(tmp_path: Path) -> None:
    cfg = _decay_config(10, checkpoint_every=4)
    whole = start_run(cfg, run_dir=tmp_path / "whole").run()
    run = start_run(cfg, run_dir=tmp_path / "cut")
    for t in range(6):
        run.step(t)
    run.store.close()
    resumed = resume_run(tmp_path / "cut")
    assert resumed.start_tick == 4
    result = resumed.run()
    assert result.weights_hash == whole.weights_hash
    assert result.event_log_hash == whole.event_log_hash
    kinds = [e.kind for e in resumed.store.events()]
    assert "lysis_probation" in kinds and "lysed" in kinds
    metrics = dict(resumed.store.metrics())
    assert metrics[9]["lysed_params"] > 0
    assert result.params_removed == metrics[9]["lysed_params"]


class Bottleneck(nn.Module):
    """A user's module whose signal all passes through the 2 units of one block (opted in as a
    phage): sedating the busier unit hurts, whatever training does in one tick."""

    def __init__(self) -> None:
        super().__init__()
        neck = HiddenUnits([nn.Linear(64, 2)], 2, nn.Linear(2, 32), Topology.VEC)
        self.neck = mark_phage(neck, "neck")
        self.slot = SeedSlot(32, Topology.VEC)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.slot(self.neck(x.flatten(1))))


def test_a_sedated_load_bearing_unit_wakes_up_without_lasting_damage() -> None:
    """Fault injection: at tick 6 Emrakul is made to sedate the unit whose ablation raises the
    loss most. The governor's next check sees the spike, lifts the mask and makes the unit
    immune; the run ends within 0.5 point of the same run without that sedation (same seed)."""
    cfg = small_config(
        20,
        policy="none",
        decay="heuristic",
        env=EnvConfig(batches_per_tick=0),  # an epoch a tick: both runs reach their plateau
        lysis=LysisConfig(sedation_budget=0.5),  # a unit is 17% of this small model
    )

    def play(inject: bool) -> tuple[float, list[str]]:
        torch.manual_seed(0)
        episode = build_episode(cfg, model=Bottleneck(), task=digits())
        events = []

        def emrakul(obs: DecayObservation) -> list[DecayAction]:
            if not inject or obs.tick != 6:
                return []
            worst = max(obs.units, key=lambda u: u.loss_delta or 0.0)
            return [DecayAction(Op.SEDATE, worst.phage, worst.unit)]

        episode.emrakul = emrakul
        for _ in range(cfg.ticks):
            episode.observe()
            out = episode.act(FactoredAction())
            events += [e.kind for e in out.events]
        return out.metric, events

    clean, clean_events = play(inject=False)
    hurt, events = play(inject=True)
    assert events.count("lysis_probation") == 1 and events.count("lysis_panic") == 1
    assert "lysed" not in events and "lysis_panic" not in clean_events
    assert abs(hurt - clean) <= 0.005, (hurt, clean)


@pytest.mark.parametrize("kind", list(HOSTS))
def test_a_lysed_model_exports_and_runs_without_esper(kind: str, tmp_path: Path) -> None:
    model, x = _grown(kind)
    for t in tissue_of(model).values():
        t.set([0], 0.0, Actor.EMRAKUL)
        t.lyse([0])
    esper.export(model, x[:2], tmp_path / "model")
    want = _out(model, x)
    got = run_without_esper(tmp_path, x)
    assert torch.allclose(got["program"], want, atol=1e-6, rtol=0)
    assert math.isfinite(float(got["program"].sum()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decay_on_cuda_ablates_sedates_and_lyses() -> None:
    """The whole decay half on CUDA: unit replicas, sedation, lysis with sliced moments."""
    episode = build_episode(replace(_decay_config(8), device="cuda"))
    kinds = []
    for _ in range(8):
        episode.observe()
        kinds += [e.kind for e in episode.act(FactoredAction()).events]
    assert "unit_roi" in kinds and "lysed" in kinds
    assert episode.decay.lysed_params > 0
    assert all(p.is_cuda for p in episode.env.model.parameters())
    assert all(torch.isfinite(p).all() for p in episode.env.model.parameters())


def test_a_block_with_every_unit_lysed_still_runs_and_is_costed() -> None:
    model, x = _grown("cnn")
    t = tissue_of(model)["blocks.0"]
    t.set(list(range(t.units)), 0.0, Actor.EMRAKUL)
    before = _out(model, x)
    t.lyse(list(range(t.units)))
    assert "blocks.0" not in tissue_of(model)
    assert torch.allclose(_out(model, x), before, atol=1e-6, rtol=0)
    cost = module_cost(model, x[:1])  # FLOP counting hooks every module's output
    assert cost.flops > 0
