"""Full-jitter reconnection backoff (fedd.link.Backoff)."""

from __future__ import annotations

import random
import statistics

from fedd.link import Backoff


def test_ceiling_doubles_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(0.5, 8.0, rng=random.Random(1))
    ceilings = []
    for _ in range(7):
        ceilings.append(backoff.ceiling())
        delay = backoff.next_delay()
        assert 0.0 <= delay <= ceilings[-1]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    backoff.reset()
    assert backoff.ceiling() == 0.5


def test_a_long_outage_never_overflows() -> None:
    backoff = Backoff(1.0, 120.0, rng=random.Random(2))
    backoff.attempt = 10_000
    assert 0.0 <= backoff.next_delay() <= 120.0


def test_a_fleet_spreads_over_the_window_instead_of_reconnecting_in_lockstep() -> None:
    """30 devices that lost the broker together, 5 failed attempts each: their 6th
    retry times cover the window rather than bunching like plain exponential backoff."""
    firsts = []
    for device in range(30):
        backoff = Backoff(1.0, 60.0, rng=random.Random(device))
        firsts.append(sum(backoff.next_delay() for _ in range(6)))
    # Plain doubling would put all 30 at exactly 1+2+4+8+16+32 = 63 s.
    assert max(firsts) - min(firsts) > 20.0
    assert statistics.pstdev(firsts) > 5.0
    assert len({round(t, 3) for t in firsts}) == 30
