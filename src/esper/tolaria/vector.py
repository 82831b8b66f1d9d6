"""K growth environments stepped in lockstep: one policy call per control tick for all of them.

Inverted control flow (paper §4.1): the engine drives every environment through the first half of
the tick and hands the caller K observations at once, so a learned policy runs one batched forward
per tick instead of K; the caller hands back K actions and the engine finishes the tick.

    obs = venv.step_train()          # each env: train tick → evaluate (fused α=0 ablations)
                                     #           → gates → observe                 K observations
    result = venv.act(policy(obs))   # each env: validate (illegal → WAIT) → execute → clock
                                     #           → Economy prices the tick          rewards (K,)

This is `GrowthRun.step` without the governor and the flight recorder. Each environment owns its
host, optimizer, data order, Economy and its own torch RNG stream (seeded by its spec's host seed,
swapped in whenever it runs), so its trajectory does not depend on the other environments, the
order they run in, or the process that runs them. After `episode_ticks` ticks an environment
reports done=True and is replaced by a fresh one built from the next spec.

Backends. "inprocess" runs the K environments one after another in this process; "processes" splits
them over worker processes (spawned, one torch thread each) that step their shares in parallel.
On CPU the hosts are small and a tick is mostly Python and per-op dispatch, so worker processes
are the way to use several cores (numbers: bench/RESULTS.md, "Vectorised environments"). On CUDA
the environments run in-process, and K processes would each need their own CUDA context for
little gain. In-process on CPU, prefer torch.set_num_threads(1): these ops are too small to gain
from intra-op threads, and on a busy machine OpenMP threads waiting for a preempted sibling make a
tick many times slower.

Overlap on CUDA (`overlap=True`, the default). A tick of one environment reads two results back
from the device (the training loss, the evaluation's metrics), and each read makes the CPU wait
for that environment's queued kernels before it can launch the next environment's. So the
in-process backend splits the first half of the tick at those reads: it launches every
environment's training tick and evaluation (`GrowthEnv.train_tick_async`, `evaluate_async`),
each on its own CUDA stream (streams come from torch's pool, so past 32 environments some share
one), then copies all K results to the host in one transfer (one sync), then finishes the
environments in order (metrics, G2 gates, observation). The CPU launches environment i+1 while
the GPU still runs environment i, and independent environments may run concurrently on the GPU.
Every environment runs the same kernels on the same data as without overlap; only the order
between environments changes. On CPU (or with `overlap=False`) each environment trains,
evaluates and is observed before the next starts, exactly as before.
"""

from __future__ import annotations

import os
import random
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from itertools import islice, pairwise
from typing import Any, Literal

import torch
import torch.multiprocessing as mp
from torch import nn

from esper.contracts import FactoredAction, Lifecycle, LifecycleConfig, Observation, Op
from esper.kasmina import slots_of
from esper.simic.economy import Economy, EconomyConfig, RewardBreakdown
from esper.tolaria.data import TaskData
from esper.tolaria.environment import (
    EnvConfig,
    Evaluation,
    GrowthEnv,
    PendingEvaluation,
    PendingTrain,
)

Validator = Callable[[FactoredAction, Observation], str | None]
"""Why an action is illegal in an observation, or None: e.g. `esper.tamiyo.masks.illegal_reason`
(passed in, as the engine imports no policy code)."""
Backend = Literal["auto", "inprocess", "processes"]
Ops = tuple[tuple[str, Op], ...]
_Step = tuple[float, RewardBreakdown, Ops, bool]
"""One env's act: metric, reward, ops executed, done."""
_Launched = tuple[PendingTrain, PendingEvaluation]
"""One env's first half of a tick, queued on the device and not yet read back."""

# ---------------------------------------------------------------------------------------------
# Specs: what makes one environment differ from another
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvSpec:
    """One environment's draw: its host init, its data order and its host width."""

    host_seed: int
    """Seeds the environment's torch RNG stream: host init, then every seed it germinates."""
    data_seed: int
    """Seeds the order of its training batches."""
    width: int
    """Host width handed to `build_host` (CNN channels, MLP hidden units, ...)."""


def spec_stream(
    *, seed: int, widths: Sequence[int] = (2, 3, 4), seed_bound: int = 2**31
) -> Iterator[EnvSpec]:
    """An endless, reproducible stream of specs: width uniform over `widths`, both seeds uniform
    over [0, seed_bound)."""
    if not widths or min(widths) < 1 or seed_bound < 1:
        raise ValueError(
            f"widths must be non-empty and >= 1, seed_bound >= 1; got {widths}, {seed_bound}"
        )
    rng = random.Random(seed)
    while True:
        yield EnvSpec(rng.randrange(seed_bound), rng.randrange(seed_bound), rng.choice(widths))


def sample_specs(
    k: int, *, seed: int, widths: Sequence[int] = (2, 3, 4), seed_bound: int = 2**31
) -> list[EnvSpec]:
    """The first `k` specs of `spec_stream(seed=seed, ...)`."""
    return list(islice(spec_stream(seed=seed, widths=widths, seed_bound=seed_bound), k))


# ---------------------------------------------------------------------------------------------
# What one tick returns
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvInfo:
    """One environment's tick, after `act`."""

    tick: int
    """The tick within the episode that just ended (0-based)."""
    spec: EnvSpec
    """The spec of the episode this tick belongs to (not of the fresh env after a reset)."""
    metric: float
    """Validation metric this tick; when done, the episode's final metric."""
    reward: RewardBreakdown
    ops: Ops
    """(slot, op) pairs executed, as the economy charged them."""
    rejected: str | None
    """Why the policy's action was illegal (it ran as WAIT instead), or None."""


@dataclass(frozen=True)
class StepResult:
    rewards: torch.Tensor
    """(K,) float64 on the CPU: R_total of each environment's tick."""
    dones: torch.Tensor
    """(K,) bool: the environment finished its episode and was reset."""
    infos: tuple[EnvInfo, ...]


# ---------------------------------------------------------------------------------------------
# One environment: GrowthEnv + Economy + clock + RNG stream
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    """Everything shared by the K environments (sent once to each worker)."""

    task: TaskData
    env_cfg: EnvConfig
    economy_cfg: EconomyConfig
    lifecycle_cfg: LifecycleConfig | None
    episode_ticks: int
    device: torch.device
    build_host: Callable[[EnvSpec], nn.Module]


class _Runner:
    def __init__(self, spec: EnvSpec, setup: _Setup) -> None:
        self.spec, self.setup, self.t = spec, setup, 0
        self.rng = torch.Generator().manual_seed(spec.host_seed).get_state()
        with self.own_rng():
            model = setup.build_host(spec)
        if setup.lifecycle_cfg is not None:
            for slot in slots_of(model).values():  # fresh slots: DORMANT, never ticked
                slot.lifecycle = Lifecycle(slot.name, setup.lifecycle_cfg)
        self.env = GrowthEnv(
            model, setup.task, setup.env_cfg, device=setup.device, seed=spec.data_seed
        )
        econ = replace(setup.economy_cfg, higher_is_better=setup.task.higher_is_better)
        self.economy = Economy(econ)
        self.ev: Evaluation | None = None

    @contextmanager
    def own_rng(self) -> Iterator[None]:
        """Run with this environment's CPU RNG stream as torch's global one. Hosts and seeds are
        built on the CPU and training draws no random numbers, so that stream is the only one."""
        outer = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        try:
            yield
        finally:
            self.rng = torch.get_rng_state()
            torch.set_rng_state(outer)

    def train(self) -> Observation:
        return self.collect(self.launch())

    def launch(self) -> _Launched:
        """Queue this tick's training and evaluation; no host sync (see GrowthEnv)."""
        with self.own_rng():
            return self.env.train_tick_async(), self.env.evaluate_async()

    def collect(self, launched: _Launched) -> Observation:
        """Read the launched results back, record them, evaluate the gates, observe."""
        env, t = self.env, self.t
        train = env.finish_train(launched[0])
        self.ev = ev = env.finish_evaluate(launched[1])
        env.record_evaluation(ev, t)
        env.evaluate_gates()
        return env.observe(
            t,
            self.setup.episode_ticks,
            ev,
            train,
            self.economy.last_rents,
            self.economy.ledger.totals().rent,
        )

    def act(self, action: FactoredAction) -> _Step:
        """Execute an already validated action, tick the clock, price the tick."""
        env, t, ev = self.env, self.t, self.ev
        assert ev is not None, "act before train"
        with self.own_rng():  # germination initialises the seed's weights
            ops = env.execute(action)
        env.advance_clock(t)
        prev = env.history[-2] if len(env.history) > 1 else None
        r = self.economy.step(t, env.slot_economics(), ops, env.host_params(), prev, ev.metric)
        self.t, self.ev = t + 1, None
        return ev.metric, r, tuple(ops), self.t == self.setup.episode_ticks


def _to_host(launched: list[_Launched]) -> list[_Launched]:
    """`launched` with its device tensors replaced by host copies, all read in one transfer (one
    host sync). The values are unchanged: float32 results may come back widened to float64,
    which is exact, and `finish_*` turn them into Python floats either way."""
    parts = [t for train, ev in launched for t in (train.total, train.health, ev.means)]
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in parts]).cpu()
    chunks = iter(flat.split([t.numel() for t in parts]))
    return [
        (
            replace(
                train,
                total=next(chunks).view(train.total.shape),
                health=next(chunks).view(train.health.shape),
            ),
            replace(ev, means=next(chunks).view(ev.means.shape)),
        )
        for train, ev in launched
    ]


class _Envs:
    """Runners stepped one after another: the in-process backend, and each worker's share."""

    def __init__(self, specs: Sequence[EnvSpec], setup: _Setup, overlap: bool = False) -> None:
        self.setup = setup
        self.runners = [_Runner(s, setup) for s in specs]
        self.two_phase = overlap and setup.device.type == "cuda"
        """Launch every env, read back once, then finish each (see the module docstring). On
        CPU it is off: there is nothing to overlap. Tests switch it on there to check that it
        gives the one-phase results bit for bit."""
        # One CUDA stream per runner position (a reset runner keeps its position's stream).
        self._streams = [torch.cuda.Stream(setup.device) for _ in specs] if self.two_phase else []

    def train(self) -> list[Observation]:
        if not self.two_phase:
            return [r.train() for r in self.runners]
        if self.setup.device.type != "cuda":  # CPU (tests): the same phases, no streams
            launched = [r.launch() for r in self.runners]
        else:
            main = torch.cuda.current_stream(self.setup.device)
            launched = []
            for runner, stream in zip(self.runners, self._streams, strict=True):
                # The env's tensors (task data, parameters, optimizer state after `act`) were
                # last written on the main stream: its side stream starts after that work.
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    launched.append(runner.launch())
            for stream in self._streams:
                main.wait_stream(stream)  # the read-back (on main) waits for every env
        host = _to_host(launched)  # the one host sync of the tick
        # From here on the side streams are idle: tensors they used may be freed or reused.
        return [r.collect(x) for r, x in zip(self.runners, host, strict=True)]

    def act(
        self, actions: Sequence[FactoredAction], next_specs: Sequence[EnvSpec | None]
    ) -> list[_Step]:
        out = []
        for i, (runner, action, spec) in enumerate(
            zip(self.runners, actions, next_specs, strict=True)
        ):
            step = runner.act(action)
            if step[3]:
                assert spec is not None, "an environment finished without a next spec"
                self.runners[i] = _Runner(spec, self.setup)
            out.append(step)
        return out

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# The process backend: W workers, each owning a contiguous share of the K environments
# ---------------------------------------------------------------------------------------------


def _worker(conn: Any, specs: list[EnvSpec], setup: _Setup) -> None:
    torch.set_num_threads(1)  # one core per worker; tiny ops gain nothing from intra-op threads
    try:
        envs = _Envs(specs, setup)
        conn.send(("ok", None))
        while True:
            cmd, arg = conn.recv()
            if cmd == "close":
                return
            conn.send(("ok", envs.train() if cmd == "train" else envs.act(*arg)))
    except (EOFError, KeyboardInterrupt):
        return  # the parent went away
    except Exception:
        conn.send(("error", traceback.format_exc()))


class _Processes:
    def __init__(self, specs: Sequence[EnvSpec], setup: _Setup, workers: int) -> None:
        if setup.device.type != "cpu":
            raise ValueError("the processes backend is CPU-only; use backend='inprocess' on CUDA")
        k = len(specs)
        workers = max(1, min(workers, k))
        bounds = [k * w // workers for w in range(workers + 1)]
        self.shares = [range(a, b) for a, b in pairwise(bounds)]
        # spawn, not fork: a forked child inherits torch's OpenMP pool in an undefined state.
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for share in self.shares:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker, args=(child, [specs[i] for i in share], setup), daemon=True
            )
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

    def train(self) -> list[Observation]:
        return self._all([("train", None)] * len(self.conns))

    def act(
        self, actions: Sequence[FactoredAction], next_specs: Sequence[EnvSpec | None]
    ) -> list[_Step]:
        return self._all(
            [("act", ([actions[i] for i in s], [next_specs[i] for i in s])) for s in self.shares]
        )

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
# The vector
# ---------------------------------------------------------------------------------------------


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class VectorEnv:
    """K growth environments in lockstep. Call `step_train()`, then `act(actions)`, once a tick."""

    def __init__(
        self,
        task: TaskData,
        k: int,
        specs: Iterable[EnvSpec],
        *,
        env_cfg: EnvConfig | None = None,
        economy_cfg: EconomyConfig | None = None,
        lifecycle_cfg: LifecycleConfig | None = None,
        episode_ticks: int,
        device: str | torch.device = "cpu",
        build_host: Callable[[EnvSpec], nn.Module],
        validator: Validator,
        backend: Backend = "auto",
        workers: int | None = None,
        overlap: bool = True,
    ) -> None:
        """`specs` is consumed lazily: the first k build the environments, the next ones replace
        environments as they finish (pass `spec_stream(...)` for more than one episode).
        `build_host` runs under the env's RNG stream; with the processes backend it and `task`
        must pickle (a module-level function). `lifecycle_cfg`, when given, replaces the
        lifecycle config of every slot the host was built with. `backend="auto"`: processes on
        CPU with two or more cores and environments, in-process otherwise. `overlap`: on CUDA,
        in-process, launch every environment on its own stream before reading any back (module
        docstring); it has no effect on CPU or with the processes backend."""
        if k < 1 or episode_ticks < 1:
            raise ValueError(f"k and episode_ticks must be >= 1, got {k}, {episode_ticks}")
        self.k, self.validator = k, validator
        self.setup = _Setup(
            task,
            env_cfg or EnvConfig(),
            economy_cfg or EconomyConfig(),
            lifecycle_cfg,
            episode_ticks,
            torch.device(device),
            build_host,
        )
        self._spec_iter = iter(specs)
        self.specs = self._draw(k)
        """The spec of each environment's current episode."""
        self.ticks = [0] * k
        """Each environment's tick within its episode."""
        workers = workers or _default_workers()
        if backend == "auto":
            cpu = self.setup.device.type == "cpu"
            backend = "processes" if cpu and min(k, workers) > 1 else "inprocess"
        if backend == "inprocess":
            self._envs: _Envs | _Processes = _Envs(self.specs, self.setup, overlap)
        elif backend == "processes":
            self._envs = _Processes(self.specs, self.setup, workers)
        else:
            raise ValueError(f"unknown backend {backend!r}; valid: auto, inprocess, processes")
        self.backend: str = backend
        self.overlap = isinstance(self._envs, _Envs) and self._envs.two_phase
        """Whether environments overlap on the device (CUDA, in-process, `overlap=True`)."""
        self._obs: list[Observation] | None = None

    def _draw(self, n: int) -> list[EnvSpec]:
        specs = list(islice(self._spec_iter, n))
        if len(specs) < n:
            raise ValueError(
                "specs ran out: pass spec_stream(...) to run past the first "
                "episode of every environment"
            )
        return specs

    def step_train(self) -> list[Observation]:
        """Train and evaluate every environment for this tick; their K observations."""
        if self._obs is not None:
            raise RuntimeError("step_train twice in one tick: call act(actions) first")
        self._obs = self._envs.train()
        return list(self._obs)

    def act(self, actions: Sequence[FactoredAction]) -> StepResult:
        """Validate (illegal → WAIT, reason in info), execute, tick every clock once, price."""
        obs = self._obs
        if obs is None:
            raise RuntimeError("act before step_train")
        if len(actions) != self.k:
            raise ValueError(f"expected {self.k} actions, got {len(actions)}")
        rejected = [self.validator(a, o) for a, o in zip(actions, obs, strict=True)]
        run = [FactoredAction() if why else a for a, why in zip(actions, rejected, strict=True)]
        ending = [t + 1 == self.setup.episode_ticks for t in self.ticks]
        fresh = iter(self._draw(sum(ending)))  # drawn in env order: the same for every backend
        next_specs = [next(fresh) if end else None for end in ending]
        steps = self._envs.act(run, next_specs)
        self._obs = None
        infos = []
        for i, (metric, r, ops, done) in enumerate(steps):
            assert done == ending[i]
            infos.append(EnvInfo(self.ticks[i], self.specs[i], metric, r, ops, rejected[i]))
            if done:
                self.specs[i], self.ticks[i] = next_specs[i], 0
            else:
                self.ticks[i] += 1
        return StepResult(
            torch.tensor([r.total for _, r, _, _ in steps], dtype=torch.float64),
            torch.tensor(ending, dtype=torch.bool),
            tuple(infos),
        )

    def close(self) -> None:
        self._envs.close()

    def __enter__(self) -> VectorEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
