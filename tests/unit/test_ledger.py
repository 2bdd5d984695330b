"""The hub's ledger (fedd/hub/ledger.py) on a real SQLite file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedd.hub.ledger import BUFFERED, FOLDED, REJECTED, Ledger, Record


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.sqlite")


def accept(ledger: Ledger, device: str, seq: int, version: int = 1) -> None:
    ledger.accept(device, seq, version=version, staleness=0, num_samples=10,
                  payload=f"{device}/{seq}".encode())


def test_outcomes_survive_reopening(ledger: Ledger, tmp_path: Path) -> None:
    accept(ledger, "a", 0)
    ledger.reject("a", 1, "too-stale")
    ledger.close()
    again = Ledger(tmp_path / "ledger.sqlite")
    assert again.lookup("a", 0) == Record("a", 0, BUFFERED, None)
    assert again.lookup("a", 1) == Record("a", 1, REJECTED, "too-stale")
    assert again.lookup("a", 2) is None and again.lookup("b", 0) is None
    assert [(b.device, b.seq, b.payload) for b in again.buffered()] == [("a", 0, b"a/0")]
    assert again.counts() == {BUFFERED: 1, REJECTED: 1, "rejected:too-stale": 1}
    assert again.devices() == 1


def test_a_seq_is_recorded_once(ledger: Ledger) -> None:
    accept(ledger, "a", 0)
    with pytest.raises(Exception, match="UNIQUE"):
        ledger.reject("a", 0, "duplicate")
    assert ledger.lookup("a", 0).state == BUFFERED  # the failed insert changed nothing


def test_folding_settles_only_the_buffer_headed_for_that_version(ledger: Ledger) -> None:
    accept(ledger, "a", 0, version=1)
    accept(ledger, "b", 0, version=2)
    assert ledger.folded_into(1) == 1
    assert ledger.lookup("a", 0).state == FOLDED
    assert [b.device for b in ledger.buffered()] == ["b"]


def test_a_discarded_buffer_is_rejected_with_its_reason(ledger: Ledger) -> None:
    accept(ledger, "a", 0)
    accept(ledger, "b", 3)
    assert ledger.discard_buffer("non-finite-result") == 2
    assert ledger.buffered() == []
    assert ledger.lookup("b", 3) == Record("b", 3, REJECTED, "non-finite-result")


def test_pruned_records_are_still_recognized(ledger: Ledger,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    accept(ledger, "a", 0)
    ledger.folded_into(1)
    ledger.reject("a", 1, "too-stale")
    accept(ledger, "a", 2)  # buffered: never pruned, its payload is still needed
    later = time.time() + 10 * 86400
    monkeypatch.setattr(time, "time", lambda: later)
    assert ledger.prune(older_than_s=86400) == 2
    assert ledger.counts() == {BUFFERED: 1}
    # A resend of a pruned update is settled, not new; a seq never seen is new.
    assert ledger.lookup("a", 0) == Record("a", 0, REJECTED, "expired")
    assert ledger.lookup("a", 1) == Record("a", 1, REJECTED, "expired")
    assert ledger.lookup("a", 2).state == BUFFERED
    assert ledger.lookup("a", 3) is None
    assert ledger.lookup("b", 0) is None
    # Pruning again with nothing old keeps the mark where it was.
    assert ledger.prune(older_than_s=86400) == 0
    assert ledger.lookup("a", 1).reason == "expired"
