"""Studies: several kinds of run over held-out seeds, one table (paper §7, "reliability under a
fixed budget": median and the worse quartile over seeds at matched compute).

A study is a TOML file (`studies/section7-digits.toml`): a base `GrowConfig`, the seeds, and
rows. A row is a kind of run:

    kind = "grow"              the base config with the row's `set` overrides (an Esper setting)
    kind = "host"              the base host with no growth and no decay
    kind = "parameter-matched" the host widened to the final parameter count of row `of`'s run of
                               the same seed, trained from scratch (`baselines.parameter_matched`)
    kind = "from-scratch"      row `of`'s grown architecture with fresh weights, every seed there
                               from tick 0 (`baselines.from_scratch`)

Every run is recorded under OUT/runs/<row>-s<seed>; run again, a study reads the runs it
finished and resumes the ones it did not (change the study, change OUT). The runs go to one
process pool (or Ray), started once for the whole study and reused by every job; the rows that
depend on another row's run are submitted as soon as that run finishes.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import shutil
import statistics
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from esper.audits.backends import open_executor
from esper.baselines import finished, from_scratch, host_alone, parameter_matched
from esper.config import GrowConfig, config_from_dict, config_to_dict, override
from esper.contracts.errors import ConfigError
from esper.evaluate import FIRST_HELD_OUT
from esper.kasmina import module_cost
from esper.recorder import RunStore
from esper.run import GrowResult, build_host, resume_run, start_run, task_of

KINDS = ("grow", "host", "parameter-matched", "from-scratch")


@dataclass(frozen=True)
class Row:
    name: str
    kind: str = "grow"
    set: dict[str, Any] = field(default_factory=dict)
    """Dotted overrides of the base config (`economy.w_rent = 0.05`)."""
    of: str | None = None
    """The row whose runs a parameter-matched or from-scratch row matches."""
    notes: str = ""


@dataclass(frozen=True)
class Study:
    title: str
    base: GrowConfig
    rows: tuple[Row, ...]
    seeds: int = 5
    first_seed: int = FIRST_HELD_OUT

    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))

    def config(self, row: Row, seed: int) -> GrowConfig:
        """The config of `row`'s run on `seed` (not for rows that depend on another's run)."""
        cfg = override(self.base, **row.set) if row.set else self.base
        cfg = replace(cfg, seed=seed, out="")
        return host_alone(cfg) if row.kind == "host" else cfg


def load_study(path: str | Path, *, seeds: int | None = None) -> Study:
    """A study from its TOML file, checked: unknown keys, kinds, rows and overrides are errors."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"study file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"study file {path} is not valid TOML: {e}") from None
    unknown = set(data) - {"title", "base", "rows", "seeds", "first_seed"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    base = config_from_dict(data.get("base", {}), GrowConfig)
    rows = tuple(_row(r, path) for r in data.get("rows", []))
    study = Study(
        data.get("title", path.stem),
        base,
        rows,
        seeds if seeds is not None else data.get("seeds", 5),
        data.get("first_seed", FIRST_HELD_OUT),
    )
    _check(study, path)
    return study


def _row(data: dict[str, Any], path: Path) -> Row:
    unknown = set(data) - {"name", "kind", "set", "of", "notes"}
    if unknown or "name" not in data:
        raise ConfigError(f"{path}: a row needs a name; unknown keys {sorted(unknown)}")
    return Row(**data)


def _check(study: Study, path: Path) -> None:
    names = [r.name for r in study.rows]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"{path}: rows need distinct names, got {names}")
    if study.seeds < 1 or study.first_seed < FIRST_HELD_OUT:
        raise ConfigError(
            f"{path}: need >= 1 seed from a held-out one (>= {FIRST_HELD_OUT}), got "
            f"{study.seeds} from {study.first_seed}"
        )
    runs = {r.name for r in study.rows if r.kind == "grow"}
    for r in study.rows:
        if r.kind not in KINDS:
            raise ConfigError(f"{path}: row {r.name!r}: kind must be one of {KINDS}")
        if r.kind in ("parameter-matched", "from-scratch") and r.of not in runs:
            raise ConfigError(f"{path}: row {r.name!r} matches {r.of!r}, not a grow row")
        if r.kind in ("grow", "host"):
            study.config(r, study.first_seed)  # the overrides are checked here


# ---------------------------------------------------------------------------------------------
# Jobs (module level: they run in worker processes)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    run_dir: str
    metric: float
    params: int
    flops: int
    committed: tuple[str, ...]
    wall: float


def _summary(r: GrowResult) -> RunSummary:
    return RunSummary(
        str(r.run_dir),
        r.final_metric,
        r.params_end,
        r.flops_end,
        tuple(b for b in r.committed if b),
        r.wall_time,
    )


def recorded(run_dir: Path) -> RunSummary | None:
    """The summary of a run that already played all its ticks in `run_dir` (a study run again
    reads what it finished before), else None."""
    if finished(run_dir) is None:
        return None
    with RunStore.open(run_dir) as store:
        _, last = store.metrics()[-1]
        committed = tuple(e.payload.get("blueprint", "") for e in store.events(kind="fossilize"))
    params = int(last["host_params"] + last["seed_params"])
    return RunSummary(str(run_dir), last["metric"], params, int(last["flops"]), committed, 0.0)


def grow_job(cfg: GrowConfig, run_dir: str) -> RunSummary:
    where = Path(run_dir)
    if (where / "run.sqlite").is_file():
        with RunStore.open(where) as store:
            mine = config_from_dict(store.manifest()["config"])
        if replace(mine, out="") != replace(cfg, out=""):
            raise ConfigError(
                f"{where} holds a run of another config than this study's: the study changed, "
                "so give it another --out"
            )
    done = recorded(where)
    if done is not None:
        return done
    # interrupted: its config is the study's, so resume it
    run = resume_run(where) if (where / "run.sqlite").is_file() else start_run(cfg, run_dir=where)
    try:
        return _summary(run.run())
    finally:
        run.store.close()


def scratch_job(source: str, seed: int, run_dir: str) -> RunSummary:
    done = recorded(Path(run_dir))
    if done is not None:
        return done
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted one starts over
    return _summary(from_scratch(Path(source), seed, Path(run_dir)))


# ---------------------------------------------------------------------------------------------
# Running a study
# ---------------------------------------------------------------------------------------------


@dataclass
class StudyResult:
    study: Study
    runs: dict[str, dict[int, RunSummary]]
    """Row name -> seed -> its run."""
    host_params: int
    host_flops: int
    higher_is_better: bool
    wall: float
    workers: int


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_study(
    study: Study,
    out: Path,
    *,
    workers: int | None = None,
    backend: str = "local",
    progress: Callable[[str, int, RunSummary], None] | None = None,
) -> StudyResult:
    """Every row on every seed on one pool; the table's figures (`to_markdown`)."""
    t0 = time.perf_counter()
    seeds = study.seed_list()
    dependent = [r for r in study.rows if r.kind not in ("grow", "host")]
    # the rows others depend on go first, so that their dependents join the queue early instead
    # of running one at a time at the end
    referenced = {r.of for r in dependent}
    independent = sorted(
        (r for r in study.rows if r not in dependent), key=lambda r: r.name not in referenced
    )
    total = len(study.rows) * len(seeds)
    runs: dict[str, dict[int, RunSummary]] = {r.name: {} for r in study.rows}
    with open_executor(backend, workers, total, device=study.base.device) as (pool, n):
        pending: dict[cf.Future, tuple[Row, int]] = {}

        def submit(row: Row, seed: int, fn: Callable[..., RunSummary], *args: Any) -> None:
            run_dir = str(out / "runs" / f"{_slug(row.name)}-s{seed}")
            pending[pool.submit(fn, *args, run_dir)] = (row, seed)

        for seed in seeds:  # interleaved: drift in the machine hits every row alike
            for row in independent:
                submit(row, seed, grow_job, study.config(row, seed))
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                row, seed = pending.pop(fut)
                r = fut.result()
                runs[row.name][seed] = r
                if progress is not None:
                    progress(row.name, seed, r)
                for dep in (d for d in dependent if d.of == row.name):
                    if dep.kind == "parameter-matched":
                        cfg = parameter_matched(study.config(row, seed), r.params)
                        submit(dep, seed, grow_job, cfg)
                    else:
                        submit(dep, seed, scratch_job, r.run_dir, seed)
    params, flops = _host_cost(study.base)
    task = task_of(study.base)
    return StudyResult(
        study, runs, params, flops, task.higher_is_better, time.perf_counter() - t0, n
    )


def _host_cost(cfg: GrowConfig) -> tuple[int, int]:
    task = task_of(cfg)
    c = module_cost(build_host(cfg, task), task.val_x[:1].cpu())
    return c.params, c.flops


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def quartile(xs: Sequence[float], higher_is_better: bool) -> float:
    """The worse quartile: q25 of a metric to maximise, q75 of one to minimise."""
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0] if higher_is_better else q[2]


def row_figures(res: StudyResult, name: str) -> dict[str, Any]:
    by_seed = res.runs[name]
    metrics = [r.metric for r in by_seed.values()]
    committed = Counter(b for r in by_seed.values() for b in r.committed)
    return {
        "metric_median": statistics.median(metrics),
        "metric_quartile": quartile(metrics, res.higher_is_better),
        "params_added": statistics.median(r.params - res.host_params for r in by_seed.values()),
        "flops_delta": statistics.median(r.flops - res.host_flops for r in by_seed.values()),
        "committed": dict(sorted(committed.items())),
        "per_seed": {s: r.metric for s, r in sorted(by_seed.items())},
    }


def paired(res: StudyResult, a: str, b: str) -> tuple[float, int, int, int]:
    """(mean of a − b over common seeds, wins, ties, losses of a), in the metric's good sense."""
    sign = 1.0 if res.higher_is_better else -1.0
    common = sorted(set(res.runs[a]) & set(res.runs[b]))
    d = [sign * (res.runs[a][s].metric - res.runs[b][s].metric) for s in common]
    wins = sum(x > 1e-9 for x in d)
    losses = sum(x < -1e-9 for x in d)
    return (statistics.fmean(d) if d else float("nan")), wins, len(d) - wins - losses, losses


def to_markdown(res: StudyResult) -> str:
    s, sense = res.study, "q25" if res.higher_is_better else "q75"
    seeds = s.seed_list()
    head = (
        f"{s.title}: {s.base.task}, {s.base.ticks} ticks, seeds {seeds[0]}–{seeds[-1]} "
        f"({len(seeds)}), host {res.host_params:,} params, {res.host_flops:,} FLOPs/sample; "
        f"{res.workers} worker(s), {res.wall:.0f} s\n\n"
        f"| setting | metric median / {sense} | added params | FLOPs delta | "
        "blueprint distribution (committed) | notes |\n|---|---:|---:|---:|---|---|\n"
    )
    lines = []
    for row in s.rows:
        f = row_figures(res, row.name)
        dist = ", ".join(f"{k}×{v}" for k, v in f["committed"].items()) or "none"
        lines.append(
            f"| {row.name} | {f['metric_median']:.4f} / {f['metric_quartile']:.4f} | "
            f"{f['params_added']:,.0f} | {f['flops_delta']:,.0f} | {dist} | {row.notes} |"
        )
    return head + "\n".join(lines) + "\n\n" + "\n".join(comparisons(res)) + "\n"


def comparisons(res: StudyResult) -> list[str]:
    """Each grow row against the host, and each matched row against the row it matches."""
    host = next((r.name for r in res.study.rows if r.kind == "host"), None)
    out = []
    for row in res.study.rows:
        against = row.of if row.kind in ("parameter-matched", "from-scratch") else host
        if row.kind == "host" or against is None:
            continue
        subject, other = (against, row.name) if row.of else (row.name, against)
        mean, w, t, lo = paired(res, subject, other)
        out.append(
            f"- {subject} vs {other}: paired mean {mean:+.4f} (better is +), "
            f"{w} wins, {t} ties, {lo} losses"
        )
    return out


def to_json(res: StudyResult) -> dict[str, Any]:
    return {
        "title": res.study.title,
        "base": config_to_dict(res.study.base),
        "rows": [asdict(r) for r in res.study.rows],
        "figures": {r.name: row_figures(res, r.name) for r in res.study.rows},
        "runs": {n: {s: asdict(r) for s, r in rs.items()} for n, rs in res.runs.items()},
        "host_params": res.host_params,
        "host_flops": res.host_flops,
        "wall": res.wall,
        "workers": res.workers,
    }


def write(res: StudyResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(to_json(res), indent=2))
    (out / "study.md").write_text(to_markdown(res))
