"""The LysisGovernor's two-stage protocol: probation, condemnation, panic, immunity, budget."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.contracts.errors import ConfigError
from esper.tolaria.lysis import LysisConfig, LysisGovernor

CFG = LysisConfig(probation_checks=3, panic_fraction=0.05, immunity_ticks=4, sedation_budget=0.05)


def test_a_quiet_probation_ends_condemned_then_lysed() -> None:
    gov = LysisGovernor(CFG, host_params=1000)
    assert gov.sedate("b0/head1", 40, baseline_loss=1.0, tick=0).kind == "lysis_probation"
    kinds = [[e.kind for e in gov.check(loss, t)] for t, loss in enumerate([1.02, 0.99, 1.05])]
    assert kinds == [[], [], ["lysis_condemned"]]  # 1.05 = baseline × 1.05: not a spike
    assert gov.condemned() == ["b0/head1"]
    event = gov.lysed("b0/head1")
    assert (event.kind, event.payload["params"]) == ("lysed", 40)
    assert gov.host_params == 960 and gov.sedated_mass == 0


def test_a_spike_wakes_the_unit_which_is_then_immune() -> None:
    gov = LysisGovernor(CFG, host_params=1000)
    gov.sedate("u", 10, baseline_loss=2.0, tick=5)
    gov.check(2.0, 5)
    (event,) = gov.check(2.0 * 1.05 + 1e-6, 6)
    assert event.kind == "lysis_panic" and event.payload["immune_until"] == 6 + 1 + 4
    assert gov.sedated_mass == 0 and not gov.condemned()
    for t in range(6, 11):
        refused = gov.sedate("u", 10, 2.0, t)
        assert refused.kind == "lysis_refused" and "immune" in refused.payload["reason"]
    assert gov.sedate("u", 10, 2.0, 11).kind == "lysis_probation"


def test_a_nan_loss_is_a_spike() -> None:
    gov = LysisGovernor(CFG, host_params=1000)
    gov.sedate("u", 10, 1.0, 0)
    assert [e.kind for e in gov.check(math.nan, 0)] == ["lysis_panic"]


def test_the_budget_refuses_what_would_exceed_it() -> None:
    gov = LysisGovernor(CFG, host_params=1000)  # 5%: 50 parameters
    assert gov.sedate("a", 30, 1.0, 0).kind == "lysis_probation"
    refused = gov.sedate("b", 21, 1.0, 0)
    assert refused.kind == "lysis_refused" and "budget" in refused.payload["reason"]
    assert gov.sedate("b", 20, 1.0, 0).kind == "lysis_probation"
    assert gov.lift("a").kind == "lysis_lifted" and gov.sedated_mass == 20


def test_only_probation_can_be_lifted_and_only_condemned_lysed() -> None:
    gov = LysisGovernor(LysisConfig(probation_checks=1), host_params=1000)
    gov.sedate("u", 10, 1.0, 0)
    with pytest.raises(ValueError, match="not condemned"):
        gov.lysed("u")
    gov.check(1.0, 0)
    assert gov.lift("u").kind == "lysis_refused"  # condemned: the governor's now
    assert gov.lift("never").kind == "lysis_refused"


def test_state_round_trip() -> None:
    gov = LysisGovernor(CFG, host_params=1000)
    gov.sedate("a", 10, 1.0, 0)
    gov.sedate("b", 10, 1.0, 0)
    gov.check(1.0, 0)
    gov.check(9.0, 1)  # both woken
    gov.sedate("c", 5, 1.0, 2)
    copy = LysisGovernor(CFG, host_params=1)
    copy.load_state_dict(gov.state_dict())
    assert copy.state_dict() == gov.state_dict()
    assert [e.kind for e in copy.check(1.0, 3)] == [e.kind for e in gov.check(1.0, 3)]


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError):
        LysisConfig(sedation_budget=0.0)
    with pytest.raises(ConfigError):
        LysisConfig(probation_checks=0)


OPS = st.one_of(
    st.tuples(st.just("sedate"), st.integers(0, 5), st.integers(1, 40), st.floats(0.5, 2.0)),
    st.tuples(st.just("lift"), st.integers(0, 5)),
    st.tuples(st.just("check"), st.floats(0.4, 3.0)),
    st.tuples(st.just("lyse")),
)


@settings(max_examples=200, deadline=None)
@given(host=st.integers(100, 2000), budget=st.floats(0.01, 0.2), ops=st.lists(OPS, max_size=60))
def test_the_sedation_budget_is_never_exceeded(host: int, budget: float, ops: list) -> None:
    gov = LysisGovernor(LysisConfig(sedation_budget=budget, probation_checks=2), host)
    for t, op in enumerate(ops):
        if op[0] == "sedate":
            granted = gov.sedate(f"u{op[1]}", op[2], op[3], t).kind == "lysis_probation"
            assert not granted or gov.sedated_mass <= gov.budget  # a grant stays within it
        elif op[0] == "lift":
            gov.lift(f"u{op[1]}")
        elif op[0] == "check":
            gov.check(op[1], t)
        else:
            for unit in gov.condemned():
                gov.lysed(unit)
        assert gov.sedated_mass <= int(budget * host)  # and nothing else adds mass
