"""Per-client state on disk: what each client keeps across rounds, read and written only for a round's clients.

An algorithm's state (SCAFFOLD's c_i, Ditto's personal model) and the pipeline's (error-feedback
residuals) belong to the client. Held in memory and written whole into every checkpoint, they would cost
O(population x model) per round; here each client's state is a safetensors blob in SQLite, one row per
(client, round it was written), so a round touches only its own clients' rows.

Versions make resume exact: a checkpoint of round R pairs with every client's newest version at or before
R. Resuming from R drops the versions written after it (`truncate_after`); `prune(R)` drops the versions
that no checkpoint at or after R can need. A deployed agent keeps its own rows in a file of the same shape.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

State = dict[str, torch.Tensor]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS client_state (
    client_id INTEGER NOT NULL,
    round INTEGER NOT NULL,     -- the round whose work produced this version
    blob BLOB NOT NULL,         -- safetensors bytes of the client's state dict (empty dict allowed)
    PRIMARY KEY (client_id, round)
);
"""


class ClientStateStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def get(self, client_id: int, at_round: int | None = None) -> State:
        return self.get_many([client_id], at_round).get(client_id, {})

    def get_many(self, clients: Iterable[int], at_round: int | None = None) -> dict[int, State]:
        """Each client's newest state at or before `at_round` (None: newest); clients without any are absent."""
        ids = sorted({int(c) for c in clients})
        limit = (1 << 62) if at_round is None else int(at_round)
        out: dict[int, State] = {}
        for i in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            chunk = ids[i : i + 500]
            rows = self.conn.execute(
                f"SELECT s.client_id, s.blob FROM client_state s JOIN ("
                f" SELECT client_id, MAX(round) AS r FROM client_state"
                f" WHERE round <= ? AND client_id IN ({','.join('?' * len(chunk))}) GROUP BY client_id"
                f") m ON s.client_id = m.client_id AND s.round = m.r", (limit, *chunk))
            for cid, blob in rows:
                out[int(cid)] = dict(st_load(bytes(blob)))
        return out

    def put(self, round_: int, states: dict[int, State]) -> None:
        """The round's new versions, all or none."""
        if not states:
            return
        rows = [(int(c), int(round_), st_save({k: v.contiguous() for k, v in s.items()}))
                for c, s in states.items()]
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany("INSERT OR REPLACE INTO client_state(client_id, round, blob) VALUES (?,?,?)", rows)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def truncate_after(self, round_: int) -> None:
        """Forget versions written after `round_`: a resume from that round's checkpoint writes them again."""
        self.conn.execute("DELETE FROM client_state WHERE round > ?", (int(round_),))

    def prune(self, keep_from: int) -> None:
        """Drop versions superseded at or before round `keep_from`: a checkpoint of round >= keep_from reads
        only each client's newest version at or before its round."""
        self.conn.execute(
            "DELETE FROM client_state WHERE round < (SELECT MAX(s.round) FROM client_state s"
            " WHERE s.client_id = client_state.client_id AND s.round <= ?)", (int(keep_from),))

    def clients(self) -> list[int]:
        return [int(r[0]) for r in self.conn.execute("SELECT DISTINCT client_id FROM client_state ORDER BY 1")]

    def versions(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM client_state").fetchone()[0])
