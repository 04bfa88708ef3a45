"""SQLite run store: every run, round and client result, one transaction per round.

WAL mode lets `fedloom runs` / `report` read while a run writes. The schema is versioned in
`meta.schema_version`; opening a store written by a newer fedloom is refused rather than misread.
Commands that only read open it read-only, so they work on a read-only runs directory; every SQLite
failure (a damaged file, a full disk, a read-only folder) becomes one `RunError` naming the file.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from .errors import RunError

# 2: client_rounds gained suspicion, cosine_prev, attacker, excluded (robustness, issue 13) and metrics_json (an
# algorithm's own client metrics); runs gained sweep_id, and the sweeps table (issue 10)
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    status TEXT NOT NULL,              -- running | completed | failed | diverged | interrupted
    message TEXT,                      -- why a run stopped early, in plain words
    config_json TEXT NOT NULL,
    seed INTEGER NOT NULL,
    versions_json TEXT NOT NULL,
    output_dir TEXT NOT NULL,
    rounds_planned INTEGER NOT NULL,
    rounds_completed INTEGER NOT NULL DEFAULT 0,
    wall_seconds REAL NOT NULL DEFAULT 0,
    sweep_id TEXT                      -- the sweep the run belongs to (fedloom sweep), NULL: none
);
CREATE TABLE IF NOT EXISTS sweeps (
    sweep_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    spec_json TEXT NOT NULL            -- the base config, the grid and the seeds
);
CREATE TABLE IF NOT EXISTS clients (
    run_id TEXT NOT NULL,
    client_id INTEGER NOT NULL,
    num_train INTEGER NOT NULL,
    num_test INTEGER NOT NULL,
    label_counts_json TEXT NOT NULL,
    PRIMARY KEY (run_id, client_id)
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,            -- 1-based
    finished_at REAL NOT NULL,
    seconds REAL NOT NULL,
    num_clients INTEGER NOT NULL,
    bytes_up INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL,
    train_loss REAL,                   -- example-weighted mean of the clients' local training loss
    test_loss REAL,                    -- centralized evaluation (NULL on rounds not evaluated)
    test_accuracy REAL,
    test_macro_f1 REAL,
    metrics_json TEXT NOT NULL,        -- everything else: federated eval summary, timings, update stats
    checkpoint TEXT,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS client_rounds (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    client_id INTEGER NOT NULL,
    kind TEXT NOT NULL,                -- 'fit' (local training) or 'eval' (federated evaluation)
    num_examples INTEGER NOT NULL,
    loss REAL,
    accuracy REAL,
    macro_f1 REAL,
    update_norm REAL,
    update_mean REAL,
    update_std REAL,
    cosine REAL,                       -- cosine similarity of the client's update to the aggregate
    bytes_up INTEGER,
    seconds REAL,
    suspicion REAL,                    -- how much the update looks like an attacker's, 0..1 (docs/robustness.md)
    cosine_prev REAL,                  -- cosine of the update to the client's own previous update
    attacker INTEGER,                  -- 1 if the client attacked in this round (simulated attacks), NULL: no attack
    excluded TEXT,                     -- why the server left the update out of the aggregate (NULL: it was in)
    metrics_json TEXT,                 -- the client's other numeric metrics (the algorithm's own, e.g. steps)
    PRIMARY KEY (run_id, round, client_id, kind)
);
"""

CLIENT_FIELDS = (
    "client_id", "kind", "num_examples", "loss", "accuracy", "macro_f1",
    "update_norm", "update_mean", "update_std", "cosine", "bytes_up", "seconds",
    "suspicion", "cosine_prev", "attacker", "excluded",
)

# columns added after schema version 1, with their types: added to an older store when it is opened to write
_ADDED_COLUMNS = {"client_rounds": (("suspicion", "REAL"), ("cosine_prev", "REAL"), ("attacker", "INTEGER"),
                                    ("excluded", "TEXT"), ("metrics_json", "TEXT")),
                  "runs": (("sweep_id", "TEXT"),)}


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring an older store up to SCHEMA_VERSION: nullable columns added in place (old rows read NULL)."""
    for table, columns in _ADDED_COLUMNS.items():
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        for name, kind in columns:
            if name not in have:
                try:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
                except sqlite3.OperationalError as e:  # another process opening the store added it first
                    if "duplicate column" not in str(e).lower():
                        raise
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))


def client_metrics_json(metrics: dict[str, Any] | None) -> str | None:
    """A client's numeric metrics that have no column of their own (the algorithm's, e.g. steps, nova_a), as
    JSON; NaN/Inf as null. None when there are none."""
    extra = {k: (v if math.isfinite(v) else None) for k, v in (metrics or {}).items()
             if isinstance(v, int | float) and not isinstance(v, bool) and k not in _CLIENT_COLUMNS}
    return json.dumps(extra) if extra else None


_CLIENT_COLUMNS = frozenset(CLIENT_FIELDS)


@dataclass
class RunRecord:
    run_id: str
    name: str
    created_at: float
    updated_at: float
    status: str
    message: str | None
    config: dict[str, Any]
    seed: int
    versions: dict[str, str]
    output_dir: str
    rounds_planned: int
    rounds_completed: int
    wall_seconds: float
    sweep_id: str | None = None

    @property
    def algorithm(self) -> str:
        return str(self.config.get("server", {}).get("algorithm", "fedavg"))

    @property
    def dataset(self) -> str:
        return str(self.config.get("data", {}).get("dataset", "?"))

    @property
    def partition(self) -> str:
        """The partition with the parameter that sets its skew: dirichlet(0.1), shards(2), quantity(0.5)."""
        d = self.config.get("data", {})
        kind = str(d.get("partition", "iid"))
        knob = {"dirichlet": "alpha", "shards": "classes_per_client", "quantity": "beta",
                "feature-noise": "noise_sigma"}.get(kind)
        return f"{kind}({d[knob]:g})" if knob and isinstance(d.get(knob), int | float) else kind


F = TypeVar("F", bound=Callable[..., Any])


def store_error(path: Path, e: sqlite3.Error, readonly: bool = False) -> RunError:
    """One line for a failed SQLite call: which file, what happened, what the user can do."""
    text = str(e)
    low = text.lower()
    if "malformed" in low or "not a database" in low or "encrypted" in low:
        return RunError(f"run store {path} is damaged ({text})",
                        f"move it aside (mv {path} {path}.damaged) and fedloom starts a new, empty store there; "
                        "the run folders next to it are not touched")
    if readonly and "unable to open" in low:
        return RunError(f"cannot read the run store {path} ({text})", "check that the file and its folder are readable")
    if "readonly" in low or "read-only" in low or "unable to open" in low:
        return RunError(f"cannot write the run store {path} ({text})",
                        "the runs directory is read-only here: `runs`, `show`, `diagnose` and `report --output-dir` "
                        "still work; to train, pass --runs-dir with a writable folder")
    if "full" in low:
        return RunError(f"cannot write the run store {path}: the disk is full", "free some space and try again")
    if "locked" in low or "busy" in low:
        return RunError(f"run store {path} stayed locked by another process ({text})",
                        "try again when the other fedloom command has finished")
    return RunError(f"run store {path}: {text}")


def _faults(method: F) -> F:
    """SQLite errors out of a store method become a `RunError` that names the store."""

    @functools.wraps(method)
    def wrapper(self: RunStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as e:
            raise store_error(self.path, e, self.readonly) from None

    return wrapper  # type: ignore[return-value]


class RunStore:
    """The run store at `path`; `readonly=True` for commands that only read (nothing is created: a missing
    store reads as empty)."""

    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        try:
            self.conn = self._open_readonly() if readonly else self._open_writable()
        except sqlite3.Error as e:
            raise store_error(self.path, e, readonly) from None

    def _open_writable(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create the runs directory {self.path.parent}: {e.strerror}",
                           "pass --runs-dir (or set FEDLOOM_RUNS_DIR) with a folder you can write") from None
        conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._check_version(conn)
            conn.executescript(_SCHEMA)
            _migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_readonly(self) -> sqlite3.Connection:
        """Read-only, creating nothing: `mode=ro`; on a read-only folder, a WAL store whose -wal/-shm files are
        gone cannot be opened that way, and is opened `immutable` (nobody can be writing it there)."""
        if not self.path.is_file():
            return self._empty()
        uri = "file:" + quote(str(self.path.resolve()))
        conn = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=30, isolation_level=None)
        try:
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.OperationalError:
            conn.close()
            if os.access(self.path.parent, os.W_OK):
                raise
            conn = sqlite3.connect(uri + "?immutable=1", uri=True, isolation_level=None)
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        conn.row_factory = sqlite3.Row
        if "runs" not in names:  # an empty file: no run was ever recorded
            conn.close()
            return self._empty()
        self._check_version(conn)
        return conn

    @staticmethod
    def _empty() -> sqlite3.Connection:
        conn = sqlite3.connect(":memory:", isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.executescript(_SCHEMA)
        return conn

    def _check_version(self, conn: sqlite3.Connection) -> None:
        row = None
        with suppress(sqlite3.OperationalError):  # a new, empty database has no meta table yet
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            conn.close()
            raise RunError(
                f"run store {self.path} has schema version {row[0]}, this fedloom reads up to {SCHEMA_VERSION}",
                "upgrade fedloom, or use another --runs-dir",
            )

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            with suppress(sqlite3.Error):  # a failed rollback must not hide why the transaction failed
                self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ---- runs -------------------------------------------------------------------------------------
    @_faults
    def create_run(
        self, run_id: str, name: str, config: dict, seed: int, versions: dict, output_dir: str, rounds: int,
        clients: Iterable[tuple[int, int, int, list[int]]], sweep_id: str | None = None,
    ) -> None:
        now = time.time()
        with self.transaction() as c:
            c.execute(
                "INSERT INTO runs(run_id, name, created_at, updated_at, status, config_json, seed, versions_json,"
                " output_dir, rounds_planned, sweep_id) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, name, now, now, "running", json.dumps(config), seed, json.dumps(versions),
                 output_dir, rounds, sweep_id),
            )
            c.executemany(
                "INSERT INTO clients(run_id, client_id, num_train, num_test, label_counts_json) VALUES (?,?,?,?,?)",
                ((run_id, cid, ntr, nte, json.dumps(counts)) for cid, ntr, nte, counts in clients),
            )

    @_faults
    def get_run(self, run_id: str) -> RunRecord:
        """The run `run_id`, or the one run whose id starts with it."""
        if not run_id:
            raise RunError("no run id given", "list runs with `fedloom runs`")
        row = self.conn.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is not None:
            return _run_record(row)
        matches = [r[0] for r in self.conn.execute(  # substr, not LIKE: '_' and '%' in an id are not wildcards
            "SELECT run_id FROM runs WHERE substr(run_id, 1, ?)=? ORDER BY created_at DESC", (len(run_id), run_id))]
        if len(matches) == 1:
            return self.get_run(matches[0])
        if matches:
            more = f", ... ({len(matches) - 5} more)" if len(matches) > 5 else ""
            raise RunError(f"run id prefix '{run_id}' is ambiguous: {len(matches)} runs in {self.path} start with it",
                           f"give more of the id: {', '.join(matches[:5])}{more}")
        raise RunError(f"no run '{run_id}' in {self.path}", "list runs with `fedloom runs`")

    @_faults
    def list_runs(self, limit: int | None = None) -> list[RunRecord]:
        sql = "SELECT * FROM runs ORDER BY created_at DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [_run_record(r) for r in self.conn.execute(sql)]

    @_faults
    def set_status(self, run_id: str, status: str, message: str | None = None,
                   wall_seconds: float | None = None) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET status=?, message=?, updated_at=?, wall_seconds=COALESCE(?, wall_seconds)"
                " WHERE run_id=?",
                (status, message, time.time(), wall_seconds, run_id),
            )

    @_faults
    def set_rounds_planned(self, run_id: str, rounds: int) -> None:
        with self.transaction() as c:
            c.execute("UPDATE runs SET rounds_planned=? WHERE run_id=?", (rounds, run_id))

    # ---- sweeps -----------------------------------------------------------------------------------
    @_faults
    def create_sweep(self, sweep_id: str, name: str, spec: dict[str, Any]) -> None:
        """Record a sweep once; running the same sweep again finds it (its id is derived from the spec)."""
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO sweeps(sweep_id, name, created_at, spec_json) VALUES (?,?,?,?)",
                      (sweep_id, name, time.time(), json.dumps(spec)))

    @_faults
    def get_sweep(self, sweep_id: str) -> dict[str, Any]:
        """The sweep `sweep_id`, or the one sweep whose id starts with it."""
        if not self._has_table("sweeps"):
            raise RunError(f"no sweep '{sweep_id}' in {self.path}", "list sweeps with `fedloom runs`")
        rows = [dict(r) for r in self.conn.execute(
            "SELECT * FROM sweeps WHERE substr(sweep_id, 1, ?)=? ORDER BY created_at DESC", (len(sweep_id), sweep_id))]
        exact = [r for r in rows if r["sweep_id"] == sweep_id]
        if len(rows) > 1 and not exact:
            raise RunError(f"sweep id prefix '{sweep_id}' is ambiguous: {len(rows)} sweeps start with it",
                           f"give more of the id: {', '.join(r['sweep_id'] for r in rows[:5])}")
        if not rows:
            raise RunError(f"no sweep '{sweep_id}' in {self.path}", "list sweeps with `fedloom runs`")
        row = (exact or rows)[0]
        row["spec"] = json.loads(row.pop("spec_json"))
        return row

    @_faults
    def sweep_runs(self, sweep_id: str) -> list[RunRecord]:
        """The runs of a sweep, oldest first."""
        if "sweep_id" not in {r[1] for r in self.conn.execute("PRAGMA table_info(runs)")}:
            return []  # a store from before sweeps (opened read-only, not migrated)
        return [_run_record(r) for r in self.conn.execute(
            "SELECT * FROM runs WHERE sweep_id=? ORDER BY created_at", (sweep_id,))]

    def _has_table(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() \
            is not None

    # ---- rounds -----------------------------------------------------------------------------------
    @_faults
    def record_round(self, run_id: str, round_: int, row: dict[str, Any], clients: list[dict[str, Any]],
                     wall_seconds: float) -> None:
        """One transaction: the round, its client rows and the run's progress land together or not at all."""
        metrics = dict(row.get("metrics", {}))
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO rounds(run_id, round, finished_at, seconds, num_clients, bytes_up, bytes_down,"
                " train_loss, test_loss, test_accuracy, test_macro_f1, metrics_json, checkpoint)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, round_, time.time(), row["seconds"], row["num_clients"], row["bytes_up"],
                 row["bytes_down"], row.get("train_loss"), row.get("test_loss"), row.get("test_accuracy"),
                 row.get("test_macro_f1"), json.dumps(metrics), row.get("checkpoint")),
            )
            c.executemany(
                f"INSERT OR REPLACE INTO client_rounds(run_id, round, {', '.join(CLIENT_FIELDS)}, metrics_json)"
                f" VALUES (?, ?, {', '.join('?' * len(CLIENT_FIELDS))}, ?)",
                ((run_id, round_, *(cl.get(f) for f in CLIENT_FIELDS), client_metrics_json(cl.get("metrics")))
                 for cl in clients),
            )
            c.execute(
                "UPDATE runs SET rounds_completed=?, updated_at=?, wall_seconds=? WHERE run_id=?",
                (round_, time.time(), wall_seconds, run_id),
            )

    @_faults
    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        out = []
        for r in self.conn.execute("SELECT * FROM rounds WHERE run_id=? ORDER BY round", (run_id,)):
            d = dict(r)
            d["metrics"] = json.loads(d.pop("metrics_json"))
            out.append(d)
        return out

    @_faults
    def client_rounds(self, run_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM client_rounds WHERE run_id=?", [run_id]
        if kind:
            sql += " AND kind=?"
            args.append(kind)
        out = []
        for r in self.conn.execute(sql + " ORDER BY round, client_id", args):
            d = dict(r)
            d["metrics"] = json.loads(d.pop("metrics_json", None) or "{}")  # a store before the column: {}
            out.append(d)
        return out

    @_faults
    def clients(self, run_id: str) -> list[dict[str, Any]]:
        out = []
        for r in self.conn.execute("SELECT * FROM clients WHERE run_id=? ORDER BY client_id", (run_id,)):
            d = dict(r)
            d["label_counts"] = json.loads(d.pop("label_counts_json"))
            out.append(d)
        return out

    @_faults
    def last_checkpoint(self, run_id: str) -> tuple[int, str | None]:
        row = self.conn.execute(
            "SELECT round, checkpoint FROM rounds WHERE run_id=? AND checkpoint IS NOT NULL"
            " ORDER BY round DESC LIMIT 1", (run_id,)).fetchone()
        return (0, None) if row is None else (int(row[0]), row[1])

    @_faults
    def best_checkpoint(self, run_id: str) -> str | None:
        """The newest checkpoint at or before the best evaluated round (highest test accuracy, earliest on a
        tie): the last good model of a run that later diverged, so checkpoint rotation keeps it."""
        row = self.conn.execute(
            "SELECT checkpoint FROM rounds WHERE run_id=? AND checkpoint IS NOT NULL AND round <= ("
            " SELECT round FROM rounds WHERE run_id=? AND test_accuracy IS NOT NULL"
            " ORDER BY test_accuracy DESC, round ASC LIMIT 1) ORDER BY round DESC LIMIT 1", (run_id, run_id)).fetchone()
        return None if row is None else row[0]

    @_faults
    def truncate_after(self, run_id: str, round_: int) -> None:
        """Forget rounds after `round_` (a resume restarts from a checkpoint and records them again)."""
        with self.transaction() as c:
            c.execute("DELETE FROM rounds WHERE run_id=? AND round>?", (run_id, round_))
            c.execute("DELETE FROM client_rounds WHERE run_id=? AND round>?", (run_id, round_))
            c.execute("UPDATE runs SET rounds_completed=? WHERE run_id=?", (round_, run_id))


def _run_record(row: sqlite3.Row) -> RunRecord:
    d = dict(row)
    return RunRecord(
        run_id=d["run_id"], name=d["name"], created_at=d["created_at"], updated_at=d["updated_at"],
        status=d["status"], message=d["message"], config=json.loads(d["config_json"]), seed=d["seed"],
        versions=json.loads(d["versions_json"]), output_dir=d["output_dir"],
        rounds_planned=d["rounds_planned"], rounds_completed=d["rounds_completed"],
        wall_seconds=d["wall_seconds"], sweep_id=d.get("sweep_id"),
    )
