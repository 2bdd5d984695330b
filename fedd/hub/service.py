"""The hub: verify updates, fold them FedBuff-style, publish new versions.

`HubCore` holds the logic with no MQTT in it (so tests drive it directly):
each payload is decoded strictly, checked against the model and the device's
history, and folded into the buffer or rejected with a counted reason.
`HubService` connects it to the broker through `fedd.link`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedd import topics
from fedd.config import AggregationConfig, HubConfig
from fedd.hub import robust
from fedd.hub.aggregate import FedBuff, apply_delta
from fedd.hub.ledger import REJECTED, Ledger
from fedd.hub.models import ModelStore
from fedd.hub.trust import FleetTrust, UpdateRefused
from fedd.link import Link, LinkDown, PublishRejected
from fedd.model import ModelSpec, TrainableModel, all_finite
from fedd.pipeline import Decoded, DecodeError
from fedd.service import Notifier, log_fields
from fedd.trust.messages import unseal
from fedd.wire import (
    ACK_ACCEPTED,
    ACK_REJECTED,
    Ack,
    GlobalModel,
    ModelUpdate,
    WireError,
    payload_digest,
)

log = logging.getLogger(__name__)


PAYLOAD_REASON_PREFIX = "payload-"  # + a fedd.pipeline.REASONS code: a part's payload
ACK_PUBLISH_TIMEOUT_S = 5.0
CHALLENGE_CHECK_S = 1.0


class Rejected(Exception):
    """An update the hub will not fold in; `reason` is a counted code."""

    def __init__(self, reason: str, detail: str, norm: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.norm = norm  # the update's norm, if it was screened (fedd.hub.robust)


@dataclass(frozen=True)
class Receipt:
    """What became of one update: the content of its acknowledgement."""

    device: str
    seq: int | None  # None: the update could not be read
    outcome: str  # wire.ACK_ACCEPTED or wire.ACK_REJECTED
    reason: str | None = None
    duplicate: bool = False
    staleness: int | None = None
    weight: float | None = None


def _rule(aggregation: AggregationConfig) -> dict[str, Any]:
    """The FedBuff settings of an aggregation config, as keyword arguments."""
    return {"buffer_size": aggregation.buffer_size, "max_wait_s": aggregation.max_wait_s,
            "quorum": aggregation.quorum, "staleness_exponent": aggregation.staleness_exponent}


def _buffer(config: HubConfig) -> FedBuff:
    """An empty buffer with the config's FedBuff rule and robust rule (its reducer)."""
    return FedBuff(**_rule(config.aggregation), reducer=robust.reducer_for(config.robust))


class HubCore:
    """Decode, verify and fold updates exactly once; cut new global versions."""

    def __init__(self, config: HubConfig, spec: ModelSpec, store: ModelStore,
                 ledger: Ledger, trust: FleetTrust | None = None) -> None:
        self.config = config
        self.spec = spec
        self.store = store
        self.ledger = ledger
        self.trust = trust
        self.current = store.latest() or self._initial_version()
        self.buffer = _buffer(config)
        # The norm history is rebuilt from the ledger: the norms of the latest updates.
        self.screen = robust.NormScreen.from_config(
            config.robust, norms=ledger.recent_norms(config.robust.norm_history))
        self.accepted = 0
        self.duplicates = 0
        self.rejected: Counter[str] = Counter()
        self._resume()

    def _initial_version(self) -> GlobalModel:
        """Version 0 is the shipped model's initial weights."""
        parts = TrainableModel(self.spec).get_parts()
        model = GlobalModel(version=0, parent=None, model=self.spec.name,
                            model_sha256=self.spec.sha256, created=time.time(),
                            contributors=0, mean_staleness=0.0, parts=parts)
        self.store.save(model)
        return model

    def _resume(self) -> None:
        """Rebuild the buffer a previous run left: its updates were acknowledged."""
        settled = self.ledger.folded_into(self.current.version)
        if settled:
            log.info("%d buffered updates were already in version %d", settled,
                     self.current.version)
        wall, mono = time.time(), time.monotonic()
        for row in self.ledger.buffered():
            try:
                body, _ = unseal(row.payload, max_body=self.config.limits.max_update_bytes)
                update = ModelUpdate.decode(body, max_bytes=self.config.limits.max_update_bytes,
                                            device=row.device, model=self.spec)
                decoded = self._decode_parts(update)
            except (WireError, Rejected) as exc:
                reason = getattr(exc, "reason", "internal-error")
                self.ledger.settle_rejected(row.device, row.seq, reason)
                log.error("buffered update %s seq %d cannot be folded again: %s", row.device,
                          row.seq, exc)
                continue
            self.buffer.fold(decoded, num_samples=row.num_samples, staleness=row.staleness,
                             scale=row.scale, now=mono - (wall - row.received))
        if len(self.buffer):
            log.info("resumed a buffer of %d acknowledged updates", len(self.buffer))

    def reconfigure(self, config: HubConfig) -> None:
        """Apply a reloaded config; buffered updates are kept."""
        self.buffer.configure(**_rule(config.aggregation))
        self.screen.configure(config.robust)
        new_rule = (config.robust.rule, config.robust.trim) != (self.config.robust.rule,
                                                                self.config.robust.trim)
        self.config = config
        if new_rule:  # sums cannot become rows or back: fold the buffered payloads again
            self.buffer = _buffer(config)
            self._resume()

    def receive(self, topic: str, payload: bytes, now: float | None = None) -> Receipt:
        """Record and fold one update, or record why not; the receipt is its acknowledgement.

        Raises Rejected (counted) only for a payload without a readable
        (device, seq): the service acknowledges that one by its digest.
        """
        device = topics.device_of(topic)
        limit = self.config.limits.max_update_bytes
        try:
            # The signature is checked before a byte of the body is parsed.
            body = payload if self.trust is None else self.trust.open_update(device, payload,
                                                                              limit)
            update = ModelUpdate.decode(body, max_bytes=limit, device=device, model=self.spec)
        except (WireError, UpdateRefused) as exc:
            self.rejected[exc.reason] += 1
            raise Rejected(exc.reason, str(exc)) from None
        record = self.ledger.lookup(device, update.seq)
        if record is not None:
            self.duplicates += 1
            return Receipt(device, update.seq,
                           ACK_REJECTED if record.state == REJECTED else ACK_ACCEPTED,
                           record.reason if record.state == REJECTED else None, duplicate=True)
        try:
            if update.device != device:
                raise Rejected("device-mismatch", f"{update.device} published on {topic}")
            if self.trust is not None:
                decision = self.trust.decide(device, time.time())
                if not decision.accept:
                    raise Rejected(f"untrusted-{decision.reason}",
                                   f"{device} is not trusted (trust.mode require)")
            staleness = self._staleness(update)
            decoded = self._decode_parts(update)
            verdict = self._screen(decoded)
        except Rejected as exc:
            self.rejected[exc.reason] += 1
            self.ledger.reject(device, update.seq, exc.reason, norm=exc.norm)
            log.warning("rejected update %s seq %d: %s", device, update.seq, exc,
                        extra=log_fields(device=device, update_seq=update.seq))
            return Receipt(device, update.seq, ACK_REJECTED, exc.reason)
        # Durable before it counts: a crash after this commit rebuilds the same buffer.
        self.ledger.accept(device, update.seq, version=self.current.version + 1,
                           staleness=staleness, num_samples=update.num_samples, payload=payload,
                           norm=verdict.norm, scale=verdict.scale)
        self.screen.admit(verdict)
        weight = self.buffer.fold(decoded, num_samples=update.num_samples,
                                  staleness=staleness, scale=verdict.scale, now=now)
        self.accepted += 1
        return Receipt(device, update.seq, ACK_ACCEPTED, staleness=staleness, weight=weight)

    def _staleness(self, update: ModelUpdate) -> int:
        if update.model != self.spec.name:
            raise Rejected("wrong-model", f"{update.model} is not {self.spec.name}")
        unknown = sorted(set(update.parts) - set(self.spec.parts))
        if unknown:
            # A strategy may share only some parts (fedper: the body), never unknown ones.
            raise Rejected("wrong-shape", f"parts {unknown} are not in {sorted(self.spec.parts)}")
        staleness = self.current.version - update.base_version
        if staleness < 0:
            raise Rejected("future-base", f"base {update.base_version} > {self.current.version}")
        if staleness > self.config.aggregation.max_staleness:
            raise Rejected("too-stale", f"staleness {staleness}")
        return staleness

    def _decode_parts(self, update: ModelUpdate) -> dict[str, Decoded]:
        """Every part is checked before any is folded: a rejected update changes nothing."""
        decoded = {}
        for name in update.parts:
            try:
                decoded[name] = update.read_part(name, length=self.spec.parts[name])
            except DecodeError as exc:
                raise Rejected(PAYLOAD_REASON_PREFIX + exc.reason,
                               f"part {name}: {exc.detail}") from None
        return decoded

    def _screen(self, decoded: dict[str, Decoded]) -> robust.Verdict:
        """The update's norm against the fleet's recent ones: its clip scale, or Rejected."""
        try:
            return self.screen.check(decoded, model=self.current.parts)
        except robust.Outlier as exc:
            raise Rejected(exc.reason, str(exc), norm=exc.norm) from None

    def next_version(self) -> GlobalModel:
        """Flush the buffer into a new stored version."""
        flushed = self.buffer.flush()
        parts = apply_delta(self.current.parts, flushed.delta,
                            self.config.aggregation.server_learning_rate)
        if not all_finite(parts):
            self.rejected["non-finite-result"] += flushed.contributors
            self.ledger.discard_buffer("non-finite-result")
            raise Rejected("non-finite-result",
                           f"{flushed.contributors} updates would overflow the weights")
        model = GlobalModel(version=self.current.version + 1, parent=self.current.version,
                            model=self.spec.name, model_sha256=self.spec.sha256,
                            created=time.time(), contributors=flushed.contributors,
                            mean_staleness=flushed.mean_staleness, parts=parts)
        self.store.save(model)
        self.ledger.folded_into(model.version)
        self.ledger.prune(self.config.ledger.retention_days * 86400)
        self.current = model
        return model

    def status(self) -> dict[str, object]:
        """Counters of this run, and the ledger's all-time records per state."""
        return {"version": self.current.version, "digest": self.current.digest,
                "buffered": len(self.buffer), "accepted": self.accepted,
                "duplicates": self.duplicates, "rejected": dict(self.rejected),
                "robust": {**self.screen.measurements(), "rule": self.config.robust.rule,
                           "buffer_bytes": self.buffer.reducer.nbytes},
                "ledger": self.ledger.counts(), "devices": self.ledger.devices(),
                "trust": None if self.trust is None else self.trust.status(time.time()),
                "time": time.time()}


class HubService:
    """Runs a HubCore against the broker until asked to stop."""

    def __init__(self, config: HubConfig, notifier: Notifier) -> None:
        self.config = config
        self.notifier = notifier
        state = Path(config.state_dir)
        spec = ModelSpec.from_manifest(config.model.manifest, config.model.name)
        trust = None
        if config.trust.mode != "off" or config.trust.require_signatures:
            trust = FleetTrust(config.trust)
        self.core = HubCore(config, spec, ModelStore(state / "models"),
                            Ledger(state / "ledger.sqlite"), trust)
        self.status_path = state / "status.json"
        self._announced = (0, -1)  # (link connection count, version) last published
        self._status_written = 0.0
        self._status_dirty = True
        self._next_challenge_check = 0.0

    def reload(self, config: HubConfig) -> None:
        """Apply aggregation, robust, limits and log level; the rest needs a restart."""
        fixed = ("fleet", "state_dir", "share_group", "broker", "model", "trust")
        changed = [k for k in fixed if getattr(config, k) != getattr(self.config, k)]
        if changed:
            log.warning("reload: %s change(s) need a restart; applying the rest",
                        ", ".join(changed))
            config = dataclasses.replace(config, **{k: getattr(self.config, k) for k in changed})
        self.core.reconfigure(config)
        self.config = config
        logging.getLogger().setLevel(config.log_level.upper())
        log.info("reloaded configuration")

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        subscriptions = [(topics.update_shared(cfg.fleet, cfg.share_group), 1)]
        if cfg.trust.mode != "off":
            subscriptions.append((topics.attests(cfg.fleet), 1))
        link = Link.from_config(cfg.broker, f"fedd-hub-{cfg.fleet}-{cfg.share_group}",
                                subscriptions=subscriptions)
        attest_prefix = topics.attest(cfg.fleet, "")
        async with link:
            self.notifier.ready()
            log.info("hub for fleet %s at version %d", cfg.fleet, self.core.current.version)
            while not stop.is_set():
                message = await link.next_message(timeout=0.2)
                if message is not None and message.topic.startswith(attest_prefix):
                    await self._attest(link, message.topic, message.payload)
                elif message is not None:
                    await self._receive(link, message.topic, message.payload)
                await self._challenge(link)
                if self.core.buffer.ready():
                    try:
                        model = self.core.next_version()
                    except Rejected as exc:
                        log.error("dropped a buffer flush: %s", exc)
                        continue
                    log.info("version %d: %d updates, mean staleness %.2f", model.version,
                             model.contributors, model.mean_staleness,
                             extra=log_fields(model_version=model.version))
                    self.notifier.status(f"version {model.version}, "
                                         f"{self.core.accepted} updates accepted")
                    self._write_status(force=True)
                await self._announce(link)
                self._write_status()
        self._write_status(force=True)
        self.core.ledger.close()
        log.info("hub stopped at version %d", self.core.current.version)

    async def _receive(self, link: Link, topic: str, payload: bytes) -> None:
        """Settle one update, then acknowledge it to its device (never before the record)."""
        self._status_dirty = True
        try:
            receipt = self.core.receive(topic, payload)
        except Rejected as exc:
            # No seq to name it by: the ack names the bytes, so the device stops resending.
            log.warning("rejected an unreadable update on %s: %s", topic, exc,
                        extra=log_fields(device=topics.device_of(topic)))
            receipt = Receipt(topics.device_of(topic), None, ACK_REJECTED, exc.reason)
        except Exception:  # a decoder bug must cost one update, never the hub
            self.core.rejected["internal-error"] += 1
            log.exception("internal error on an update from %s; dropped it", topic)
            receipt = Receipt(topics.device_of(topic), None, ACK_REJECTED, "internal-error")
        if receipt.outcome == ACK_ACCEPTED and not receipt.duplicate:
            log.debug("folded %s seq %d (staleness %d, weight %.1f)", receipt.device,
                      receipt.seq, receipt.staleness, receipt.weight,
                      extra=log_fields(device=receipt.device, update_seq=receipt.seq))
        ack = Ack(device=receipt.device, seq=receipt.seq, digest=payload_digest(payload),
                  outcome=receipt.outcome,
                  reason=receipt.reason, duplicate=receipt.duplicate,
                  version=self.core.current.version, time=time.time())
        try:
            await link.publish(topics.ack(self.config.fleet, receipt.device), ack.encode(),
                               qos=1, timeout=ACK_PUBLISH_TIMEOUT_S)
        except (LinkDown, PublishRejected) as exc:
            # The device sends the update again; the ledger makes that a duplicate.
            log.info("could not acknowledge %s seq %s: %s", receipt.device, receipt.seq, exc)

    async def _attest(self, link: Link, topic: str, payload: bytes) -> None:
        """A device's hello or quote: answer with a challenge or the verdict."""
        assert self.core.trust is not None
        device = topics.device_of(topic)
        reply = self.core.trust.on_attest(device, payload)
        if reply is not None:
            await self._to_device(link, device, reply.encode())
        self._status_dirty = True

    async def _challenge(self, link: Link) -> None:
        """Challenge the enrolled devices whose trust is missing or about to end."""
        trust = self.core.trust
        now = time.time()
        if trust is None or not link.connected.is_set() or now < self._next_challenge_check:
            return
        self._next_challenge_check = now + CHALLENGE_CHECK_S
        for device, challenge in trust.due_challenges(now):
            await self._to_device(link, device, challenge.encode())

    async def _to_device(self, link: Link, device: str, payload: bytes) -> None:
        try:
            await link.publish(topics.attest_nonce(self.config.fleet, device), payload, qos=1,
                               timeout=ACK_PUBLISH_TIMEOUT_S)
        except (LinkDown, PublishRejected) as exc:
            log.info("could not send %s its attestation message: %s", device, exc)

    async def _announce(self, link: Link) -> None:
        """Publish the current version retained, again after every reconnect."""
        state = (link.connections, self.core.current.version)
        if not link.connected.is_set() or state == self._announced:
            return
        current = self.core.current
        try:
            await link.publish(topics.model_current(self.config.fleet), current.encode(),
                               qos=1, retain=True)
        except LinkDown as exc:
            log.warning("could not publish version %d yet: %s", current.version, exc)
            return
        self._announced = state

    def _write_status(self, *, force: bool = False) -> None:
        """The status file for `fedd status`, at most once a second unless forced."""
        now = time.monotonic()
        if not force and (not self._status_dirty or now - self._status_written < 1.0):
            return
        self._status_written, self._status_dirty = now, False
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.core.status(), indent=1))
        os.replace(tmp, self.status_path)
