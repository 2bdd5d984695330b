"""Which devices the hub trusts now, and what the fleet's mode makes of an update from each.

A device that passes a challenge (`fedd.trust.verify.verify_quote`) is
trusted for ``window_s`` seconds; a failed challenge ends its trust at once
(the failure's reason is kept); a window that runs out without a new pass
becomes ``trust-expired``. The hub re-challenges ``renew_before_s`` before the
window ends, so a device that keeps answering never has a gap, and waits
``retry_s`` between challenges to a device that does not answer.

The fleet's mode decides what happens to an update:

- ``require``: only trusted devices' updates are accepted; others are
  rejected with the reason they are not trusted;
- ``prefer``: every update is accepted; an untrusted device's is flagged
  (for the metrics) with the reason;
- ``off``: every update is accepted, nothing is flagged or challenged.

A device without a TPM answers ``no-tpm`` and is treated by the mode like any
other untrusted device: rejected under require, flagged under prefer.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

from fedd.trust.reasons import Reason, Verdict

__all__ = ["Decision", "Mode", "TrustState"]


class Mode(enum.StrEnum):
    REQUIRE = "require"
    PREFER = "prefer"
    OFF = "off"


@dataclass(frozen=True)
class Decision:
    """What to do with one update: accept it or not, flag it or not, and why."""

    accept: bool
    flagged: bool
    reason: Reason | None


@dataclass
class _Device:
    trusted_until: float | None = None
    last_reason: Reason | None = None
    last_challenge: float | None = None


class TrustState:
    """Per-device trust windows under one fleet mode; thread-safe."""

    def __init__(self, *, mode: Mode | str, window_s: float,
                 renew_before_s: float | None = None, retry_s: float = 30.0) -> None:
        try:
            self.mode = Mode(mode)
        except ValueError:
            raise ValueError(f"mode must be one of {', '.join(Mode)}, got {mode!r}") from None
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0 seconds, got {window_s}")
        renew = window_s / 10 if renew_before_s is None else renew_before_s
        if not 0 <= renew < window_s:
            raise ValueError(f"renew_before_s must be >= 0 and below window_s ({window_s}), "
                             f"got {renew}")
        if not retry_s > 0:
            raise ValueError(f"retry_s must be > 0 seconds, got {retry_s}")
        self.window_s = float(window_s)
        self.renew_before_s = float(renew)
        self.retry_s = float(retry_s)
        self._devices: dict[str, _Device] = {}
        self._lock = threading.Lock()

    def record(self, verdict: Verdict) -> None:
        """Take a verdict: a pass opens a window from ``verdict.at``, a refusal ends trust."""
        with self._lock:
            device = self._devices.setdefault(verdict.device_id, _Device())
            if verdict.ok:
                device.trusted_until = verdict.at + self.window_s
                device.last_reason = None
            else:
                device.trusted_until = None
                device.last_reason = verdict.reason

    def challenged(self, device_id: str, now: float) -> None:
        """Note that a nonce was just sent to this device (for ``retry_s``)."""
        with self._lock:
            self._devices.setdefault(device_id, _Device()).last_challenge = now

    def forget(self, device_id: str) -> None:
        """Drop everything about a device (e.g. its enrollment was removed)."""
        with self._lock:
            self._devices.pop(device_id, None)

    def trusted_until(self, device_id: str) -> float | None:
        with self._lock:
            device = self._devices.get(device_id)
            return None if device is None else device.trusted_until

    def _untrusted_reason(self, device_id: str, now: float) -> Reason | None:
        """None when the device is trusted at ``now``, else why not."""
        device = self._devices.get(device_id)
        if device is None:
            return Reason.NEVER_ATTESTED
        if device.trusted_until is not None:
            return None if now < device.trusted_until else Reason.TRUST_EXPIRED
        return device.last_reason or Reason.NEVER_ATTESTED

    def trusted(self, device_id: str, now: float) -> bool:
        with self._lock:
            return self._untrusted_reason(device_id, now) is None

    def needs_challenge(self, device_id: str, now: float) -> bool:
        """Whether the hub should send this device a nonce now (never under mode off)."""
        if self.mode is Mode.OFF:
            return False
        with self._lock:
            device = self._devices.get(device_id)
            if device is None:
                return True
            if device.last_challenge is not None and now - device.last_challenge < self.retry_s:
                return False
            return (device.trusted_until is None
                    or now >= device.trusted_until - self.renew_before_s)

    def decide(self, device_id: str, now: float) -> Decision:
        """Accept, reject or flag an update from ``device_id`` that arrived at ``now``."""
        if self.mode is Mode.OFF:
            return Decision(accept=True, flagged=False, reason=None)
        with self._lock:
            reason = self._untrusted_reason(device_id, now)
        if reason is None:
            return Decision(accept=True, flagged=False, reason=None)
        if self.mode is Mode.REQUIRE:
            return Decision(accept=False, flagged=False, reason=reason)
        return Decision(accept=True, flagged=True, reason=reason)

    def counts(self, now: float) -> dict[str, int]:
        """Devices known to the state, trusted and not (for metrics)."""
        with self._lock:
            trusted = sum(self._untrusted_reason(d, now) is None for d in self._devices)
            return {"trusted": trusted, "untrusted": len(self._devices) - trusted}
