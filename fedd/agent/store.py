"""The agent's local store: SQLite in WAL mode with full fsync on commit.

Three tables: `windows` (featurized sensor windows, bounded by count and
age), `state` (small named blobs: replay cursor, personal head, scaler,
sequence numbers) and `outbox` (encoded updates waiting for the hub's
acknowledgement). A power cut loses nothing that a commit returned for,
which is why `synchronous=FULL`: commits are batched, so it costs little.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedd import durable

FILENAME = "agent.sqlite"  # in the agent's state_dir
CACHE_KIB = 512
SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY, stored_at REAL NOT NULL, label INTEGER NOT NULL,
    features BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS windows_stored_at ON windows (stored_at);
-- The trainer counts labelled windows whenever new ones arrive: without this the
-- count reads every feature blob.
CREATE INDEX IF NOT EXISTS windows_label ON windows (label);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY, created REAL NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL);
"""


@dataclass(frozen=True)
class SpanLabels:
    """What labelling a span did to its windows (`AgentStore.label_span`)."""

    labelled: int  # unlabelled before, labelled now
    relabelled: int  # had another class, overwritten (only when asked to)
    kept: int  # had a label and keep it: the same class, or another one not overwritten


@dataclass(frozen=True)
class Outgoing:
    seq: int
    topic: str
    payload: bytes


class AgentStore:
    def __init__(self, path: str | Path, *, input_shape: tuple[int, ...]) -> None:
        self.path = Path(path)
        self.input_shape = tuple(input_shape)  # one model input: features or a raw window
        self._lock = threading.RLock()
        self._db = durable.connect(self.path)
        # A few hundred KiB of page cache is plenty for append-mostly tables on a Pi.
        self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # windows

    def add_windows(self, features: np.ndarray, labels: np.ndarray,
                    state: dict[str, Any] | None = None) -> None:
        """Store windows and, in the same transaction, the state they advance."""
        now = time.time()
        rows = [(now, int(label), np.asarray(f, dtype="<f4").tobytes())
                for f, label in zip(features, labels, strict=True)]
        with self._transaction():
            self._db.executemany(
                "INSERT INTO windows (stored_at, label, features) VALUES (?, ?, ?)", rows)
            for key, value in (state or {}).items():
                self._put(key, value)

    def count_windows(self, *, labelled_only: bool = False) -> int:
        where = " WHERE label >= 0" if labelled_only else ""
        return int(self._query(f"SELECT COUNT(*) FROM windows{where}")[0][0])

    def labelled_windows(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self._query("SELECT features, label FROM windows WHERE label >= 0 ORDER BY id")
        if not rows:
            return np.zeros((0, *self.input_shape), np.float32), np.zeros(0, np.int32)
        features = np.frombuffer(b"".join(r[0] for r in rows), dtype="<f4")
        return (features.reshape(len(rows), *self.input_shape).astype(np.float32),
                np.array([r[1] for r in rows], dtype=np.int32))

    def label_span(self, label: int, *, start: float, end: float,
                   relabel: bool = False) -> SpanLabels:
        """Give `label` to the windows stored from `start` to `end` (Unix time, inclusive).

        For the user of a live source, whose windows come unlabelled: one
        transaction, so the running agent sees all of the span labelled or
        none of it. Only labels change; ids and `stored_at` (what retention
        goes by) stay. Windows that have a label keep it unless `relabel`.
        """
        if label < 0:
            raise ValueError(f"a class label is 0 or more, got {label}")
        span = "stored_at BETWEEN ? AND ?"
        with self._transaction():
            labelled = self._db.execute(f"UPDATE windows SET label = ? WHERE {span} AND label < 0",
                                        (label, start, end)).rowcount
            relabelled = self._db.execute(
                f"UPDATE windows SET label = ? WHERE {span} AND label >= 0 AND label != ?",
                (label, start, end, label)).rowcount if relabel else 0
            held = self._db.execute(f"SELECT COUNT(*) FROM windows WHERE {span} AND label >= 0",
                                    (start, end)).fetchone()[0]
        return SpanLabels(labelled, relabelled, int(held) - labelled - relabelled)

    def forget_windows(self) -> int:
        """Drop every stored window (they were made for another model's inputs)."""
        with self._transaction():
            return self._db.execute("DELETE FROM windows").rowcount

    def enforce_retention(self, *, max_windows: int, max_age_s: float) -> int:
        """Drop windows beyond the count or age bound, oldest first."""
        with self._transaction():
            aged = self._db.execute("DELETE FROM windows WHERE stored_at < ?",
                                    (time.time() - max_age_s,)).rowcount
            over = self._db.execute(
                "DELETE FROM windows WHERE id NOT IN "
                "(SELECT id FROM windows ORDER BY id DESC LIMIT ?)", (max_windows,)).rowcount
        return aged + over

    # state

    def _put(self, key: str, value: Any) -> None:
        blob = value.astype("<f4").tobytes() if isinstance(value, np.ndarray) else \
            json.dumps(value).encode()
        kind = "a" if isinstance(value, np.ndarray) else "j"
        self._db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                         (key, kind.encode() + blob))

    def put(self, **values: Any) -> None:
        """Store JSON-able values or float32 arrays under names, atomically."""
        with self._transaction():
            for key, value in values.items():
                self._put(key, value)

    def forget(self, *keys: str) -> None:
        """Delete named state, atomically; `get` then gives its default again."""
        with self._transaction():
            self._db.executemany("DELETE FROM state WHERE key = ?", [(k,) for k in keys])

    def get(self, key: str, default: Any = None) -> Any:
        rows = self._query("SELECT value FROM state WHERE key = ?", (key,))
        if not rows:
            return default
        value = bytes(rows[0][0])  # type: ignore[arg-type]
        kind, blob = value[:1], value[1:]
        return np.frombuffer(blob, dtype="<f4").copy() if kind == b"a" else json.loads(blob)

    # outbox

    def enqueue(self, topic: str, payload: bytes, *, seq: int,
                state: dict[str, Any] | None = None) -> None:
        """Queue an update durably, with the state it advances (its next seq).

        One transaction, so a crash can never queue an update without moving
        the sequence on, nor the other way round.
        """
        with self._transaction():
            self._db.execute("INSERT INTO outbox (seq, created, topic, payload) "
                             "VALUES (?, ?, ?, ?)", (seq, time.time(), topic, payload))
            for key, value in (state or {}).items():
                self._put(key, value)

    def oldest_outgoing(self) -> Outgoing | None:
        rows = self._query("SELECT seq, topic, payload FROM outbox ORDER BY seq LIMIT 1")
        if not rows:
            return None
        seq, topic, payload = rows[0]
        return Outgoing(int(seq), str(topic), bytes(payload))  # type: ignore[arg-type]

    def outgoing(self) -> list[Outgoing]:
        """Every queued update, oldest first."""
        rows = self._query("SELECT seq, topic, payload FROM outbox ORDER BY seq")
        return [Outgoing(int(seq), str(topic), bytes(payload))  # type: ignore[arg-type]
                for seq, topic, payload in rows]

    def acknowledge(self, seq: int, state: dict[str, Any] | None = None) -> None:
        """Drop a settled update and store what its settlement changed, atomically."""
        with self._transaction():
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            for key, value in (state or {}).items():
                self._put(key, value)

    def holds(self, seq: int) -> bool:
        return bool(self._query("SELECT 1 FROM outbox WHERE seq = ?", (seq,)))

    def outbox_size(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM outbox")[0][0])

    def outbox_bytes(self) -> int:
        return int(self._query("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM outbox")[0][0])

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return durable.transaction(self._db, self._lock)
