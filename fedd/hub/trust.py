"""The hub's part of fleet trust: signatures on updates, challenges, verdicts.

`FleetTrust` has no MQTT in it: HubService feeds it what arrives on
``attest/+`` and asks it which devices to challenge; HubCore asks it whether
an update's signature holds (before decoding the body) and whether its
device may shape the model now (`trust.mode`). Trust is per hub run: a
restarted hub challenges every enrolled device again at once.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from fedd.config import FleetTrustConfig
from fedd.trust.enrollments import EnrollmentError, EnrollmentStore
from fedd.trust.messages import Challenge, Hello, TrustVerdict, decode_attest, unseal
from fedd.trust.nonces import NonceBook, NonceBookFull
from fedd.trust.policy import PcrPolicy
from fedd.trust.reasons import Reason, Verdict
from fedd.trust.state import Decision, TrustState
from fedd.wire import WireError

log = logging.getLogger(__name__)

ENROLLED_REFRESH_S = 30.0  # how often the list of enrolled devices is read again


class UpdateRefused(Exception):
    """A signature problem: the update is refused before its body is read (no seq known)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = str(reason)


class FleetTrust:
    def __init__(self, config: FleetTrustConfig) -> None:
        self.config = config
        self.enrollments = EnrollmentStore(config.enrollments)
        self.policy = None if config.pcr_policy is None else PcrPolicy.load(config.pcr_policy)
        self.nonces = NonceBook(ttl_s=config.nonce_ttl_s)
        self.state = TrustState(mode=config.mode, window_s=config.window_s)
        self.verdicts: Counter[str] = Counter()
        self.flagged = 0  # updates folded from untrusted devices (mode prefer)
        self._enrolled: list[str] = []
        self._enrolled_at = -ENROLLED_REFRESH_S

    # updates

    def open_update(self, device: str, payload: bytes, max_body: int) -> bytes:
        """The update's body once its envelope and signature are checked.

        An unsigned update passes only when signatures are not required; a
        signed one is checked whenever its device is enrolled.
        """
        try:
            body, signature = unseal(payload, max_body=max_body)
        except WireError as exc:
            raise UpdateRefused(exc.reason, exc.detail) from None
        if signature is None:
            if self.config.require_signatures:
                raise UpdateRefused("unsigned", f"{device} sent an update without a signature")
            return body
        try:
            enrollment = self.enrollments.get(device)
        except EnrollmentError as exc:
            raise UpdateRefused(Reason.NOT_ENROLLED, f"unusable enrollment: {exc}") from None
        if enrollment is None:
            if self.config.require_signatures:
                raise UpdateRefused(Reason.NOT_ENROLLED, f"{device} is not enrolled")
            return body
        reason = enrollment.verify_update(body, signature)
        if reason is not None:
            raise UpdateRefused(reason, f"the signature is not {device}'s")
        return body

    def decide(self, device: str, now: float) -> Decision:
        decision = self.state.decide(device, now)
        if decision.accept and decision.flagged:
            self.flagged += 1
        return decision

    # attestation

    def due_challenges(self, now: float) -> list[tuple[str, Challenge]]:
        """Enrolled devices to challenge now (new, untrusted, or trust about to end)."""
        if self.config.mode == "off":
            return []
        if now - self._enrolled_at >= ENROLLED_REFRESH_S:
            self._enrolled, self._enrolled_at = self.enrollments.device_ids(), now
        return [(device, challenge) for device in self._enrolled
                if self.state.needs_challenge(device, now)
                and (challenge := self._challenge(device, now)) is not None]

    def _challenge(self, device: str, now: float) -> Challenge | None:
        try:
            nonce = self.nonces.issue(device, now)
        except NonceBookFull:
            log.warning("too many open challenges; %s waits", device)
            return None
        self.state.challenged(device, now)
        return Challenge(nonce, now + self.config.nonce_ttl_s)

    def on_attest(self, device: str, payload: bytes,
                  now: float | None = None) -> Challenge | TrustVerdict | None:
        """What to send back to a device's attest message: a challenge, a verdict, or nothing."""
        now = time.time() if now is None else now
        if self.config.mode == "off":
            return None
        try:
            message = decode_attest(payload)
        except WireError as exc:
            return self._record(Verdict.refuse(device, Reason.MALFORMED, str(exc), now))
        if isinstance(message, Hello):
            if self.state.trusted(device, now) and not self.state.needs_challenge(device, now):
                return self._verdict(device, now, "trusted")
            return self._challenge(device, now)
        try:
            enrollment = self.enrollments.get(device)
        except EnrollmentError as exc:
            return self._record(Verdict.refuse(device, Reason.NOT_ENROLLED, str(exc), now))
        if enrollment is None:
            return self._record(Verdict.refuse(device, Reason.NOT_ENROLLED,
                                               "no enrollment record", now))
        from fedd.trust.verify import verify_quote  # tpm2-pytss: only where quotes arrive

        assert self.policy is not None  # the config demands one unless mode is off
        return self._record(verify_quote(enrollment, message, self.nonces, self.policy, now))

    def _record(self, verdict: Verdict) -> TrustVerdict:
        self.state.record(verdict)
        self.verdicts[verdict.reason or "trusted"] += 1
        if verdict.ok:
            log.info("%s attested: %s", verdict.device_id, verdict.detail)
        else:
            log.warning("%s not trusted: %s: %s", verdict.device_id, verdict.reason,
                        verdict.detail)
        return self._verdict(verdict.device_id, verdict.at, verdict.detail)

    def _verdict(self, device: str, now: float, detail: str) -> TrustVerdict:
        decision = self.state.decide(device, now)
        trusted = self.state.trusted(device, now)
        return TrustVerdict(trusted=trusted, reason=None if trusted else str(decision.reason),
                            detail=detail, until=self.state.trusted_until(device))

    def status(self, now: float) -> dict[str, object]:
        return {"mode": self.config.mode, **self.state.counts(now),
                "verdicts": dict(self.verdicts), "flagged_updates": self.flagged,
                "open_challenges": len(self.nonces)}
