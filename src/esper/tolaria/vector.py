"""K episodes stepped in lockstep: one policy call per control tick for all of them.

Inverted control flow (paper §4.1): the engine drives every episode through the first half of the
tick and hands the caller K observations at once, so a learned policy runs one batched forward
per tick instead of K; the caller hands back K actions and the engine finishes the tick.

    obs = venv.observe()             # each episode: Episode.observe()          K observations
    result = venv.act(actions)       # each episode: Episode.act(action)        K outcomes

The tick is the episode's (`esper.tolaria.episode`): the vector adds nothing to it, so a run of K
episodes here gives what K recorded runs (`esper.run.GrowthRun`) give: the same decisions,
rewards, events and weights (tests/test_parity.py). Episodes are built from specs by a factory
(`make(spec) -> Episode`, e.g. `esper.run.build_episode` on a `GrowConfig`); after its last tick
an episode reports done and is replaced by one built from the next spec.

Backends. "inprocess" runs the K episodes one after another in this process; "processes" splits
them over worker processes (spawned, one torch thread each) that step their shares in parallel.
On CPU the hosts are small and a tick is mostly Python and per-op dispatch, so worker processes
are the way to use several cores (numbers: bench/RESULTS.md, "Vectorised environments"). "ray"
splits them the same way over Ray actors (one CPU and one torch thread each): on the cluster at
`ray_address`, on the caller's Ray if it has initialised one, else on a local instance of one
CPU per actor that `close()` shuts down (Ray is an extra, imported lazily: `esper.tolaria.remote`).
It gives the other backends' results bit for bit (tests/test_vector_ray.py); "auto" never picks
it, as on one machine processes start sooner and need no extra. Processes and actors are
CPU-only (ValueError on CUDA): on CUDA the episodes run in-process, and K processes would each
need their own CUDA context for little gain. In-process on CPU, prefer torch.set_num_threads(1):
these ops are too small to gain from intra-op threads, and on a busy machine OpenMP threads
waiting for a preempted sibling make a tick many times slower.

Overlap on CUDA (`overlap=True`, the default). A tick of one episode reads its results back from
the device once (training loss and health, the evaluation's metrics), and that read makes the CPU
wait for the episode's queued kernels before it can launch the next episode's. So the in-process
backend splits the first half of the tick there: it launches every episode's training and
evaluation (`Episode.launch`), each on its own CUDA stream (streams come from torch's pool, so past
32 episodes some share one), copies all K results to the host in one transfer, then finishes the
episodes in order (`Episode.collect`: governor, metrics, G2 gates, observation). The CPU launches
episode i+1 while the GPU still runs episode i. Every episode runs the same kernels on the same
data as without overlap; only the order between episodes changes. A governor trigger is handled
in `collect`, synchronously, for that episode alone.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from itertools import islice, pairwise
from typing import Any, Generic, Literal, TypeVar

import torch
import torch.multiprocessing as mp

from esper.contracts import FactoredAction, Observation
from esper.tolaria.episode import Episode, Launched, Outcome
from esper.tolaria.remote import connect_ray, import_ray

Spec = TypeVar("Spec")
Backend = Literal["auto", "inprocess", "processes", "ray"]
BACKENDS = ("auto", "inprocess", "processes", "ray")
Make = Callable[[Any], Episode]
"""Builds an episode from a spec; with the processes and ray backends it and the specs must
pickle (a module-level function such as `esper.run.build_episode`)."""


@dataclass(frozen=True)
class StepResult(Generic[Spec]):
    rewards: torch.Tensor
    """(K,) float64 on the CPU: R_total of each episode's tick."""
    dones: torch.Tensor
    """(K,) bool: the episode finished and was replaced by a fresh one."""
    outcomes: tuple[Outcome, ...]
    """Each episode's tick (`Outcome`: metric, reward, ops, rejected, events, ...)."""
    specs: tuple[Spec, ...]
    """The spec of the episode each outcome belongs to (not of its replacement)."""
    baseline: torch.Tensor | None = None
    """With `PairedVectorEnv`: (K,) float64, the twins' rewards, already subtracted from
    `rewards`; None otherwise."""


# ---------------------------------------------------------------------------------------------
# Episodes stepped one after another: the in-process backend, and each worker's share
# ---------------------------------------------------------------------------------------------


def _to_host(launched: list[Launched]) -> list[Launched]:
    """`launched` with its device tensors replaced by host copies, all read in one transfer (one
    host sync). Values are unchanged: float32 results come back widened to float64, which is
    exact, and `collect` turns them into Python floats either way."""
    parts = [t for x in launched for t in (x.train.total, x.train.health, x.evaluation.means)]
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in parts]).cpu()
    chunks = iter(flat.split([t.numel() for t in parts]))

    def back(t: torch.Tensor) -> torch.Tensor:
        return next(chunks).view(t.shape)

    out = []
    for x in launched:
        train = replace(x.train, total=back(x.train.total), health=back(x.train.health))
        out.append(Launched(train, replace(x.evaluation, means=back(x.evaluation.means))))
    return out


class _Episodes:
    """Episodes stepped one after another (the in-process backend, and each worker's share)."""

    def __init__(
        self, make: Make, specs: Sequence[Any], device: torch.device, overlap: bool = False
    ) -> None:
        self.make, self.device = make, device
        self.episodes = [make(s) for s in specs]
        self.two_phase = overlap and device.type == "cuda"
        """Launch every episode, read back once, then finish each (module docstring). On CPU it
        is off: there is nothing to overlap. Tests switch it on there to check that it gives the
        one-phase results bit for bit."""
        # One CUDA stream per position (an episode's replacement keeps its position's stream).
        self._streams = [torch.cuda.Stream(device) for _ in specs] if self.two_phase else []

    def observe(self) -> list[Observation]:
        if not self.two_phase:
            return [e.observe() for e in self.episodes]
        if not self._streams:  # CPU (tests): the same phases, no streams
            launched = [e.launch() for e in self.episodes]
        else:
            main = torch.cuda.current_stream(self.device)
            launched = []
            for episode, stream in zip(self.episodes, self._streams, strict=True):
                # The episode's tensors (data, parameters, optimizer state after `act`) were
                # last written on the main stream: its side stream starts after that work.
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    launched.append(episode.launch())
            for stream in self._streams:
                main.wait_stream(stream)  # the read-back (on main) waits for every episode
        host = _to_host(launched)  # the one host sync of the tick
        # From here on the side streams are idle: tensors they used may be freed or reused.
        return [e.collect(x) for e, x in zip(self.episodes, host, strict=True)]

    def act(
        self, actions: Sequence[FactoredAction], reasons: Sequence[str], next_specs: Sequence[Any]
    ) -> list[Outcome]:
        out = []
        for i, (action, reason) in enumerate(zip(actions, reasons, strict=True)):
            outcome = self.episodes[i].act(action, reason)
            if outcome.done:
                assert next_specs[i] is not None, "an episode finished without a next spec"
                self.episodes[i] = self.make(next_specs[i])
            out.append(outcome)
        return out

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# The process backend: W workers, each owning a contiguous share of the K episodes
# ---------------------------------------------------------------------------------------------


def _split(share: range, *columns: Sequence[Any]) -> tuple[list[Any], ...]:
    """Each column's entries of the positions in `share`."""
    return tuple([column[i] for i in share] for column in columns)


def _shares(k: int, workers: int) -> list[range]:
    """K positions split into min(workers, k) contiguous shares of (nearly) equal size."""
    workers = max(1, min(workers, k))
    bounds = [k * w // workers for w in range(workers + 1)]
    return [range(a, b) for a, b in pairwise(bounds)]


def _cpu_only(backend: str, device: torch.device) -> None:
    if device.type != "cpu":
        raise ValueError(f"the {backend} backend is CPU-only; use backend='inprocess' on CUDA")


def _worker_setup() -> None:
    torch.set_num_threads(1)  # one core per worker; tiny ops gain nothing from intra-op threads
    torch.use_deterministic_algorithms(True)  # as in the parent (`seed_everything`)


def _worker(conn: Any, make: Make, specs: list[Any], device: torch.device) -> None:
    _worker_setup()
    try:
        episodes = _Episodes(make, specs, device)
        conn.send(("ok", None))
        while True:
            cmd, arg = conn.recv()
            if cmd == "close":
                return
            conn.send(("ok", episodes.observe() if cmd == "observe" else episodes.act(*arg)))
    except (EOFError, KeyboardInterrupt):
        return  # the parent went away
    except Exception:
        conn.send(("error", traceback.format_exc()))


class _Processes:
    def __init__(self, make: Make, specs: Sequence[Any], device: torch.device, workers: int):
        _cpu_only("processes", device)
        self.shares = _shares(len(specs), workers)
        # spawn, not fork: a forked child inherits torch's OpenMP pool in an undefined state.
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for share in self.shares:
            parent, child = ctx.Pipe()
            args = (child, make, [specs[i] for i in share], device)
            proc = ctx.Process(target=_worker, args=args, daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        try:
            for conn in self.conns:
                self._recv(conn)
        except BaseException:
            self.close()
            raise

    def _recv(self, conn: Any) -> Any:
        try:
            status, value = conn.recv()
        except EOFError:
            raise RuntimeError("a VectorEnv worker process died") from None
        if status == "error":
            raise RuntimeError(f"a VectorEnv worker failed:\n{value}")
        return value

    def _all(self, messages: list[tuple[str, Any]]) -> list[Any]:
        for conn, msg in zip(self.conns, messages, strict=True):
            conn.send(msg)  # every worker starts before we wait for the first
        return [x for conn in self.conns for x in self._recv(conn)]

    def observe(self) -> list[Observation]:
        return self._all([("observe", None)] * len(self.conns))

    def act(
        self, actions: Sequence[FactoredAction], reasons: Sequence[str], next_specs: Sequence[Any]
    ) -> list[Outcome]:
        return self._all([("act", _split(s, actions, reasons, next_specs)) for s in self.shares])

    def close(self) -> None:
        for conn in self.conns:
            with suppress(BrokenPipeError, OSError):
                conn.send(("close", None))
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        self.conns, self.procs = [], []


# ---------------------------------------------------------------------------------------------
# The Ray backend: W actors, each owning a contiguous share of the K episodes
# ---------------------------------------------------------------------------------------------


class _EpisodesActor:
    """The body of one Ray actor: a worker's share of the episodes. Like `_worker`, it answers
    ("ok", value) or ("error", its traceback); it never raises, so that a failure reaches the
    caller as its own traceback rather than as Ray's wrapper of it."""

    def __init__(self, make: Make, specs: list[Any], device: torch.device) -> None:
        _worker_setup()
        self.episodes: _Episodes | None = None
        self.error: str | None = None
        try:
            self.episodes = _Episodes(make, specs, device)
        except Exception:
            self.error = traceback.format_exc()

    def _answer(self, call: Callable[[_Episodes], Any]) -> tuple[str, Any]:
        if self.error is not None:
            return "error", self.error
        assert self.episodes is not None
        try:
            return "ok", call(self.episodes)
        except Exception:
            # The share's state is unknown now: every later call fails with this error.
            self.error = traceback.format_exc()
            return "error", self.error

    def ready(self) -> tuple[str, Any]:
        return self._answer(lambda episodes: None)

    def observe(self) -> tuple[str, Any]:
        return self._answer(lambda episodes: episodes.observe())

    def act(self, actions: list[Any], reasons: list[str], next_specs: list[Any]) -> tuple[str, Any]:
        return self._answer(lambda episodes: episodes.act(actions, reasons, next_specs))


class _RayActors:
    def __init__(
        self,
        make: Make,
        specs: Sequence[Any],
        device: torch.device,
        workers: int,
        address: str | None = None,
    ) -> None:
        _cpu_only("ray", device)
        self.ray = import_ray()
        self.shares = _shares(len(specs), workers)
        self.actors: list[Any] = []
        self._started = connect_ray(len(self.shares), address)
        """Whether Ray was initialised here (a local instance or a connection): close() ends it."""
        try:
            actor = self.ray.remote(_EpisodesActor).options(
                num_cpus=1, max_restarts=0, max_task_retries=0
            )
            for share in self.shares:
                self.actors.append(actor.remote(make, [specs[i] for i in share], device))
            for ref in [a.ready.remote() for a in self.actors]:
                self._get(ref)
        except BaseException:
            self.close()
            raise

    def _get(self, ref: Any) -> Any:
        from ray.exceptions import RayError, RayTaskError

        try:
            status, value = self.ray.get(ref)
        except RayTaskError as err:  # raised outside `_answer`: its arguments did not unpickle
            raise RuntimeError(f"a VectorEnv Ray actor failed:\n{err}") from None
        except RayError as err:  # the actor died (killed, out of memory, its node lost)
            raise RuntimeError(f"a VectorEnv Ray actor died:\n{err}") from None
        if status == "error":
            raise RuntimeError(f"a VectorEnv Ray actor failed:\n{value}")
        return value

    def _gather(self, refs: list[Any]) -> list[Any]:
        """Every share's answer, in order (the calls were all made before the first wait)."""
        return [x for ref in refs for x in self._get(ref)]

    def observe(self) -> list[Observation]:
        return self._gather([a.observe.remote() for a in self.actors])

    def act(
        self, actions: Sequence[FactoredAction], reasons: Sequence[str], next_specs: Sequence[Any]
    ) -> list[Outcome]:
        return self._gather(
            [
                a.act.remote(*_split(s, actions, reasons, next_specs))
                for a, s in zip(self.actors, self.shares, strict=True)
            ]
        )

    def close(self) -> None:
        for actor in self.actors:
            with suppress(Exception):
                self.ray.kill(actor)
        self.actors = []
        if self._started:
            self._started = False
            self.ray.shutdown()


# ---------------------------------------------------------------------------------------------
# The vector
# ---------------------------------------------------------------------------------------------


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class VectorEnv(Generic[Spec]):
    """K episodes in lockstep. Call `observe()`, then `act(actions)`, once a tick."""

    def __init__(
        self,
        make: Callable[[Spec], Episode],
        k: int,
        specs: Iterable[Spec],
        *,
        device: str | torch.device = "cpu",
        backend: Backend = "auto",
        workers: int | None = None,
        overlap: bool = True,
        ray_address: str | None = None,
    ) -> None:
        """`specs` is consumed lazily: the first k build the episodes, the next ones replace
        episodes as they finish. `device` is the episodes' (it picks the backend and the
        streams). `backend="auto"`: processes on CPU with two or more cores and episodes,
        in-process otherwise; "ray" is only ever chosen by name. `workers`: processes or Ray
        actors (default: the usable cores; never more than k). `overlap`: on CUDA, in-process,
        launch every episode on its own stream before reading any back (module docstring); no
        effect on CPU, with processes or with actors. `ray_address`: with backend "ray", the
        cluster to join (default: the Ray this process has initialised, else a local instance)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        if ray_address is not None and backend != "ray":
            raise ValueError("a Ray address needs backend='ray'")
        self.k, self.device = k, torch.device(device)
        self._spec_iter = iter(specs)
        self.specs: list[Spec] = self._draw(k)
        """The spec of each position's current episode."""
        workers = workers or _default_workers()
        if backend == "auto":
            cpu = self.device.type == "cpu"
            backend = "processes" if cpu and min(k, workers) > 1 else "inprocess"
        self._envs: _Episodes | _Processes | _RayActors
        if backend == "inprocess":
            self._envs = _Episodes(make, self.specs, self.device, overlap)
        elif backend == "processes":
            self._envs = _Processes(make, self.specs, self.device, workers)
        else:
            self._envs = _RayActors(make, self.specs, self.device, workers, ray_address)
        self.backend: str = backend
        self.overlap = isinstance(self._envs, _Episodes) and self._envs.two_phase
        """Whether episodes overlap on the device (CUDA, in-process, `overlap=True`)."""
        self._obs: list[Observation] | None = None

    def _draw(self, n: int) -> list[Spec]:
        specs = list(islice(self._spec_iter, n))
        if len(specs) < n:
            raise ValueError(
                "specs ran out: pass an endless stream of specs to run past the first "
                "episode of every position"
            )
        return specs

    def observe(self) -> list[Observation]:
        """The first half of this tick for every episode; their K observations."""
        if self._obs is not None:
            raise RuntimeError("observe twice in one tick: call act(actions) first")
        self._obs = self._envs.observe()
        return list(self._obs)

    def act(
        self, actions: Sequence[FactoredAction], reasons: Sequence[str] | None = None
    ) -> StepResult[Spec]:
        """Finish the tick of every episode with its action (`reasons`: the policy's, for the
        record); episodes that end are replaced."""
        if self._obs is None:
            raise RuntimeError("act before observe")
        if len(actions) != self.k:
            raise ValueError(f"expected {self.k} actions, got {len(actions)}")
        reasons = list(reasons) if reasons is not None else [""] * self.k
        ending = [o.tick + 1 == o.max_ticks for o in self._obs]
        fresh = iter(self._draw(sum(ending)))  # drawn in position order: the same for any backend
        next_specs = [next(fresh) if end else None for end in ending]
        outcomes = self._envs.act(list(actions), reasons, next_specs)
        self._obs = None
        specs = tuple(self.specs)
        for i, outcome in enumerate(outcomes):
            assert outcome.done == ending[i]
            if outcome.done:
                self.specs[i] = next_specs[i]
        rewards = torch.tensor([o.reward.total for o in outcomes], dtype=torch.float64)
        return StepResult(rewards, torch.tensor(ending), tuple(outcomes), specs)

    def close(self) -> None:
        self._envs.close()

    def __enter__(self) -> VectorEnv[Spec]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# A paired counterfactual baseline: each episode beside its host-alone twin
# ---------------------------------------------------------------------------------------------


class PairedVectorEnv(Generic[Spec]):
    """K episodes and their K twins in lockstep; the rewards are each episode's minus its twin's.

    A twin is built from the same spec (the same seed, host, data order and initial weights)
    and takes `twin_action` every tick (WAIT by default: the host alone, the `none` policy), so
    until the episode's first action the two are the same run, and afterwards their reward
    difference is what the actions did: what the seed and the host decide (most of an
    episode's return, and most of its variance across episodes) cancels. The twins' rewards do
    not depend on the policy's actions, so subtracting them leaves the policy gradient
    unbiased (a baseline that is a function of the episode's exogenous randomness only). It
    doubles the environment work (the twins train the host too).

    `main` and `twin` must draw the same spec stream (two iterators of the same seeded
    generator, e.g. `train_policy.episode_specs` twice); `act` checks that they stay aligned.
    The interface is `VectorEnv`'s."""

    def __init__(
        self,
        main: VectorEnv[Spec],
        twin: VectorEnv[Spec],
        twin_action: FactoredAction | None = None,
    ) -> None:
        if main.k != twin.k or main.specs != twin.specs:
            raise ValueError("the twins must hold the same K specs as the main episodes")
        self.main, self.twin = main, twin
        self.twin_action = twin_action or FactoredAction()
        self.k, self.device, self.backend = main.k, main.device, main.backend
        self._twin_observed = False

    @property
    def specs(self) -> list[Spec]:
        return self.main.specs

    def observe(self) -> list[Observation]:
        self.twin.observe()
        self._twin_observed = True
        return self.main.observe()

    def act(
        self, actions: Sequence[FactoredAction], reasons: Sequence[str] | None = None
    ) -> StepResult[Spec]:
        if not self._twin_observed:
            raise RuntimeError("act before observe")
        mine = self.main.act(actions, reasons)
        twins = self.twin.act([self.twin_action] * self.k, ["twin"] * self.k)
        self._twin_observed = False
        if mine.specs != twins.specs or not torch.equal(mine.dones, twins.dones):
            raise RuntimeError("an episode and its twin drifted apart (different spec streams?)")
        return replace(mine, rewards=mine.rewards - twins.rewards, baseline=twins.rewards)

    def close(self) -> None:
        self.main.close()
        self.twin.close()

    def __enter__(self) -> PairedVectorEnv[Spec]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
