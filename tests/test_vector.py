"""VectorEnv: K growth environments in lockstep, one policy call per tick, auto-reset, backends."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from _engine_helpers import digits
from esper.contracts import FactoredAction, LifecycleConfig, Observation, Op
from esper.kasmina import CNNHost, slots_of
from esper.tamiyo.masks import illegal_reason
from esper.tamiyo.policies import RandomPolicy
from esper.tolaria.data import load_task
from esper.tolaria.environment import EnvConfig, GrowthEnv
from esper.tolaria.vector import EnvSpec, StepResult, VectorEnv, sample_specs, spec_stream

K = 3
SPEC_SEED = 8  # its first three specs have widths 3, 4, 2 (checked below)
ENV_CFG = EnvConfig(batches_per_tick=2, eval_samples=128)
Policy = Callable[[Sequence[Observation]], list[FactoredAction]]


def cnn_host(spec: EnvSpec) -> CNNHost:
    """Module level: worker processes unpickle it by name."""
    return CNNHost(spec.width, 2, 1, 10, 8)


def make_venv(backend: str = "inprocess", episode_ticks: int = 3) -> VectorEnv:
    return VectorEnv(
        digits(),
        K,
        spec_stream(seed=SPEC_SEED),
        env_cfg=ENV_CFG,
        episode_ticks=episode_ticks,
        build_host=cnn_host,
        validator=illegal_reason,
        backend=backend,
        workers=2,
    )


def random_policy(k: int = K) -> Policy:
    policies = [RandomPolicy(i) for i in range(k)]
    return lambda obs: [p.act(o).action for p, o in zip(policies, obs, strict=True)]


def rollout(
    venv: VectorEnv, policy: Policy, ticks: int
) -> tuple[list[list[Observation]], list[StepResult]]:
    observations, results = [], []
    with venv:
        for _ in range(ticks):
            obs = venv.step_train()
            observations.append(obs)
            results.append(venv.act(policy(obs)))
    return observations, results


def test_lockstep_ticks_one_policy_call_and_auto_reset() -> None:
    calls: list[int] = []
    inner = random_policy()

    def policy(obs: Sequence[Observation]) -> list[FactoredAction]:
        calls.append(len(obs))
        return inner(obs)

    venv = make_venv(episode_ticks=3)
    first_specs = list(venv.specs)
    observations, results = rollout(venv, policy, ticks=4)
    assert calls == [K] * 4  # once per tick, with every environment's observation
    assert [[o.tick for o in obs] for obs in observations] == [[0] * K, [1] * K, [2] * K, [0] * K]
    assert [r.dones.tolist() for r in results] == [[False] * K] * 2 + [[True] * K, [False] * K]
    assert all(r.rewards.shape == (K,) and r.rewards.dtype == torch.float64 for r in results)
    # done: the info carries the finished episode's spec and final metric; then a fresh host
    stream = spec_stream(seed=SPEC_SEED)
    expected = [next(stream) for _ in range(2 * K)]
    assert first_specs == expected[:K] and venv.specs == expected[K:]
    for i in range(K):
        assert results[2].infos[i].spec == first_specs[i]
        assert results[2].infos[i].metric == observations[2][i].metric
        assert results[3].infos[i].spec == venv.specs[i]
        assert len(observations[3][i].history) == 1  # the new episode's first evaluation
        assert observations[3][i].seed_params == 0


def test_specs_differ_per_environment() -> None:
    specs = sample_specs(K, seed=SPEC_SEED)
    assert [s.width for s in specs] == [3, 4, 2]
    assert len({s.host_seed for s in specs}) == K and len({s.data_seed for s in specs}) == K
    assert sample_specs(K, seed=SPEC_SEED) == specs  # reproducible
    obs = make_venv().step_train()
    params = [o.host_params for o in obs]
    assert params == [sum(p.numel() for p in cnn_host(s).parameters()) for s in specs]
    assert len(set(params)) == K


def test_lifecycle_config_reaches_every_slot() -> None:
    lifecycle = LifecycleConfig(embargo_ticks=7, reset_ticks=2)
    venv = VectorEnv(
        digits(),
        K,
        spec_stream(seed=SPEC_SEED),
        env_cfg=ENV_CFG,
        lifecycle_cfg=lifecycle,
        episode_ticks=2,
        build_host=cnn_host,
        validator=illegal_reason,
        backend="inprocess",
    )
    for runner in venv._envs.runners:
        assert all(s.lifecycle.config == lifecycle for s in slots_of(runner.env.model).values())


def test_illegal_actions_run_as_wait_and_are_reported() -> None:
    # FOSSILIZE on a DORMANT slot and a slot index out of range: both illegal at tick 0.
    illegal = [
        FactoredAction(op=Op.FOSSILIZE, slot=0),
        FactoredAction(op=Op.GERMINATE, slot=9),
        FactoredAction(op=Op.WAIT),
    ]
    _, bad = rollout(make_venv(), lambda obs: list(illegal), ticks=2)
    _, wait = rollout(make_venv(), lambda obs: [FactoredAction()] * K, ticks=2)
    reasons = [i.rejected for i in bad[0].infos]
    assert reasons[0] is not None and "FOSSILIZE" in reasons[0]
    assert reasons[1] is not None and "out of range" in reasons[1]
    assert reasons[2] is None
    assert all(i.ops == () for r in bad for i in r.infos)
    for b, w in zip(bad, wait, strict=True):
        assert torch.equal(b.rewards, w.rewards)


def test_reward_of_a_host_that_never_grows_is_its_metric() -> None:
    # Known answer: no seed, so no rent and no churn; R_task = accuracy (the `level` reward).
    observations, results = rollout(
        make_venv(episode_ticks=5), lambda obs: [FactoredAction()] * K, ticks=3
    )
    for i in range(K):
        expected = [obs[i].metric for obs in observations]
        assert [r.rewards[i].item() for r in results] == pytest.approx(expected, abs=1e-12)


def test_two_instances_replay_identically() -> None:
    obs_a, res_a = rollout(make_venv(), random_policy(), ticks=4)
    obs_b, res_b = rollout(make_venv(), random_policy(), ticks=4)
    assert obs_a == obs_b
    assert all(torch.equal(a.rewards, b.rewards) for a, b in zip(res_a, res_b, strict=True))
    assert [a.infos for a in res_a] == [b.infos for b in res_b]
    assert any(i.ops for r in res_a for i in r.infos), "the random policy should have grown"


def test_process_backend_matches_in_process() -> None:
    # Each env owns its RNG stream and data order, so which process runs it does not matter.
    obs_a, res_a = rollout(make_venv("inprocess"), random_policy(), ticks=4)
    venv = make_venv("processes")
    assert venv.backend == "processes"
    obs_b, res_b = rollout(venv, random_policy(), ticks=4)
    assert obs_a == obs_b
    assert all(torch.equal(a.rewards, b.rewards) for a, b in zip(res_a, res_b, strict=True))
    assert [a.infos for a in res_a] == [b.infos for b in res_b]


def test_tick_order_is_enforced() -> None:
    venv = make_venv()
    with pytest.raises(RuntimeError, match="before step_train"):
        venv.act([FactoredAction()] * K)
    venv.step_train()
    with pytest.raises(RuntimeError, match="twice"):
        venv.step_train()
    with pytest.raises(ValueError, match="expected 3 actions"):
        venv.act([FactoredAction()])


def test_overlap_is_cuda_only() -> None:
    assert make_venv().overlap is False  # CPU: nothing to overlap, the one-phase path runs
    assert make_venv()._envs.two_phase is False


def test_two_phase_tick_equals_one_phase_bit_for_bit() -> None:
    # The CUDA overlap path (launch all, read back once, finish in order) run on the CPU without
    # streams: the split train/evaluate must change no result.
    obs_a, res_a = rollout(make_venv(), random_policy(), ticks=4)
    venv = make_venv()
    venv._envs.two_phase = True
    obs_b, res_b = rollout(venv, random_policy(), ticks=4)
    assert obs_a == obs_b
    assert all(torch.equal(a.rewards, b.rewards) for a, b in zip(res_a, res_b, strict=True))
    assert [a.infos for a in res_a] == [b.infos for b in res_b]
    assert any(i.ops for r in res_a for i in r.infos), "the random policy should have grown"


def test_split_train_and_evaluate_equal_the_fused_calls() -> None:
    spec = sample_specs(1, seed=SPEC_SEED)[0]

    def env() -> GrowthEnv:
        torch.manual_seed(spec.host_seed)
        return GrowthEnv(
            cnn_host(spec), digits(), ENV_CFG, device=torch.device("cpu"), seed=spec.data_seed
        )

    a, b = env(), env()
    assert a.train_tick() == b.finish_train(b.train_tick_async())
    assert a.evaluate() == b.finish_evaluate(b.evaluate_async())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_overlap_matches_serial() -> None:
    # Each env runs the same kernels on the same data either way, on its own stream or not, so
    # the results are expected to be identical; the tolerance (1e-6) only allows for a kernel
    # that is nondeterministic across runs (cuDNN is pinned to deterministic algorithms here).
    task = load_task("digits", seed=0, device="cuda")

    def run(overlap: bool) -> tuple[list[list[Observation]], list[StepResult]]:
        venv = VectorEnv(
            task,
            4,
            spec_stream(seed=SPEC_SEED),
            env_cfg=ENV_CFG,
            episode_ticks=3,
            device="cuda",
            build_host=cnn_host,
            validator=illegal_reason,
            backend="inprocess",
            overlap=overlap,
        )
        assert venv.overlap is overlap
        return rollout(venv, random_policy(4), ticks=5)

    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        obs_a, res_a = run(overlap=False)
        obs_b, res_b = run(overlap=True)
    for a, b in zip(res_a, res_b, strict=True):
        assert torch.allclose(a.rewards, b.rewards, rtol=0.0, atol=1e-6)
        assert torch.equal(a.dones, b.dones)
        assert [i.ops for i in a.infos] == [i.ops for i in b.infos]
        assert [i.metric for i in a.infos] == pytest.approx([i.metric for i in b.infos], abs=1e-6)
    for xs, ys in zip(obs_a, obs_b, strict=True):
        for x, y in zip(xs, ys, strict=True):
            assert (x.metric, x.val_loss, x.train_loss) == pytest.approx(
                (y.metric, y.val_loss, y.train_loss), abs=1e-6
            )
            assert [s.stage for s in x.slots] == [s.stage for s in y.slots]
            assert [s.gate_passed for s in x.slots] == [s.gate_passed for s in y.slots]
    assert any(i.ops for r in res_a for i in r.infos), "the random policy should have grown"
