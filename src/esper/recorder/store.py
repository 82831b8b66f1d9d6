"""The run directory and its SQLite event store (paper §8.1): one transaction per control tick.

A run is a directory holding `run.sqlite`. Each `with store.tick(t) as tx:` block is one SQLite
transaction that also marks tick t complete, so a crash or `kill -9` loses at most the tick in
progress. Events are immutable (triggers refuse UPDATE and DELETE); only `truncate_after`, the
resume path, removes the ticks after a checkpoint. Delayed labels live in their own table.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import operator
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from esper.contracts.errors import EsperError
from esper.recorder.records import (
    DECISION,
    CheckpointRecord,
    DecisionRecord,
    EventRecord,
    from_json,
    to_json,
)

DB_NAME = "run.sqlite"
SCHEMA_VERSION = 1
APPLICATION_ID = 0x45535052  # "ESPR": SQLite's header field that marks the file as an Esper run


class RecorderError(EsperError):
    """A run that cannot be created, opened or written; the message names the file and why."""


# ------------------------------------------------------------------------------------------------
# Schema
# ------------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE manifest (id INTEGER PRIMARY KEY CHECK (id = 1), json TEXT NOT NULL);

-- A row here is written by the tick's own transaction: its presence means the tick is complete.
CREATE TABLE ticks (tick INTEGER PRIMARY KEY);

-- No AUTOINCREMENT: after truncate_after, ids continue from the surviving maximum, so a resumed
-- run numbers its events exactly as an uninterrupted one.
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    tick INTEGER NOT NULL,
    env INTEGER NOT NULL,
    kind TEXT NOT NULL,
    slot TEXT,
    payload TEXT NOT NULL
);
CREATE INDEX events_by_tick ON events (tick);
CREATE INDEX events_by_kind ON events (kind, tick);

-- value NULL means NaN: SQLite stores a bound NaN as NULL, so that is how it is read back.
CREATE TABLE metrics (
    tick INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (tick, name)
) WITHOUT ROWID;

CREATE TABLE checkpoints (
    tick INTEGER NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (tick, path)
);

CREATE TABLE labels (
    event_id INTEGER NOT NULL REFERENCES events (id),
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (event_id, name)
);

-- truncating is 1 only inside truncate_after's transaction, which resets it before committing,
-- so every committed state has it at 0 and the DELETE trigger below is armed.
CREATE TABLE control (id INTEGER PRIMARY KEY CHECK (id = 1), truncating INTEGER NOT NULL);
INSERT INTO control VALUES (1, 0);

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are immutable'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
WHEN (SELECT truncating FROM control) = 0
BEGIN SELECT RAISE(ABORT, 'events are immutable: only RunStore.truncate_after removes them'); END;
CREATE TRIGGER manifest_no_update BEFORE UPDATE ON manifest
BEGIN SELECT RAISE(ABORT, 'the manifest is immutable'); END;
CREATE TRIGGER manifest_no_delete BEFORE DELETE ON manifest
BEGIN SELECT RAISE(ABORT, 'the manifest is immutable'); END;
"""

# Labels first: they reference the events they label.
_TRUNCATE = (
    "DELETE FROM labels WHERE event_id IN (SELECT id FROM events WHERE tick > ?)",
    "DELETE FROM events WHERE tick > ?",
    "DELETE FROM metrics WHERE tick > ?",
    "DELETE FROM checkpoints WHERE tick > ?",
    "DELETE FROM ticks WHERE tick > ?",
)


def _connect(path: Path) -> sqlite3.Connection:
    # mode=rw never creates a file, so opening a missing run cannot leave an empty one behind.
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per tick.
    uri = f"{path.resolve().as_uri()}?mode=rw"
    return sqlite3.connect(uri, uri=True, isolation_level=None)


def _configure(conn: sqlite3.Connection) -> None:
    # WAL: readers (`esper runs`, a report) never block the writer, and a commit is one append.
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL rather than NORMAL: fsync the WAL at every commit, so a committed tick survives power
    # loss and OS crashes too, not just a killed process. One fsync per tick (an epoch, or N
    # batches) costs nothing measurable.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")


def _check_format(conn: sqlite3.Connection, path: Path) -> None:
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as err:
        raise RecorderError(f"{path}: not an SQLite database, or corrupt ({err})") from err
    if app_id != APPLICATION_ID:
        raise RecorderError(f"{path}: not an Esper run (SQLite application_id {app_id:#x})")
    if version != SCHEMA_VERSION:
        raise RecorderError(
            f"{path}: schema version {version}, but this Esper reads version {SCHEMA_VERSION}"
        )
    try:
        conn.execute("SELECT json FROM manifest WHERE id = 1").fetchone()
    except sqlite3.DatabaseError as err:
        raise RecorderError(f"{path}: corrupt Esper run ({err})") from err


def _encode(value: Any, what: str) -> str:
    try:
        return to_json(value)
    except (TypeError, ValueError) as err:
        raise RecorderError(f"{what} is not JSON-serialisable: {err}") from err


# ------------------------------------------------------------------------------------------------
# Writing one tick
# ------------------------------------------------------------------------------------------------


class TickWriter:
    """Writes one tick's rows into the transaction that `RunStore.tick` opened.

    Payloads must not hold wall-clock times: they enter `event_log_hash`, which identical runs
    must reproduce. Wall times are metrics.
    """

    def __init__(self, conn: sqlite3.Connection, tick: int) -> None:
        self.tick = tick
        self._conn = conn
        self._closed = False

    def metrics(self, values: Mapping[str, float]) -> None:
        """Record scalar metrics (name -> float) for this tick; NaN and ±inf are kept."""
        self._check_open()
        for name, value in values.items():
            try:
                number = float(value)
            except (TypeError, ValueError) as err:
                raise RecorderError(f"metric {name!r}: {value!r} is not a number") from err
            try:
                self._conn.execute(
                    "INSERT INTO metrics (tick, name, value) VALUES (?, ?, ?)",
                    (self.tick, name, number),
                )
            except sqlite3.IntegrityError as err:
                raise RecorderError(f"tick {self.tick}: metric {name!r} written twice") from err

    def event(
        self, kind: str, payload: Mapping[str, Any], *, slot: str | None = None, env: int = 0
    ) -> int:
        """Record an immutable event and return its id (the key that labels join on)."""
        self._check_open()
        if not isinstance(payload, Mapping):
            raise RecorderError(f"event {kind!r}: payload must be a mapping, got {payload!r}")
        text = _encode(dict(payload), f"event {kind!r} payload")
        cursor = self._conn.execute(
            "INSERT INTO events (tick, env, kind, slot, payload) VALUES (?, ?, ?, ?, ?)",
            (self.tick, operator.index(env), kind, slot, text),
        )
        assert cursor.lastrowid is not None  # always set after an INSERT
        return cursor.lastrowid

    def decision(self, record: DecisionRecord) -> int:
        """Record a Tamiyo decision as a "decision" event and return its id."""
        if record.tick != self.tick:
            raise RecorderError(f"decision for tick {record.tick} written in tick {self.tick}")
        return self.event(DECISION, record.to_payload(), env=record.env)

    def checkpoint(self, path: str, sha256: str) -> None:
        """Record that the checkpoint file at `path` (with this digest) belongs to this tick."""
        self._check_open()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise RecorderError(f"checkpoint {path}: {sha256!r} is not a lowercase sha256 digest")
        self._conn.execute(
            "INSERT INTO checkpoints (tick, path, sha256) VALUES (?, ?, ?)",
            (self.tick, path, sha256),
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RecorderError(f"tick {self.tick} is closed: write inside its `with` block")


# ------------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------------


class RunStore:
    """One run's event store; build it with `RunStore.create` or `RunStore.open`."""

    def __init__(self, run_dir: Path, conn: sqlite3.Connection) -> None:
        self.run_dir = run_dir
        self._conn = conn

    @property
    def path(self) -> Path:
        return self.run_dir / DB_NAME

    # ---- creating and opening ----

    @classmethod
    def create(cls, run_dir: Path, manifest: dict[str, Any]) -> RunStore:
        """Make the run directory and its database, with `manifest` as the first record."""
        run_dir = Path(run_dir)
        path = run_dir / DB_NAME
        manifest_json = _encode(manifest, f"{path}: manifest")  # bad input touches no disk
        _new_file(run_dir, path)
        conn = _connect(path)
        try:
            _configure(conn)
            # Schema, manifest and the header marks in one transaction: a crash midway leaves
            # a file that `open` rejects as not an Esper run, never a run without a manifest.
            conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA)
            conn.execute("INSERT INTO manifest (id, json) VALUES (1, ?)", (manifest_json,))
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            conn.close()
            for suffix in ("", "-wal", "-shm"):
                path.with_name(DB_NAME + suffix).unlink(missing_ok=True)
            raise RecorderError(f"{path}: cannot write the new run ({err})") from err
        return cls(run_dir, conn)

    @classmethod
    def open(cls, run_dir: Path) -> RunStore:
        """Open an existing run, checking that it is an Esper run of this schema version."""
        run_dir = Path(run_dir)
        path = run_dir / DB_NAME
        if not path.is_file():
            raise RecorderError(f"{path}: no Esper run here (file missing)")
        try:
            conn = _connect(path)
        except sqlite3.Error as err:
            raise RecorderError(f"{path}: cannot open ({err})") from err
        try:
            _check_format(conn, path)
            _configure(conn)
        except sqlite3.Error as err:
            conn.close()
            raise RecorderError(f"{path}: cannot open ({err})") from err
        except BaseException:
            conn.close()
            raise
        return cls(run_dir, conn)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- writing ----

    @contextmanager
    def tick(self, t: int) -> Iterator[TickWriter]:
        """Write tick `t` atomically: the block's rows commit together at exit, or not at all."""
        t = self._next_tick(t)
        writer = TickWriter(self._conn, t)
        try:
            with self._transaction():
                yield writer
                self._conn.execute("INSERT INTO ticks (tick) VALUES (?)", (t,))
        finally:
            writer._closed = True

    def truncate_after(self, tick: int) -> None:
        """Remove every tick after `tick` with its events, labels, metrics and checkpoint rows.

        The resume path: reload the checkpoint of tick `tick`, truncate, continue at tick + 1.
        Checkpoint files on disk are the engine's to delete.
        """
        with self._transaction():
            self._conn.execute("UPDATE control SET truncating = 1")
            for statement in _TRUNCATE:
                self._conn.execute(statement, (operator.index(tick),))
            self._conn.execute("UPDATE control SET truncating = 0")

    def attach_label(self, event_id: int, name: str, value: float | Mapping[str, Any]) -> None:
        """Join a delayed label (advantage, Shapley φ, outcome) to an event; last write wins.

        Inside an open tick it commits or rolls back with that tick.
        """
        if isinstance(value, Mapping):
            text = _encode(dict(value), f"label {name!r}")
        else:
            try:
                text = to_json(float(value))
            except (TypeError, ValueError) as err:
                message = f"label {name!r}: {value!r} is neither a number nor a dict"
                raise RecorderError(message) from err
        try:
            self._conn.execute(
                "INSERT INTO labels (event_id, name, value) VALUES (?, ?, ?)"
                " ON CONFLICT (event_id, name) DO UPDATE SET value = excluded.value",
                (event_id, name, text),
            )
        except sqlite3.IntegrityError as err:
            raise RecorderError(f"{self.path}: no event {event_id} to label") from err

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._conn.in_transaction:
            raise RecorderError(f"{self.path}: a tick is still open on this store")
        try:
            # IMMEDIATE takes the write lock now, so a second writer fails here, not mid-tick.
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            raise RecorderError(f"{self.path}: cannot start writing ({err})") from err
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            # A failed COMMIT may already have rolled back; a second ROLLBACK would then raise.
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def _next_tick(self, t: int) -> int:
        t = operator.index(t)
        last = self.last_complete_tick()
        if t < 0 or (last is not None and t <= last):
            raise RecorderError(
                f"tick {t}: ticks must increase past the last complete tick ({last}); "
                "use truncate_after to rewrite history"
            )
        return t

    # ---- reading ----

    def manifest(self) -> dict[str, Any]:
        (text,) = self._conn.execute("SELECT json FROM manifest WHERE id = 1").fetchone()
        return from_json(text)

    def last_complete_tick(self) -> int | None:
        return self._conn.execute("SELECT max(tick) FROM ticks").fetchone()[0]

    def metrics(self) -> list[tuple[int, dict[str, float]]]:
        """(tick, {name: value}) for every tick that recorded metrics, in tick order."""
        rows = self._conn.execute("SELECT tick, name, value FROM metrics ORDER BY tick, name")
        return [
            (tick, {name: math.nan if value is None else value for _, name, value in group})
            for tick, group in itertools.groupby(rows, key=operator.itemgetter(0))
        ]

    def checkpoints(self) -> list[CheckpointRecord]:
        rows = self._conn.execute("SELECT tick, path, sha256 FROM checkpoints ORDER BY tick, path")
        return [CheckpointRecord(*row) for row in rows]

    def events(
        self, kind: str | None = None, env: int | None = None, since_tick: int | None = None
    ) -> list[EventRecord]:
        """Events in id order, filtered by kind, env and tick >= `since_tick`, labels joined."""
        filters = {"kind = ?": kind, "env = ?": env, "tick >= ?": since_tick}
        where = [condition for condition, wanted in filters.items() if wanted is not None]
        params = [wanted for wanted in filters.values() if wanted is not None]
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        labels: dict[int, dict[str, Any]] = {}
        label_rows = self._conn.execute(
            "SELECT event_id, name, value FROM labels"
            f" WHERE event_id IN (SELECT id FROM events{clause})",
            params,
        )
        for event_id, name, value in label_rows:
            labels.setdefault(event_id, {})[name] = from_json(value)
        rows = self._conn.execute(
            f"SELECT id, tick, env, kind, slot, payload FROM events{clause} ORDER BY id", params
        )
        return [
            EventRecord(id_, tick, env_, kind_, slot, from_json(payload), labels.get(id_, {}))
            for id_, tick, env_, kind_, slot, payload in rows
        ]

    def labels(self, event_id: int) -> dict[str, float | dict[str, Any]]:
        rows = self._conn.execute("SELECT name, value FROM labels WHERE event_id = ?", (event_id,))
        return {name: from_json(value) for name, value in rows}

    def decisions(self, env: int | None = None) -> list[DecisionRecord]:
        return [DecisionRecord.from_event(event) for event in self.events(DECISION, env)]

    def event_log_hash(self) -> str:
        """sha256 over every event in id order: kind, tick, env, slot and canonical payload.

        Ids, labels, metrics and checkpoints are left out, so two identical runs hash equal even
        when their wall times (metrics) or later audits (labels) differ.
        """
        digest = hashlib.sha256()
        rows = self._conn.execute("SELECT kind, tick, env, slot, payload FROM events ORDER BY id")
        for kind, tick, env, slot, payload in rows:
            digest.update(to_json([kind, tick, env, slot, from_json(payload)]).encode())
            digest.update(b"\n")
        return digest.hexdigest()


def _new_file(run_dir: Path, path: Path) -> None:
    """Create the empty database file, refusing to reuse one: two runs never share a file."""
    if path.exists():
        raise RecorderError(f"{path}: a run already exists here; open it or pick another directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=False)  # exclusive create: a concurrent `create` loses cleanly
    except OSError as err:
        if path.exists():
            raise RecorderError(f"{path}: a run already exists here") from err
        raise RecorderError(f"{run_dir}: cannot create the run directory ({err})") from err


# ------------------------------------------------------------------------------------------------
# Listing runs (`esper runs`)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """One line of `esper runs`; `problem` says why a run could not be read (fields then None)."""

    id: str
    path: Path
    created_at: str | None
    task: str | None
    policy: str | None
    last_tick: int | None
    problem: str | None = None


def list_runs(root: Path) -> list[RunSummary]:
    """Every subdirectory of `root` that holds a run, by name; unreadable runs are listed too."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [_summarise(d) for d in sorted(root.iterdir()) if (d / DB_NAME).is_file()]


def _summarise(run_dir: Path) -> RunSummary:
    try:
        with RunStore.open(run_dir) as store:
            manifest, last_tick = store.manifest(), store.last_complete_tick()
    except RecorderError as err:
        return RunSummary(run_dir.name, run_dir, None, None, None, None, problem=str(err))
    config = manifest.get("config") or {}
    return RunSummary(
        id=run_dir.name,
        path=run_dir,
        created_at=manifest.get("created_at"),
        task=_name_of(config.get("task")),
        policy=_name_of(config.get("policy")),
        last_tick=last_tick,
    )


def _name_of(value: Any) -> str | None:
    # A config may name a task or policy directly, or give a sub-config with a "name" field.
    if isinstance(value, Mapping):
        value = value.get("name")
    return value if isinstance(value, str) else None
