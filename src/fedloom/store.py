"""SQLite run store: every run, round and client result, one transaction per round.

WAL mode lets `fedloom runs` / `report` read while a run writes. The schema is versioned in
`meta.schema_version`; opening a store written by a newer fedloom is refused rather than misread.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RunError

SCHEMA_VERSION = 1

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
    wall_seconds REAL NOT NULL DEFAULT 0
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
    PRIMARY KEY (run_id, round, client_id, kind)
);
"""

CLIENT_FIELDS = (
    "client_id", "kind", "num_examples", "loss", "accuracy", "macro_f1",
    "update_norm", "update_mean", "update_std", "cosine", "bytes_up", "seconds",
)


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


class RunStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self._init_schema()

    def _init_schema(self) -> None:
        row = None
        with suppress(sqlite3.OperationalError):  # a new, empty database has no meta table yet
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise RunError(
                f"run store {self.path} has schema version {row[0]}, this fedloom reads up to {SCHEMA_VERSION}",
                "upgrade fedloom, or use another --runs-dir",
            )
        self.conn.executescript(_SCHEMA)
        self.conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ---- runs -------------------------------------------------------------------------------------
    def create_run(
        self, run_id: str, name: str, config: dict, seed: int, versions: dict, output_dir: str, rounds: int,
        clients: Iterable[tuple[int, int, int, list[int]]],
    ) -> None:
        now = time.time()
        with self.transaction() as c:
            c.execute(
                "INSERT INTO runs(run_id, name, created_at, updated_at, status, config_json, seed, versions_json,"
                " output_dir, rounds_planned) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (run_id, name, now, now, "running", json.dumps(config), seed, json.dumps(versions),
                 output_dir, rounds),
            )
            c.executemany(
                "INSERT INTO clients(run_id, client_id, num_train, num_test, label_counts_json) VALUES (?,?,?,?,?)",
                ((run_id, cid, ntr, nte, json.dumps(counts)) for cid, ntr, nte, counts in clients),
            )

    def get_run(self, run_id: str) -> RunRecord:
        row = self.conn.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            matches = [r[0] for r in self.conn.execute(
                "SELECT run_id FROM runs WHERE run_id LIKE ? ORDER BY created_at DESC", (f"{run_id}%",))]
            if len(matches) == 1:
                return self.get_run(matches[0])
            hint = f"did you mean one of: {', '.join(matches[:5])}" if matches else "list runs with `fedloom runs`"
            raise RunError(f"no run '{run_id}' in {self.path}", hint)
        return _run_record(row)

    def list_runs(self, limit: int | None = None) -> list[RunRecord]:
        sql = "SELECT * FROM runs ORDER BY created_at DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [_run_record(r) for r in self.conn.execute(sql)]

    def set_status(self, run_id: str, status: str, message: str | None = None,
                   wall_seconds: float | None = None) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET status=?, message=?, updated_at=?, wall_seconds=COALESCE(?, wall_seconds)"
                " WHERE run_id=?",
                (status, message, time.time(), wall_seconds, run_id),
            )

    def set_rounds_planned(self, run_id: str, rounds: int) -> None:
        with self.transaction() as c:
            c.execute("UPDATE runs SET rounds_planned=? WHERE run_id=?", (rounds, run_id))

    # ---- rounds -----------------------------------------------------------------------------------
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
                f"INSERT OR REPLACE INTO client_rounds(run_id, round, {', '.join(CLIENT_FIELDS)})"
                f" VALUES (?, ?, {', '.join('?' * len(CLIENT_FIELDS))})",
                ((run_id, round_, *(cl.get(f) for f in CLIENT_FIELDS)) for cl in clients),
            )
            c.execute(
                "UPDATE runs SET rounds_completed=?, updated_at=?, wall_seconds=? WHERE run_id=?",
                (round_, time.time(), wall_seconds, run_id),
            )

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        out = []
        for r in self.conn.execute("SELECT * FROM rounds WHERE run_id=? ORDER BY round", (run_id,)):
            d = dict(r)
            d["metrics"] = json.loads(d.pop("metrics_json"))
            out.append(d)
        return out

    def client_rounds(self, run_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM client_rounds WHERE run_id=?", [run_id]
        if kind:
            sql += " AND kind=?"
            args.append(kind)
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY round, client_id", args)]

    def clients(self, run_id: str) -> list[dict[str, Any]]:
        out = []
        for r in self.conn.execute("SELECT * FROM clients WHERE run_id=? ORDER BY client_id", (run_id,)):
            d = dict(r)
            d["label_counts"] = json.loads(d.pop("label_counts_json"))
            out.append(d)
        return out

    def last_checkpoint(self, run_id: str) -> tuple[int, str | None]:
        row = self.conn.execute(
            "SELECT round, checkpoint FROM rounds WHERE run_id=? AND checkpoint IS NOT NULL"
            " ORDER BY round DESC LIMIT 1", (run_id,)).fetchone()
        return (0, None) if row is None else (int(row[0]), row[1])

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
        wall_seconds=d["wall_seconds"],
    )
