"""The hub's ledger: what became of every (device, seq) it has seen, durably.

This is what makes an update count exactly once. A device resends an update
until the hub acknowledges it, so the hub must recognize a resend even
after it restarted: each outcome is committed (SQLite, WAL, full fsync)
before the acknowledgement goes out. An accepted update keeps its payload
while it sits in the aggregation buffer, so a hub that stops before the
next version rebuilds the same buffer; the row records the version it is
headed for (the current one + 1), so a crash between saving that version
and marking its rows tells itself apart on restart.

An update's row also keeps its norm and, when accepted, the clip scale it
was folded with (fedd.hub.robust): the scale makes a re-fold after a
restart equal the first fold, and the recent rows' norms (accepted, or
rejected as norm outliers) are the history a restarted hub judges the next
updates by.

Records older than the retention are pruned; each device's largest pruned
seq survives, so a resend of a pruned update is still recognized (a device
sends its updates in seq order, each until it is acknowledged).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BUFFERED = "buffered"  # accepted, in the aggregation buffer, payload kept
FOLDED = "folded"  # accepted and part of `version`
REJECTED = "rejected"  # refused for `reason`; never folded

SCHEMA = """
CREATE TABLE IF NOT EXISTS updates (
    device TEXT NOT NULL, seq INTEGER NOT NULL, state TEXT NOT NULL, reason TEXT,
    received REAL NOT NULL, version INTEGER, staleness INTEGER, num_samples INTEGER,
    payload BLOB, norm REAL, scale REAL, PRIMARY KEY (device, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS updates_state ON updates (state);
CREATE INDEX IF NOT EXISTS updates_received ON updates (received);
-- pruned_through: the largest seq of this device whose record was pruned.
CREATE TABLE IF NOT EXISTS devices (device TEXT PRIMARY KEY, pruned_through INTEGER);
"""
ADDED_COLUMNS = {"norm": "REAL", "scale": "REAL"}  # a ledger made before them gains them


@dataclass(frozen=True)
class Record:
    """The ledger's row for one update, as a duplicate's acknowledgement needs it."""

    device: str
    seq: int
    state: str
    reason: str | None


@dataclass(frozen=True)
class Buffered:
    """An accepted update still waiting for its version: enough to fold it again."""

    device: str
    seq: int
    received: float
    version: int  # the version it is headed for
    staleness: int
    num_samples: int
    payload: bytes
    norm: float | None = None  # its L2 norm before clipping, if recorded
    scale: float = 1.0  # the clip scale it was folded with


class Ledger:
    def __init__(self, path: str | Path) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(updates)")}
        for name, kind in ADDED_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE updates ADD COLUMN {name} {kind}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def lookup(self, device: str, seq: int) -> Record | None:
        """The recorded outcome of (device, seq), or None if it is new.

        A seq at or below the device's largest pruned one was settled long
        ago, one way or the other: it reads as rejected, 'expired'.
        """
        with self._lock:
            row = self._db.execute("SELECT state, reason FROM updates WHERE device = ? AND "
                                   "seq = ?", (device, seq)).fetchone()
            if row is not None:
                return Record(device, seq, row[0], row[1])
            mark = self._db.execute("SELECT pruned_through FROM devices WHERE device = ?",
                                    (device,)).fetchone()
        if mark is not None and mark[0] is not None and seq <= mark[0]:
            return Record(device, seq, REJECTED, "expired")
        return None

    def _record(self, db: sqlite3.Connection, device: str, seq: int, **columns: object) -> None:
        names = ", ".join(["device", "seq", *columns])
        marks = ", ".join("?" * (2 + len(columns)))
        db.execute(f"INSERT INTO updates ({names}) VALUES ({marks})",
                   (device, seq, *columns.values()))
        db.execute("INSERT OR IGNORE INTO devices (device) VALUES (?)", (device,))

    def reject(self, device: str, seq: int, reason: str, norm: float | None = None) -> None:
        with self._transaction() as db:
            self._record(db, device, seq, state=REJECTED, reason=reason, received=time.time(),
                         norm=norm)

    def accept(self, device: str, seq: int, *, version: int, staleness: int, num_samples: int,
               payload: bytes, norm: float | None = None, scale: float = 1.0) -> None:
        """Record an update as buffered for `version`, keeping its payload until then."""
        with self._transaction() as db:
            self._record(db, device, seq, state=BUFFERED, received=time.time(), version=version,
                         staleness=staleness, num_samples=num_samples, payload=payload,
                         norm=norm, scale=scale)

    def buffered(self) -> list[Buffered]:
        """Accepted updates not yet in a stored version, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT device, seq, received, version, staleness, num_samples, payload, norm, "
                "COALESCE(scale, 1.0) FROM updates WHERE state = ? ORDER BY received",
                (BUFFERED,)).fetchall()
        return [Buffered(d, s, r, v, st, n, bytes(p), nm, sc)
                for d, s, r, v, st, n, p, nm, sc in rows]

    def recent_norms(self, count: int) -> list[float]:
        """The recorded norms of the `count` latest updates, oldest first.

        Pruned rows are gone: after a quiet spell longer than the retention the
        history starts again.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT norm FROM (SELECT norm, received FROM updates WHERE norm IS NOT NULL "
                "ORDER BY received DESC LIMIT ?) ORDER BY received", (count,)).fetchall()
        return [float(n) for (n,) in rows]

    def folded_into(self, version: int) -> int:
        """Mark every buffered update headed for `version` as part of it; drop payloads."""
        with self._transaction() as db:
            return db.execute("UPDATE updates SET state = ?, payload = NULL WHERE state = ? "
                              "AND version <= ?", (FOLDED, BUFFERED, version)).rowcount

    def settle_rejected(self, device: str, seq: int, reason: str) -> None:
        """A buffered update that cannot be folded again after a restart."""
        with self._transaction() as db:
            db.execute("UPDATE updates SET state = ?, reason = ?, payload = NULL WHERE "
                       "device = ? AND seq = ?", (REJECTED, reason, device, seq))

    def discard_buffer(self, reason: str) -> int:
        """A flush that could not make a version: its updates are rejected, not retried."""
        with self._transaction() as db:
            return db.execute("UPDATE updates SET state = ?, reason = ?, payload = NULL "
                              "WHERE state = ?", (REJECTED, reason, BUFFERED)).rowcount

    def prune(self, older_than_s: float) -> int:
        """Forget settled records older than the retention (marks stay)."""
        cutoff = time.time() - older_than_s
        with self._transaction() as db:
            db.execute("""
                UPDATE devices SET pruned_through = (
                    SELECT MAX(COALESCE(devices.pruned_through, -1), MAX(u.seq)) FROM updates u
                    WHERE u.device = devices.device AND u.state != ? AND u.received < ?)
                WHERE device IN (SELECT device FROM updates WHERE state != ? AND received < ?)
                """, (BUFFERED, cutoff, BUFFERED, cutoff))
            return db.execute("DELETE FROM updates WHERE state != ? AND received < ?",
                              (BUFFERED, cutoff)).rowcount

    def counts(self) -> dict[str, int]:
        """Records per state, and rejections per reason as 'rejected:<reason>'."""
        with self._lock:
            rows = self._db.execute("SELECT state, reason, COUNT(*) FROM updates "
                                    "GROUP BY state, reason").fetchall()
        out: dict[str, int] = {}
        for state, reason, count in rows:
            out[state] = out.get(state, 0) + count
            if state == REJECTED:
                out[f"{REJECTED}:{reason}"] = count
        return out

    def devices(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM devices").fetchone()[0])
