"""The hub's challenge nonces: fresh, random, bound to one device, single use, short-lived.

`NonceBook.issue` makes a nonce for one device; `NonceBook.redeem` accepts it
once, from that device, before it expires. A replayed nonce (already
redeemed) or one never issued to this device is ``nonce-unknown``; one that
expired is ``nonce-expired`` while the book still remembers it (for another
``ttl_s`` after expiry, then it is forgotten and becomes unknown).

Bounded: at most ``max_per_device`` outstanding nonces per device (issuing
more forgets the oldest) and ``max_devices`` devices; a full book first
forgets everything stale and then refuses to issue (`NonceBookFull`).
Times are the caller's ``now`` (seconds), so tests need no sleeping.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from fedd.trust.reasons import Reason

__all__ = ["NONCE_BYTES", "NonceBook", "NonceBookFull"]

NONCE_BYTES = 32


class NonceBookFull(RuntimeError):
    """More devices hold outstanding nonces than the book may remember."""


@dataclass
class _Issued:
    nonce: bytes
    expires: float


class NonceBook:
    """Single-use nonces per device with an expiry; thread-safe."""

    def __init__(self, *, ttl_s: float = 60.0, max_per_device: int = 4,
                 max_devices: int = 100_000,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0 seconds, got {ttl_s}")
        if max_per_device < 1 or max_devices < 1:
            raise ValueError("max_per_device and max_devices must be at least 1")
        self.ttl_s = float(ttl_s)
        self.max_per_device = max_per_device
        self.max_devices = max_devices
        self._random = random
        self._book: dict[str, list[_Issued]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many nonces the book remembers (outstanding or recently expired)."""
        with self._lock:
            return sum(len(entries) for entries in self._book.values())

    def _prune(self, device_id: str, now: float) -> list[_Issued]:
        """Forget this device's nonces that expired more than ttl_s ago."""
        entries = [e for e in self._book.get(device_id, ()) if now < e.expires + self.ttl_s]
        if entries:
            self._book[device_id] = entries
        else:
            self._book.pop(device_id, None)
        return entries

    def purge(self, now: float) -> None:
        """Forget every stale nonce (the hub may call this periodically)."""
        with self._lock:
            for device_id in list(self._book):
                self._prune(device_id, now)

    def issue(self, device_id: str, now: float) -> bytes:
        """A fresh nonce for ``device_id``, valid until ``now + ttl_s``."""
        with self._lock:
            entries = self._prune(device_id, now)
            if not entries and len(self._book) >= self.max_devices:
                for other in list(self._book):
                    self._prune(other, now)
                if len(self._book) >= self.max_devices:
                    raise NonceBookFull(f"{len(self._book)} devices hold outstanding nonces "
                                        f"(max_devices={self.max_devices})")
            nonce = self._random(NONCE_BYTES)
            if len(nonce) != NONCE_BYTES:
                raise RuntimeError(f"the random source gave {len(nonce)} bytes, "
                                   f"not {NONCE_BYTES}")
            entries.append(_Issued(nonce, now + self.ttl_s))
            self._book[device_id] = entries[-self.max_per_device:]
            return nonce

    def redeem(self, device_id: str, nonce: bytes, now: float) -> Reason | None:
        """Use ``nonce`` for ``device_id`` once: None if fresh, else why not.

        A fresh nonce is forgotten as it is redeemed (a second use is a
        replay), and so is an expired one after it was reported once.
        """
        with self._lock:
            entries = self._prune(device_id, now)
            for entry in entries:
                if entry.nonce == nonce:
                    entries.remove(entry)
                    if not entries:
                        self._book.pop(device_id, None)
                    return None if now < entry.expires else Reason.NONCE_EXPIRED
            return Reason.NONCE_UNKNOWN
