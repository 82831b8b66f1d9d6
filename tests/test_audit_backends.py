"""Audit execution backends: Ray gives the local process pool's values, φ and retry semantics;
backend names are checked; a missing Ray says how to install it. One local Ray instance of 2 CPUs
serves the whole module (starting one takes seconds)."""

from __future__ import annotations

import math
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esper.audits.backends import GPU_FRACTION, job_resources
from esper.audits.retrain import Audit, AuditProtocol
from esper.cli import app
from esper.contracts.errors import BackendUnavailable
from esper.tolaria.remote import RAY_MISSING
from test_audit import REAL_PROTOCOL, REAL_SEEDS, A, B, C, fake_value

# One xdist worker runs this whole module (`make test` uses --dist loadgroup), so the module's one
# Ray instance serves every test in it instead of one instance per worker.
pytestmark = pytest.mark.xdist_group("ray")


class FailsFirst:
    """Fails the first `times` attempts on the full set. Attempts are counted as files, since
    each Ray task gets its own copy of this object."""

    def __init__(self, marks: Path, times: int) -> None:
        self.marks, self.times = marks, times

    def __call__(self, protocol, candidates, subset, repeat) -> float:
        if len(subset) == len(candidates):
            self.marks.mkdir(parents=True, exist_ok=True)
            (self.marks / uuid.uuid4().hex).touch()
            if len(list(self.marks.iterdir())) <= self.times:
                raise RuntimeError("out of memory (simulated)")
        return fake_value(protocol, candidates, subset, repeat)


def test_ray_gives_the_local_values_and_reports_progress(ray, tmp_path: Path) -> None:
    protocol = AuditProtocol(ticks=4, repeats=2)
    local = Audit(tmp_path / "local", value_fn=fake_value).run(protocol, [A, B, C], workers=1)
    seen: list[tuple[int, int]] = []
    remote = Audit(tmp_path / "ray", value_fn=fake_value).run(
        protocol, [A, B, C], backend="ray", workers=2, progress=lambda d, t: seen.append((d, t))
    )
    assert (remote.retrains, remote.cached, remote.failures) == (16, 0, ())
    assert remote.values == local.values and remote.phi == local.phi
    assert remote.interactions == local.interactions and remote.banzhaf == local.banzhaf
    assert seen == [(d, 16) for d in range(17)]  # the cached count first, then one per job
    assert ray.is_initialized()  # an instance the audit did not start is left running
    cached = Audit(tmp_path / "ray", value_fn=fake_value).run(protocol, [A, B, C], backend="ray")
    assert (cached.retrains, cached.cached, cached.phi) == (0, 16, local.phi)


def test_ray_retries_a_failing_job_then_reports_it(ray, tmp_path: Path) -> None:
    protocol = AuditProtocol(ticks=4)
    recovered = Audit(tmp_path / "a", value_fn=FailsFirst(tmp_path / "marks-a", 1)).run(
        protocol, [A, B], backend="ray", workers=2, retries=1
    )
    assert recovered.failures == () and recovered.retrains == 5
    assert recovered.phi[A.key] == pytest.approx(2.5)

    failed = Audit(tmp_path / "b", value_fn=FailsFirst(tmp_path / "marks-b", 10)).run(
        protocol, [A, B], backend="ray", workers=2, retries=2
    )
    (f,) = failed.failures
    assert (f.subset, f.repeat, f.attempts) == (tuple(sorted([A.key, B.key])), 0, 3)
    assert len(list((tmp_path / "marks-b").iterdir())) == 3
    assert f.error.startswith("RuntimeError: out of memory")  # the job's error, not Ray's wrapper
    assert failed.retrains == 6 and failed.repeats_used == () and math.isnan(failed.phi[A.key])


def test_real_two_seed_audit_through_ray_matches_local(ray, tmp_path: Path) -> None:
    protocol, seeds = REAL_PROTOCOL, REAL_SEEDS
    remote = Audit(tmp_path / "ray").run(protocol, seeds, backend="ray", workers=2)
    local = Audit(tmp_path / "local").run(protocol, seeds, workers=1)
    assert remote.failures == () == local.failures
    assert remote.values == local.values and remote.phi == local.phi  # bit for bit
    assert len(set(remote.values[0].values())) > 1


def test_unknown_backend_and_misplaced_address_are_refused(tmp_path: Path) -> None:
    audit = Audit(tmp_path / "audit", value_fn=fake_value)
    with pytest.raises(ValueError, match="unknown backend 'dask'; valid backends: local, ray"):
        audit.run(AuditProtocol(), [A], backend="dask")
    with pytest.raises(ValueError, match="needs backend='ray'"):
        audit.run(AuditProtocol(), [A], ray_address="auto")
    out = CliRunner().invoke(app, ["audit", str(tmp_path / "nowhere"), "--backend", "dask"])
    assert out.exit_code == 2 and "unknown backend 'dask'" in out.output


def test_missing_ray_says_how_to_install_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(BackendUnavailable) as info:
        Audit(tmp_path / "audit", value_fn=fake_value).run(AuditProtocol(), [A], backend="ray")
    assert (
        str(info.value)
        == RAY_MISSING
        == ("the ray backend needs the ray extra: pip install 'esper[ray]'")
    )
    assert not (tmp_path / "audit").exists()  # refused before any job ran


def test_job_resources_take_a_gpu_fraction_on_cuda() -> None:
    assert job_resources("cpu") == {"num_cpus": 1}
    assert job_resources("cuda:1") == {"num_cpus": 1, "num_gpus": GPU_FRACTION}
    assert job_resources("cuda", {"num_gpus": 0.5, "memory": 2**30}) == {
        "num_cpus": 1,
        "num_gpus": 0.5,
        "memory": 2**30,
    }
