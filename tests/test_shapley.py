"""Shapley, Banzhaf and interaction values against the axioms, brute force over all orders, and
hand-computed games."""

from __future__ import annotations

import itertools
from math import factorial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esper.simic.shapley import (
    CountingValue,
    banzhaf,
    exact_shapley,
    interaction_index,
    leave_one_out,
    permutation_shapley,
    subsets,
)


def table_game(players: list[str], values: list[float]) -> dict[frozenset, float]:
    return dict(zip(subsets(players), values, strict=True))


def brute_force_shapley(players: list[str], v) -> dict[str, float]:
    """Average marginal contribution over all n! orders: the definition, independent of §5.3."""
    phi = dict.fromkeys(players, 0.0)
    for order in itertools.permutations(players):
        seen: frozenset = frozenset()
        for p in order:
            phi[p] += v(seen | {p}) - v(seen)
            seen = seen | {p}
    return {p: x / factorial(len(players)) for p, x in phi.items()}


@st.composite
def games(draw, max_players: int = 4):
    n = draw(st.integers(1, max_players))
    players = [f"p{i}" for i in range(n)]
    values = draw(st.lists(st.floats(-10, 10, allow_nan=False), min_size=2**n, max_size=2**n))
    return players, table_game(players, values)


# ---------------------------------------------------------------------------------------------
# Exact Shapley: the axioms and the definition
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(games())
def test_exact_shapley_equals_brute_force_and_is_efficient(game) -> None:
    players, table = game
    phi = exact_shapley(players, table.__getitem__)
    ref = brute_force_shapley(players, table.__getitem__)
    for p in players:
        assert phi[p] == pytest.approx(ref[p], abs=1e-9)
    full, empty = table[frozenset(players)], table[frozenset()]
    assert sum(phi.values()) == pytest.approx(full - empty, abs=1e-9)
    assert phi.evaluations == 2 ** len(players)


@settings(max_examples=30, deadline=None)
@given(games(), games())
def test_exact_shapley_is_additive(g1, g2) -> None:
    players = g1[0] if len(g1[0]) <= len(g2[0]) else g2[0]
    a = {s: g1[1].get(s, 0.0) for s in subsets(players)}
    b = {s: g2[1].get(s, 0.0) for s in subsets(players)}
    both = exact_shapley(players, lambda s: a[s] + b[s])
    pa, pb = exact_shapley(players, a.__getitem__), exact_shapley(players, b.__getitem__)
    for p in players:
        assert both[p] == pytest.approx(pa[p] + pb[p], abs=1e-9)


def test_symmetric_players_get_equal_credit_and_a_null_player_none() -> None:
    # a and b interchangeable, c adds nothing to any coalition.
    def v(s: frozenset) -> float:
        k = len(s & {"a", "b"})
        return [0.0, 3.0, 10.0][k]

    phi = exact_shapley(["a", "b", "c"], v)
    assert phi["a"] == pytest.approx(phi["b"]) == pytest.approx(5.0)
    assert phi["c"] == 0.0
    assert banzhaf(["a", "b", "c"], v)["c"] == 0.0
    assert leave_one_out(["a", "b", "c"], v) == {"a": 7.0, "b": 7.0, "c": 0.0}


def test_players_must_be_distinct() -> None:
    with pytest.raises(ValueError, match="distinct"):
        exact_shapley(["a", "a"], lambda s: 0.0)


# ---------------------------------------------------------------------------------------------
# Banzhaf and interaction on a hand-computed game
# ---------------------------------------------------------------------------------------------


def test_banzhaf_and_interaction_on_a_two_player_game() -> None:
    # v(∅)=0, v(a)=1, v(b)=2, v(ab)=6: a synergy of 3.
    table = table_game(["a", "b"], [0.0, 1.0, 2.0, 6.0])
    v = table.__getitem__
    # Banzhaf: a = ((1−0) + (6−2))/2 = 2.5, b = ((2−0) + (6−1))/2 = 3.5
    assert banzhaf(["a", "b"], v) == {"a": 2.5, "b": 3.5}
    # Shapley with n=2 equals Banzhaf; interaction = 6 − 1 − 2 + 0 = 3
    assert exact_shapley(["a", "b"], v) == {"a": 2.5, "b": 3.5}
    assert interaction_index(["a", "b"], v, "a", "b") == 3.0


def test_interaction_on_a_three_player_game() -> None:
    # v(S) = 1 if {a, b} ⊆ S else 0; c is null.
    def v(s: frozenset) -> float:
        return float({"a", "b"} <= s)

    # I_ab = Σ_{S ⊆ {c}} |S|!(1−|S|)!/2! · Δ = 1/2 · 1 + 1/2 · 1 = 1
    assert interaction_index("abc", v, "a", "b") == pytest.approx(1.0)
    assert interaction_index("abc", v, "a", "c") == pytest.approx(0.0)
    # Banzhaf of a: only S ∈ {{b}, {b,c}} pivot: 2/4
    assert banzhaf("abc", v)["a"] == pytest.approx(0.5)
    cv = CountingValue(v)
    interaction_index("abc", cv, "a", "b")
    assert cv.evaluations == 8


# ---------------------------------------------------------------------------------------------
# Permutation sampling
# ---------------------------------------------------------------------------------------------


def test_permutation_estimate_converges_and_is_seeded() -> None:
    players = ["a", "b", "c", "d"]
    weights = {"a": 1.0, "b": 2.0, "c": -1.5, "d": 0.5}

    def v(s: frozenset) -> float:  # additive part plus interactions that make orders matter
        return (
            sum(weights[p] for p in s)
            + 4.0 * ({"a", "b"} <= s)
            - 3.0 * ({"c", "d"} <= s)
            + 2.0 * (len(s) == 3)
        )

    exact = exact_shapley(players, v)

    def error(samples: int, antithetic: bool) -> float:
        est = permutation_shapley(players, v, samples, seed=7, antithetic=antithetic)
        return max(abs(est[p] - exact[p]) for p in players)

    for antithetic in (True, False):
        assert error(2000, antithetic) < error(20, antithetic)
        assert error(2000, antithetic) < 0.1
    again = permutation_shapley(players, v, 20, seed=7)
    assert again == permutation_shapley(players, v, 20, seed=7)
    assert again != permutation_shapley(players, v, 20, seed=8)
    assert again.evaluations <= 2 ** len(players)


def test_antithetic_pairs_are_exact_for_two_players() -> None:
    # The two orders of two players are each other's reverse: one pair is the whole average.
    table = table_game(["a", "b"], [0.0, 1.0, 2.0, 6.0])
    est = permutation_shapley(["a", "b"], table.__getitem__, samples=2, seed=0)
    assert est == exact_shapley(["a", "b"], table.__getitem__)


def test_leave_one_out_counts_n_plus_one_subsets() -> None:
    loo = leave_one_out("abc", lambda s: float(len(s)) ** 2)
    assert loo == {"a": 5.0, "b": 5.0, "c": 5.0}
    assert loo.evaluations == 4
