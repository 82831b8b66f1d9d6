"""Cooperative-game credit over a small set of players (paper §5.3). Pure Python, no torch.

A game is a value function `v(S)` over frozensets `S` of players. In an audit each distinct
subset costs a full retrain, so every estimator runs `v` through a counting cache and reports how
many distinct subsets it evaluated (`Credit.evaluations`).

    exact_shapley         φ_i = Σ_{S ⊆ N∖i} |S|!(n−|S|−1)!/n! · [v(S ∪ i) − v(S)]     2^n subsets
    banzhaf               β_i = Σ_{S ⊆ N∖i} [v(S ∪ i) − v(S)] / 2^(n−1)              2^n subsets
    interaction_index     I_ij = Σ_{S ⊆ N∖{i,j}} |S|!(n−|S|−2)!/(n−1)! · Δ_ij v(S)  [Grabisch 97]
    permutation_shapley   mean marginal contribution over sampled orders (antithetic pairs)
    leave_one_out         v(N) − v(N∖i)                                               n+1 subsets

With all 2^n subsets evaluated, use `exact_shapley`: sampling permutations on top of a complete
table only adds noise.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Hashable, Iterable, Sequence
from math import factorial
from typing import Any

Value = Callable[[frozenset], float]


class CountingValue:
    """`v` behind a cache: each distinct subset is evaluated once; `evaluations` counts them."""

    def __init__(self, v: Value) -> None:
        self.v = v
        self.cache: dict[frozenset, float] = {}

    def __call__(self, subset: Iterable[Any]) -> float:
        key = frozenset(subset)
        if key not in self.cache:
            self.cache[key] = float(self.v(key))
        return self.cache[key]

    @property
    def evaluations(self) -> int:
        return len(self.cache)


class Credit(dict):
    """Player -> credit, with `evaluations`: the distinct subsets (retrains) it took."""

    def __init__(self, values: dict[Any, float], evaluations: int) -> None:
        super().__init__(values)
        self.evaluations = evaluations


def _counting(v: Value) -> CountingValue:
    return v if isinstance(v, CountingValue) else CountingValue(v)


def _players(players: Iterable[Hashable]) -> list[Hashable]:
    out = list(players)
    if len(set(out)) != len(out):
        raise ValueError(f"players must be distinct, got {out!r}")
    return out


def subsets(players: Sequence[Hashable]) -> list[frozenset]:
    """All 2^n subsets, smallest first."""
    return [
        frozenset(c) for k in range(len(players) + 1) for c in itertools.combinations(players, k)
    ]


# ---------------------------------------------------------------------------------------------
# Exact values over all subsets
# ---------------------------------------------------------------------------------------------


def exact_shapley(players: Iterable[Hashable], v: Value) -> Credit:
    """Shapley values by the subset formula of §5.3."""
    ps, cv = _players(players), _counting(v)
    n = len(ps)
    phi = {}
    for i in ps:
        rest = [p for p in ps if p != i]
        total = 0.0
        for s in subsets(rest):
            weight = factorial(len(s)) * factorial(n - len(s) - 1) / factorial(n)
            total += weight * (cv(s | {i}) - cv(s))
        phi[i] = total
    return Credit(phi, cv.evaluations)


def banzhaf(players: Iterable[Hashable], v: Value) -> Credit:
    """Banzhaf values: the unweighted mean marginal contribution over the other players' subsets."""
    ps, cv = _players(players), _counting(v)
    beta = {}
    for i in ps:
        rest = [p for p in ps if p != i]
        beta[i] = sum(cv(s | {i}) - cv(s) for s in subsets(rest)) / 2 ** len(rest)
    return Credit(beta, cv.evaluations)


def interaction_index(players: Iterable[Hashable], v: Value, i: Hashable, j: Hashable) -> float:
    """Pairwise Shapley interaction index of i and j: > 0 complements, < 0 substitutes.
    To count evaluations, pass a `CountingValue`."""
    ps, cv = _players(players), _counting(v)
    if i == j or i not in ps or j not in ps:
        raise ValueError(f"need two distinct players of {ps!r}, got {i!r}, {j!r}")
    n = len(ps)
    rest = [p for p in ps if p not in (i, j)]
    total = 0.0
    for s in subsets(rest):
        weight = factorial(len(s)) * factorial(n - len(s) - 2) / factorial(n - 1)
        total += weight * (cv(s | {i, j}) - cv(s | {i}) - cv(s | {j}) + cv(s))
    return total


def leave_one_out(players: Iterable[Hashable], v: Value) -> Credit:
    """v(N) − v(N∖i): what removing each player alone from the full coalition costs."""
    ps, cv = _players(players), _counting(v)
    full = frozenset(ps)
    return Credit({i: cv(full) - cv(full - {i}) for i in ps}, cv.evaluations)


# ---------------------------------------------------------------------------------------------
# Monte Carlo over permutations
# ---------------------------------------------------------------------------------------------


def permutation_shapley(
    players: Iterable[Hashable], v: Value, samples: int, seed: int, antithetic: bool = True
) -> Credit:
    """Mean marginal contribution over `samples` orders drawn by `random.Random(seed)`.

    Antithetic: every drawn order is followed by its reverse (a player early in one is late in the
    other), which cancels much of the position noise; an odd `samples` ends on an unpaired draw.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    ps, cv = _players(players), _counting(v)
    rng = random.Random(seed)
    totals = dict.fromkeys(ps, 0.0)
    done = 0
    while done < samples:
        order = ps[:]
        rng.shuffle(order)
        pair = [order, order[::-1]] if antithetic else [order]
        for perm in pair[: samples - done]:
            prefix: frozenset = frozenset()
            before = cv(prefix)
            for p in perm:
                prefix = prefix | {p}
                after = cv(prefix)
                totals[p] += after - before
                before = after
            done += 1
    return Credit({p: t / samples for p, t in totals.items()}, cv.evaluations)
