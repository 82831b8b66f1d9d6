"""A curriculum of environments: families of tasks and hosts drawn per training episode, hosts of
different slot counts read in one padded batch, and the padding invisible to the policy."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from _engine_helpers import FAST_HEURISTIC
from esper.config import GrowConfig, HostConfig, config_from_dict, load_config, override
from esper.contracts import HEADS, TAMIYO_OPS, Observation, Op
from esper.contracts.errors import ConfigError
from esper.curriculum import Family
from esper.evaluate import FIRST_HELD_OUT
from esper.recorder import RunStore
from esper.run import build_episode, load_policy
from esper.tamiyo.features import SLOT_DIM
from esper.tamiyo.imitation import ImitationConfig
from esper.tamiyo.learned import LearnedPolicy
from esper.tamiyo.masks import action_masks
from esper.tamiyo.network import HEAD_INDEX
from esper.tamiyo.ppo import RolloutBuffer
from esper.tolaria.environment import EnvConfig
from esper.train_policy import TrainPolicyConfig, episode_specs, train_policy

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "curriculum.toml"
CHEAP = EnvConfig(batches_per_tick=2, eval_samples=256)


def _observations(cfg: GrowConfig, ticks: int) -> list[Observation]:
    """The observations of `ticks` heuristic ticks of `cfg`'s episode (slots in several stages)."""
    episode, teacher = build_episode(cfg), load_policy(cfg)
    seen = []
    for _ in range(ticks):
        obs = episode.observe()
        episode.act(teacher.act(obs).action, "test")
        seen.append(obs)
    return seen


@pytest.fixture(scope="module")
def hosts() -> tuple[list[Observation], list[Observation]]:
    """Observations of a 3-slot digits CNN and a 5-slot MLP on a vector task."""
    common = dict(device="cpu", env=CHEAP, heuristic=FAST_HEURISTIC)
    cnn = GrowConfig(ticks=6, host=HostConfig(kind="cnn", depth=3), **common)  # type: ignore[arg-type]
    mlp = GrowConfig(
        task="synthetic-easy", ticks=6, host=HostConfig(kind="mlp", width=8, depth=5), **common
    )  # type: ignore[arg-type]
    return _observations(cnn, 6), _observations(mlp, 6)


# ---------------------------------------------------------------------------------------------
# Padding: a small host inside a batch with a larger one reads as it does alone
# ---------------------------------------------------------------------------------------------


def _candidates(obs: Observation) -> list[tuple[list[int], dict[str, list[bool]]]]:
    """Every legal (op, slot) of `obs` (knobs at their first legal value), with its masks."""
    out = []
    for op in TAMIYO_OPS:
        if not action_masks(obs)["op"][TAMIYO_OPS.index(op)]:
            continue
        slot_mask = action_masks(obs, op)["slot"]
        for slot in [i for i, ok in enumerate(slot_mask) if ok][:3] if op is not Op.WAIT else [0]:
            masks = action_masks(obs, op, None if op is Op.WAIT else slot)
            masks["slot"] = slot_mask
            action = [masks[h].index(True) for h in HEADS]
            action[HEAD_INDEX["op"]], action[HEAD_INDEX["slot"]] = TAMIYO_OPS.index(op), slot
            out.append((action, masks))
    return out


def _evaluate(
    policy: LearnedPolicy, rows: list[tuple[Observation, list[int], dict[str, list[bool]]]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, s, valid = policy.batch([o for o, _, _ in rows])
    width = s.shape[1]
    masks = {
        h: torch.tensor([m[h] + [False] * (width - len(m[h])) * (h == "slot") for *_, m in rows])
        for h in HEADS
    }
    actions = torch.tensor([a for _, a, _ in rows])
    with torch.no_grad():
        out = policy.net.evaluate(g, s, actions, masks, valid)
    return out.logprob, out.value, out.entropy


def test_padded_rows_give_the_log_probs_and_values_they_give_alone(
    hosts: tuple[list[Observation], list[Observation]],
) -> None:
    small, large = hosts
    policy = LearnedPolicy(hidden=32, seed=3)
    policy.batch(small + large, update=True)  # normalisers that see both hosts
    checked = 0
    for obs, big in zip(small, large, strict=True):
        assert len(obs.slots) == 3 and len(big.slots) == 5
        for action, masks in _candidates(obs):
            alone = _evaluate(policy, [(obs, action, masks)])
            big_action, big_masks = _candidates(big)[0]
            padded = _evaluate(policy, [(obs, action, masks), (big, big_action, big_masks)])
            for a, p in zip(alone, padded, strict=True):
                torch.testing.assert_close(p[0], a[0], rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked > 20
    # Acting (the most probable choices, so both condition on the same op and slot): the same
    # distributions, with probability exactly 0 on the padding.
    policy.deterministic = True
    alone = policy.step(small[:1]).out
    both = policy.step([small[0], large[0]]).out
    for h in HEADS:
        n = alone.probs[h].shape[1]
        torch.testing.assert_close(both.probs[h][0, :n], alone.probs[h][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both.value[0], alone.value[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(both.actions[0], alone.actions[0])
    assert bool((both.probs["slot"][0, 3:] == 0).all())


def test_padded_slots_are_never_picked_nor_shown(
    hosts: tuple[list[Observation], list[Observation]],
) -> None:
    small, large = hosts
    policy = LearnedPolicy(hidden=32, seed=0)
    policy.net.slot_head[-1].bias.data.fill_(0.0)
    batch = [small[0], large[0]] * 16  # dormant hosts: GERMINATE on any slot is legal
    for _ in range(5):
        step = policy.step(batch)
        assert bool((step.out.probs["slot"][0::2, 3:] == 0).all())
        assert int(step.out.actions[0::2, HEAD_INDEX["slot"]].max()) < 3
        assert not step.s[0::2, 3:].any()  # padded features stay zero after normalisation
        for d, o in zip(step.decisions, batch, strict=True):  # a decision shows its own slots
            assert len(d.mask["slot"]) == len(d.probs["slot"]) == len(o.slots)


def test_normalisers_ignore_the_padding(
    hosts: tuple[list[Observation], list[Observation]],
) -> None:
    small, large = hosts
    padded, separate = LearnedPolicy(hidden=8), LearnedPolicy(hidden=8)
    padded.batch([small[0], large[0]], update=True)
    separate.batch([small[0]], update=True)
    separate.batch([large[0]], update=True)
    assert int(padded.slot_norm.count) == 3 + 5
    torch.testing.assert_close(padded.slot_norm.mean, separate.slot_norm.mean)
    torch.testing.assert_close(padded.slot_norm.var, separate.slot_norm.var)


def test_the_rollout_buffer_widens_to_the_largest_host(
    hosts: tuple[list[Observation], list[Observation]],
) -> None:
    small, large = hosts
    policy = LearnedPolicy(hidden=8)
    buf = RolloutBuffer(2, 2, num_slots=3)
    first = policy.step([small[0], small[1]])
    buf.add(0, first.g, first.s, first.out, torch.zeros(2))
    second = policy.step([small[2], large[2]])
    buf.add(1, second.g, second.s, second.out, torch.zeros(2))
    b = buf.flat()
    assert b.s.shape == (4, 5, SLOT_DIM) and b.masks["slot"].shape == (4, 5)
    assert b.valid.sum(1).tolist() == [3, 3, 3, 5]
    assert torch.equal(b.s[0, :3], first.s[0]) and not b.s[:3, 3:].any()
    assert not b.masks["slot"][:3, 3:].any()
    # The stored rows give back the log-probs and values they were sampled with.
    new = policy.net.evaluate(b.g, b.s, b.actions, b.masks, b.valid)
    torch.testing.assert_close(new.logprob, b.logprobs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new.value, b.values, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Config: a [[curriculum]] array of tables, strictly checked
# ---------------------------------------------------------------------------------------------


def test_the_example_curriculum_loads_and_holds_wine_out() -> None:
    cfg = load_config(EXAMPLE, TrainPolicyConfig)
    tasks = {f.task for f in cfg.curriculum}
    assert tasks == {"digits", "breast_cancer", "synthetic-easy", "synthetic-hard", "text"}
    assert "wine" not in tasks and "wine" in EXAMPLE.read_text()  # held out, named
    digits = cfg.curriculum[0]
    assert digits.widths == (2, 3, 4) and digits.depths == (2, 3, 4) and digits.weight == 2.0
    text = next(f for f in cfg.curriculum if f.task == "text")
    assert text.env is not None and text.env.batches_per_tick == 8 and text.ticks == 20
    assert override(cfg, seed=3).curriculum == cfg.curriculum  # as the CLI applies its flags


def test_every_family_of_the_example_builds_and_ticks() -> None:
    cfg = load_config(EXAMPLE, TrainPolicyConfig)
    rng = random.Random(0)
    for family in cfg.curriculum:
        widths, depths = (
            family.widths or (family.host.width,),
            family.depths or (family.host.depth,),
        )
        spec = family.episode(replace(cfg.episode, device="cpu"), 0, rng)
        spec = replace(spec, host=replace(spec.host, width=max(widths), depth=max(depths)))
        spec = replace(spec, env=replace(spec.env, batches_per_tick=1, eval_samples=128))
        episode = build_episode(spec)
        obs = episode.observe()
        assert len(obs.slots) == max(depths) * (2 if family.task == "text" else 1)
        episode.act(load_policy(spec).act(obs).action, "test")


def test_vector_tasks_are_standardised_and_get_an_mlp() -> None:
    from esper.run import build_host
    from esper.tolaria.data import VECTOR_TASKS, load_task

    for name in VECTOR_TASKS:
        task = load_task(name, seed=0)
        assert task.metric == "accuracy" and task.train_x.dim() == 2
        assert task.input_shape == (task.train_x.shape[1],)
        torch.testing.assert_close(
            task.train_x.mean(0), torch.zeros(task.input_shape), atol=1e-5, rtol=0
        )
        assert set(task.val_y.tolist()) == set(range(task.num_outputs))  # stratified
        host = build_host(GrowConfig(task=name), task)  # host kind auto
        assert type(host).__name__ == "MLPHost"
    assert not torch.equal(load_task("wine", seed=1).val_y, load_task("wine", seed=0).val_y)
    easy, hard = load_task("synthetic-easy"), load_task("synthetic-hard")
    assert easy.num_outputs == 4 and hard.num_outputs == 6
    assert torch.equal(easy.train_x, load_task("synthetic-easy").train_x)  # a fixed draw


@pytest.mark.parametrize(
    ("family", "message"),
    [
        ({"name": "a", "colour": "red"}, "unknown config key 'curriculum[0].colour'"),
        ({"name": "a", "weight": 0}, "curriculum family 'a': weight must be > 0"),
        ({"name": "a", "task": "mnist"}, "curriculum family 'a': unknown task 'mnist'"),
        ({"task": "digits"}, "every curriculum family needs a name"),
        ({"name": "a", "task": "wine", "host": {"kind": "cnn"}}, "cannot run task 'wine'"),
        ({"name": "a", "depths": [0]}, "curriculum family 'a': depths must be >= 1"),
        ({"name": "a", "host": {"width": 0}}, "host.width"),
    ],
)
def test_bad_families_are_refused_by_name(family: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict({"curriculum": [family]}, TrainPolicyConfig)


def test_family_names_are_unique() -> None:
    with pytest.raises(ConfigError, match="repeated: \\['a'\\]"):
        config_from_dict({"curriculum": [{"name": "a"}, {"name": "a"}]}, TrainPolicyConfig)


# ---------------------------------------------------------------------------------------------
# Drawing episodes
# ---------------------------------------------------------------------------------------------


def _take(cfg: TrainPolicyConfig, n: int) -> list[GrowConfig]:
    specs = episode_specs(cfg)
    return [next(specs) for _ in range(n)]


def test_families_are_drawn_in_proportion_to_their_weights_reproducibly() -> None:
    cnn = Family(name="cnn", weight=3.0, widths=(2, 4), depths=(2, 3))
    mlp = Family(name="mlp", task="iris", host=HostConfig(kind="mlp", width=8), ticks=7)
    cfg = TrainPolicyConfig(episode=GrowConfig(ticks=5), curriculum=(cnn, mlp), seed=11)
    specs = _take(cfg, 4000)
    share = Counter(s.task for s in specs)["digits"] / len(specs)
    assert abs(share - 0.75) < 0.03  # 3 : 1 (binomial sd 0.007)
    assert specs == _take(cfg, 4000)  # the stream is a function of the seed
    assert specs[:50] != _take(replace(cfg, seed=12), 50)
    for s in specs:
        assert 0 <= s.seed < FIRST_HELD_OUT
        if s.task == "digits":
            assert s.host.width in (2, 4) and s.host.depth in (2, 3) and s.ticks == 5
        else:
            assert (s.host.kind, s.host.width, s.host.depth, s.ticks) == ("mlp", 8, 3, 7)
    assert {(s.host.width, s.host.depth) for s in specs if s.task == "digits"} == {
        (w, d) for w in (2, 4) for d in (2, 3)
    }


def test_without_a_curriculum_the_stream_is_unchanged() -> None:
    cfg = TrainPolicyConfig(seed=5)
    rng = random.Random(5)  # the stream before curricula: a seed, then a width, per episode
    want = []
    for _ in range(200):
        seed, width = rng.randrange(FIRST_HELD_OUT), rng.choice(cfg.widths)
        want.append(replace(cfg.episode, seed=seed, host=replace(cfg.episode.host, width=width)))
    assert _take(cfg, 200) == want


# ---------------------------------------------------------------------------------------------
# Training on a curriculum
# ---------------------------------------------------------------------------------------------


def test_smoke_training_on_two_families(tmp_path: Path) -> None:
    """Two updates over a digits CNN (3 slots) and an MLP on a vector task (2 slots), after a
    warm start whose demonstrations mix both."""
    families = (
        Family(name="cnn", host=HostConfig(kind="cnn", depth=3)),
        Family(name="mlp", task="breast_cancer", host=HostConfig(kind="mlp", width=8, depth=2)),
    )
    cfg = TrainPolicyConfig(
        episode=GrowConfig(ticks=3, device="cpu", env=CHEAP),
        curriculum=families,
        num_envs=2,
        num_steps=3,
        updates=2,
        eval_every=0,
        out=str(tmp_path),
        backend="inprocess",
        seed=1,
        imitation=ImitationConfig(episodes=2, epochs=2),
    )
    logs: list[dict] = []
    path = train_policy(cfg, log=lambda u, info: logs.append(info))
    assert [info["update"] for info in logs] == [0, 1, 2]
    LearnedPolicy.load(path)
    with RunStore.open(tmp_path / "run") as store:
        episodes = store.events(kind="episode")
        decisions = store.decisions()
    assert len(episodes) == 2 * 2  # two 3-tick episodes per env in two 3-tick rollouts
    assert {e.payload["task"] for e in episodes} == {"digits", "breast_cancer"}
    assert {e.payload["host"]["depth"] for e in episodes} == {2, 3}
    assert len(decisions) == 2 * 3 * 2
    for d in decisions:  # each env's record shows its own host's slots, never the padding
        assert len(d.mask["slot"]) == len(d.probs["slot"]) == len(d.slot_states)
    assert {len(d.slot_states) for d in decisions} == {2, 3}
