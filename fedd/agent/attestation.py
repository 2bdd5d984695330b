"""The agent's part of fleet trust: measure itself, answer challenges, sign updates.

The TPM is touched only from the model worker thread (a quote is a blocking
call into the TSS), opened for each answer and closed after it, so the
agent holds no TPM session between challenges. tpm2-pytss is imported only
when `trust.tcti` names a TPM; a device without one answers every challenge
with "no TPM" and lets the hub's policy decide, never claiming trust.
"""

from __future__ import annotations

import logging
from pathlib import Path

import fedd
from fedd.config import DeviceTrustConfig, UnusableFileError
from fedd.trust.measure import agent_files, measurement_digest
from fedd.trust.messages import Challenge, TrustVerdict, encode_attestation, seal
from fedd.trust.quote import NoTpm

log = logging.getLogger(__name__)

NO_TPM_CONFIGURED = "no TPM configured (trust.tcti is null)"


class DeviceTrust:
    def __init__(self, config: DeviceTrustConfig, device_id: str, model: Path) -> None:
        self.config = config
        self.device_id = device_id
        self.model = model
        self._sign = None
        if config.signing_key is not None:
            # cryptography costs ~8 MiB of RSS: only for a device that signs.
            from fedd.trust import signing

            try:
                key = signing.load_key(config.signing_key)
            except signing.SigningKeyError as exc:
                raise UnusableFileError(f"trust.signing_key: {exc}") from None
            self._sign = lambda body: signing.sign_update(key, device_id, body)
        self.verdict: TrustVerdict | None = None

    def sign(self, body: bytes) -> bytes:
        """The update as published: sealed with its signature, or bare without a key."""
        return body if self._sign is None else seal(body, self._sign(body))

    def measure(self) -> None:
        """Reset the measurement PCR and extend it with this agent's code and model (worker)."""
        if self.config.tcti is None or self.config.measure_pcr is None:
            return
        from fedd.trust.tpm import TpmError, open_tpm  # tpm2-pytss: only with a TPM

        digest = measurement_digest(agent_files(Path(fedd.__file__).parent, [self.model]))
        tpm = open_tpm(self.config.tcti, ak_handle=self.config.ak_handle)
        if isinstance(tpm, NoTpm):
            log.warning("cannot measure the agent: %s", tpm.reason)
            return
        with tpm:
            try:
                value = tpm.measure(digest, self.config.measure_pcr)
            except TpmError as exc:
                log.warning("cannot measure the agent into PCR %d: %s",
                            self.config.measure_pcr, exc)
                return
        log.info("measured the agent into PCR %d: %s (the PCR policy must allow it)",
                 self.config.measure_pcr, value.hex())

    def answer(self, challenge: Challenge) -> bytes:
        """A quote over the configured PCRs with the hub's nonce, or why there is none (worker)."""
        if self.config.tcti is None:
            return encode_attestation(NoTpm(NO_TPM_CONFIGURED))
        from fedd.trust.tpm import answer_challenge  # tpm2-pytss: only with a TPM

        answer = answer_challenge(self.config.tcti, challenge.nonce, self.config.pcrs,
                                  ak_handle=self.config.ak_handle)
        if isinstance(answer, NoTpm):
            log.warning("answering the hub's challenge without a quote: %s", answer.reason)
        return encode_attestation(answer)

    def record(self, verdict: TrustVerdict) -> None:
        if verdict.trusted:
            log.info("the hub trusts this device (%s)", verdict.detail)
        else:
            log.warning("the hub does not trust this device: %s: %s", verdict.reason,
                        verdict.detail)
        self.verdict = verdict
