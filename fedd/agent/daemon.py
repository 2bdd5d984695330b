"""The agent daemon: sample, store, train, publish, listen, report.

Five tasks share one event loop: the sampler turns sensor chunks into
featurized windows in the store; the listener applies each new global
version (keeping the personal head) and scores it; the trainer decides when
a local round runs and queues its update in the durable outbox; the
publisher drains the outbox, deleting an update only after the hub's
acknowledgement on ack/<device> (resending it when none comes); the
reporter publishes heartbeats and writes the status file that `fedd status`
reads. Model work runs in a worker thread, one job
at a time, so the loop (and the systemd watchdog) stays responsive.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import random
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import psutil

from fedd import __version__, topics
from fedd.agent.attestation import DeviceTrust
from fedd.agent.budget import HourlyWindow, allowance, choose_level
from fedd.agent.delegates import CPU, choose_delegate
from fedd.agent.drift import DriftMonitor, DriftScore
from fedd.agent.features import model_inputs
from fedd.agent.learner import SCALER_KEYS, Diverged, Learner, Scores
from fedd.agent.readings import ReadingsReader
from fedd.agent.scheduler import Scheduler
from fedd.agent.sensors import open_source
from fedd.agent.store import FILENAME, AgentStore
from fedd.agent.windowing import Windower
from fedd.config import AgentConfig
from fedd.link import Link, LinkDown, PublishRejected, Will, publish_wire_bytes
from fedd.model import ModelSpec, TrainableModel
from fedd.pipeline import Pipeline
from fedd.service import Notifier, log_fields
from fedd.trust.messages import Hello, TrustVerdict, decode_from_hub
from fedd.wire import (
    ACK_ACCEPTED,
    ACK_REJECTED,
    TRIGGER_DRIFT,
    TRIGGER_VERSION,
    UPDATE_FORMAT_COMPACT,
    Ack,
    Drift,
    Evaluation,
    GlobalModel,
    Heartbeat,
    ModelUpdate,
    Status,
    WireError,
    encode_deltas,
    fold_deltas,
    payload_digest,
)

log = logging.getLogger(__name__)

MAX_MODEL_BYTES = 64 * 1024 * 1024
RETENTION_EVERY = 64
REPORT_TICK_S = 0.5  # how soon "online" follows a (re)connect
SCHEDULER_RECHECK_S = 60.0  # re-read the device at least this often while deferred
GOODPUT_ALPHA = 0.3  # weight of the newest acknowledged publish in the goodput EWMA
PUBLISH_TIMEOUT_S = 30.0  # an update's PUBLISH must be acknowledged by the broker in this
LINK_SHARE = 0.5  # of that time an update may take at the measured goodput
RESIDUAL_PREFIX = "residual_"  # + a part name: that part's error-feedback residual (store)


def _rounded(loss: float) -> float | None:
    """A loss for the status file (JSON has no NaN: a run that never started has none)."""
    return round(loss, 4) if np.isfinite(loss) else None


class _Stopping(Exception):
    """Raised inside the task group to end it when stop is requested."""


class Agent:
    def __init__(self, config: AgentConfig, notifier: Notifier) -> None:
        self.config = config
        self.notifier = notifier
        self.spec = ModelSpec.from_manifest(config.model.manifest, config.model.name)
        state_dir = Path(config.state_dir)
        self.store = AgentStore(state_dir / FILENAME, input_shape=self.spec.input_shape)
        self.inputs = model_inputs(self.spec.features)
        self._adopt_model_state()
        self.status_path = state_dir / "status.json"
        self.uplink = self._uplink(config.uplink.codec)
        carried = {name: self.store.get(RESIDUAL_PREFIX + name) for name in self.spec.parts}
        carried = {name: float(np.linalg.norm(r)) for name, r in carried.items()
                   if r is not None and r.size == self.spec.parts[name]}
        if carried:
            log.info("uplink %s; error-feedback residuals carried: %s", self.uplink.spec,
                     ", ".join(f"{name} |r|={norm:.6g}" for name, norm in sorted(carried.items())))
        self.trust = DeviceTrust(config.trust, config.device_id, self.spec.path)
        self.learner = Learner(self._load_model(config.inference.delegates), config.training,
                               strategy=config.training.strategy,
                               seed=zlib.crc32(config.device_id.encode()))
        if self.store.get("strategy", config.training.strategy) == config.training.strategy:
            self.learner.restore_state({k: self.store.get(k) for k in self.learner.state_keys()})
        else:
            log.warning("strategy changed from %s to %s: personal state starts afresh",
                        self.store.get("strategy"), config.training.strategy)
        self.readings = ReadingsReader(cpu_window_s=config.scheduler.cpu_window_s)
        self.scheduler = Scheduler.from_state(self.store.get("scheduler"), config.scheduler)
        self.source = open_source(config.sensor, config.window)
        self.windower = Windower(config.window.size, config.window.step)
        holdout = self.source.holdout()
        self.holdout = None if holdout is None else (
            self.inputs(holdout[0], self.source.rate_hz), holdout[1].astype(np.int32))
        drift = config.drift
        self.drift = DriftMonitor(self.spec.num_classes, recent=drift.recent_windows,
                                  min_windows=drift.min_windows)
        self.drift_score: DriftScore | None = None
        self.drift_reason: str | None = None  # set when drift asks for a round
        # Inputs the drift monitor has not seen yet; only the newest recent_windows matter.
        self._unscored: deque[np.ndarray] = deque(maxlen=drift.recent_windows)
        self.started = time.monotonic()
        self.training_now = False
        self.stream_ended = False
        self.decision = "waiting for the global model"
        self.evaluation: Scores | None = None
        self.last_update: dict[str, object] | None = self.store.get("last_update")
        self.updates_sent = int(self.store.get("updates_sent", 0))
        self.uplink_bytes = int(self.store.get("uplink_bytes", 0))
        # Bytes of acknowledged (or refused) update PUBLISHes in the last hour, and the
        # link's goodput (bytes/s from publish to PUBACK, an EWMA): both survive restarts.
        self.uplink_window = HourlyWindow.from_state(self.store.get("uplink_window"))
        self.goodput: float | None = self.store.get("goodput_bps")
        # Outcomes the hub acknowledged: accepted, and rejected per reason (all-time).
        self.acked = int(self.store.get("acked", 0))
        self.rejected_updates: dict[str, int] = self.store.get("rejected_updates", {})
        self.last_ack: dict[str, object] | None = self.store.get("last_ack")
        self._ack_arrived = asyncio.Event()
        self._jitter = random.Random()  # heartbeat spacing; unlike the learner's, not seeded
        self.last_trained_version: int | None = self.store.get("last_trained_version")
        self.labelled_at_last_round = int(self.store.get("labelled_at_last_round", 0))
        self.last_round_at = 0.0
        self._model_lock = asyncio.Lock()
        # One thread for all model work: training lowers its priority while it runs.
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self._wake_trainer = asyncio.Event()
        self._wake_publisher = asyncio.Event()
        self._link: Link | None = None
        self._job: asyncio.Future[object] | None = None

    def _adopt_model_state(self) -> None:
        """A state directory made for another model keeps its outbox, not its windows."""
        before = self.store.get("model")
        if before not in (None, self.spec.name):
            dropped = self.store.forget_windows()
            per_part = [prefix + part for part in self.spec.parts
                        for prefix in ("personal_", RESIDUAL_PREFIX)]
            self.store.forget(*per_part, *SCALER_KEYS, "last_trained_version",
                              "labelled_at_last_round", "sensor_cursor")
            log.warning("model changed from %s to %s: dropped %d stored windows and the "
                        "personal state made for it", before, self.spec.name, dropped)
        self.store.put(model=self.spec.name)

    def _uplink(self, codec: str) -> Pipeline:
        """The update pipeline; a warning for each part its error feedback would not bound."""
        pipeline = Pipeline.from_spec(codec)
        for name, length in self.spec.parts.items():
            if not pipeline.error_feedback_safe(length):
                log.warning("uplink codec %s is not error-feedback safe for part %s (%d values):"
                            " its residual may grow without bound", pipeline.spec, name, length)
        return pipeline

    def _load_model(self, chain: Sequence[str]) -> TrainableModel:
        """The model, with inference on the first delegate of `chain` that takes it."""
        self.delegate = choose_delegate(
            chain, accept=lambda delegate: TrainableModel(self.spec, delegate=delegate))
        for failure in self.delegate.failures:
            log.warning("inference delegate unavailable: %s", failure)
        if self.delegate.accepted is not None:
            log.info("inference runs on %s; training on the CPU", self.delegate.name)
            return self.delegate.accepted
        log.info("inference and training run on the CPU (%s)", CPU)
        return TrainableModel(self.spec)

    @property
    def activity(self) -> str:
        if self.training_now:
            return "training"
        return "stream ended" if self.stream_ended else "sampling"

    # lifecycle

    def reload(self, config: AgentConfig) -> None:
        """Apply training, store and heartbeat settings; others need a restart."""
        fixed = ("device_id", "fleet", "state_dir", "broker", "model", "sensor", "window",
                 "inference", "trust")
        changed = [k for k in fixed if getattr(config, k) != getattr(self.config, k)]
        if changed:
            log.warning("reload: %s change(s) need a restart; applying the rest",
                        ", ".join(changed))
            config = dataclasses.replace(config, **{k: getattr(self.config, k) for k in changed})
        if (config.drift.recent_windows, config.drift.min_windows) != (
                self.config.drift.recent_windows, self.config.drift.min_windows):
            self.drift = DriftMonitor(self.spec.num_classes, recent=config.drift.recent_windows,
                                      min_windows=config.drift.min_windows)
            self._unscored = deque(self._unscored, maxlen=config.drift.recent_windows)
            self.drift_score = None  # a fresh reference comes with the next round
        if config.training.strategy != self.config.training.strategy:
            log.warning("reload: training.strategy needs a restart; keeping %s",
                        self.config.training.strategy)
            config = dataclasses.replace(config, training=dataclasses.replace(
                config.training, strategy=self.config.training.strategy))
        if config.uplink != self.config.uplink:
            self.uplink = self._uplink(config.uplink.codec)  # the residuals carry over
        self.config = config
        self.learner.training = config.training
        self.scheduler.config = config.scheduler
        self.readings.cpu_window_s = config.scheduler.cpu_window_s
        logging.getLogger().setLevel(config.log_level.upper())
        log.info("reloaded configuration")
        self._wake_trainer.set()

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        status_topic = topics.status(cfg.fleet, cfg.device_id)
        offline = Status(cfg.device_id, "offline", time.time()).encode()
        self._link = Link.from_config(
            cfg.broker, f"fedd-{cfg.device_id}", will=Will(status_topic, offline),
            subscriptions=[(topics.model_current(cfg.fleet), 1),
                           (topics.ack(cfg.fleet, cfg.device_id), 1),
                           (topics.attest_nonce(cfg.fleet, cfg.device_id), 1)])
        await self._in_worker(self.trust.measure)  # before any quote can be asked for
        async with self._link as link:
            self.notifier.ready()
            log.info("agent %s up: model %s, %d windows stored, %d updates queued",
                     cfg.device_id, self.spec.name, self.store.count_windows(),
                     self.store.outbox_size())
            try:
                async with asyncio.TaskGroup() as group:
                    for job in (self._sample, self._listen, self._train, self._publish,
                                self._report, self._watch_drift):
                        group.create_task(job())
                    group.create_task(self._until(stop))
            except* _Stopping:
                pass
            with contextlib.suppress(LinkDown, PublishRejected):
                await link.publish(status_topic, Status(cfg.device_id, "offline",
                                                        time.time()).encode(),
                                   retain=True, timeout=2.0)
        if self._job is not None and not self._job.done():
            log.info("waiting for the running model job to finish")
            with contextlib.suppress(Exception):
                await self._job
        self._worker.shutdown(wait=True)
        self._write_status()
        self.store.close()
        log.info("agent %s stopped cleanly", cfg.device_id)

    @staticmethod
    async def _until(stop: asyncio.Event) -> None:
        await stop.wait()
        raise _Stopping

    async def _in_worker(self, fn: Callable[..., object], *args: object) -> object:
        """Run model work in a thread, one job at a time.

        The job is shielded: a stop request cancels the waiting, not the
        thread, and `run` lets the job finish before it closes the store.
        """
        async with self._model_lock:
            self._job = asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)
            return await asyncio.shield(self._job)

    # sampler

    async def _sample(self) -> None:
        rate = self.source.rate_hz  # an IIO device may run at the nearest rate it offers
        since_retention = 0
        async for chunk in self.source.chunks(int(self.store.get("sensor_cursor", 0))):
            windows, labels = self.windower.push(chunk.samples, chunk.labels, chunk.gap_before)
            if not len(windows):
                continue
            cursor = chunk.cursor - self.windower.pending
            inputs = self.inputs(windows, rate)
            self.store.add_windows(inputs, labels, state={"sensor_cursor": cursor})
            if self.config.drift.enabled:
                self._unscored.extend(inputs)
            since_retention += len(windows)
            if since_retention >= RETENTION_EVERY:
                self.store.enforce_retention(max_windows=self.config.store.max_windows,
                                             max_age_s=self.config.store.max_age_h * 3600)
                since_retention = 0
            self._wake_trainer.set()
        self.stream_ended = True
        log.info("sensor stream ended")

    # listener

    async def _listen(self) -> None:
        assert self._link is not None
        ack_topic = topics.ack(self.config.fleet, self.config.device_id)
        attest_topic = topics.attest_nonce(self.config.fleet, self.config.device_id)
        async for message in self._link.messages():
            if message.topic == ack_topic:
                self._on_ack(message.payload)
                continue
            if message.topic == attest_topic:
                await self._on_hub_attest(message.payload)
                continue
            try:
                model = GlobalModel.decode(message.payload, max_bytes=MAX_MODEL_BYTES)
            except WireError as exc:
                log.warning("ignored a global model message: %s", exc)
                continue
            except Exception:  # a decoder bug must cost one message, never the agent
                log.exception("internal error decoding a global model message; ignored it")
                continue
            if model.version == self.learner.version:
                continue
            if (model.model, model.model_sha256) != (self.spec.name, self.spec.sha256):
                log.error("the hub serves model %s (%s…), this device runs %s (%s…)",
                          model.model, model.model_sha256[:12], self.spec.name,
                          self.spec.sha256[:12])
                continue
            sizes = {name: len(values) for name, values in model.parts.items()}
            if sizes != self.spec.parts:
                log.error("global version %d has parts %s, expected %s", model.version, sizes,
                          self.spec.parts)
                continue
            await self._in_worker(self._adopt, model)
            log.info("global version %d applied (%d contributors)", model.version,
                     model.contributors, extra=log_fields(model_version=model.version))
            self._wake_trainer.set()
            await self._heartbeat()

    async def _on_hub_attest(self, payload: bytes) -> None:
        """A challenge gets a quote (or why there is none); a verdict is recorded."""
        assert self._link is not None
        try:
            message = decode_from_hub(payload)
        except WireError as exc:
            log.warning("ignored an attestation message: %s", exc)
            return
        if isinstance(message, TrustVerdict):
            self.trust.record(message)
            return
        answer = await self._in_worker(self.trust.answer, message)
        with contextlib.suppress(LinkDown, PublishRejected):
            await self._link.publish(topics.attest(self.config.fleet, self.config.device_id),
                                     answer, qos=1)

    def _adopt(self, model: GlobalModel) -> None:
        """Apply a global version, re-fit the personal head and score both (worker)."""
        self.learner.apply_global(model)
        features, labels = self.store.labelled_windows()
        if len(features) < self.config.training.min_windows:
            return
        self.learner.fit_scaler(features)
        self.learner.personalize(features, labels)
        self.store.put(**self._personal_state())
        self._drift_reference(features)
        if self.holdout is not None:
            self.evaluation = self.learner.evaluate(*self.holdout)

    @staticmethod
    def _drift_summary(inputs: np.ndarray) -> np.ndarray:
        """Per-window statistics drift compares: features, or a raw window's channel means."""
        return inputs if inputs.ndim == 2 else inputs.mean(axis=1)

    def _drift_reference(self, features: np.ndarray) -> None:
        """What the model now reflects: the stored windows as it classifies them (worker)."""
        self.drift.set_reference(self.learner.predict(features), self._drift_summary(features))
        self.drift_reason = None

    def _score_drift(self, inputs: np.ndarray) -> DriftScore | None:
        """Fold new windows into the drift monitor and score it (worker)."""
        if self.learner.version is None or not self.drift.has_reference:
            return None
        self.drift.observe(self.learner.predict(inputs), self._drift_summary(inputs))
        return self.drift.score()

    async def _watch_drift(self) -> None:
        """Score new windows every few seconds; a crossed threshold asks for a round."""
        while True:
            await asyncio.sleep(self.config.drift.check_interval_s)
            if not self.config.drift.enabled or not self._unscored:
                continue
            inputs = np.stack(self._unscored)
            self._unscored.clear()
            score = await self._in_worker(self._score_drift, inputs)
            if score is None:
                continue
            self.drift_score = score
            reason = score.exceeds(self.config.drift.kl_threshold,
                                   self.config.drift.shift_threshold)
            if reason and self.drift_reason is None:
                log.info("drift: %s; asking for a training round", reason)
                self.drift_reason = reason
                self._wake_trainer.set()

    def _personal_state(self) -> dict[str, object]:
        """What makes this device's model its own, as stored between runs."""
        return {**self.learner.personal_state(), "strategy": self.config.training.strategy}

    # trainer

    def _training_decision(self) -> tuple[str, float]:
        """What the trainer does now and, if it waits, for how long at most."""
        training = self.config.training
        if self.learner.version is None:
            return "waiting for the global model", 60.0
        labelled = self.store.count_windows(labelled_only=True)
        if labelled < training.min_windows:
            return f"waiting for data: {labelled}/{training.min_windows} labelled windows", 60.0
        if self.drift_reason is None:
            if not self.learner.strategy.shared:  # local: new data, not versions, is news
                if labelled == self.labelled_at_last_round:
                    return f"up to date: trained on all {labelled} labelled windows", 60.0
            elif self.last_trained_version == self.learner.version:
                return f"up to date: trained on version {self.learner.version}", 60.0
        cooldown = self.last_round_at + training.min_interval_s - time.monotonic()
        if cooldown > 0:
            return f"cooling down: {cooldown:.0f} s until the next round", cooldown
        decision = self.scheduler.decide(self.readings.read(), time.time())
        if not decision.run:
            return decision.reason, min(max(decision.wait_s, 1.0), SCHEDULER_RECHECK_S)
        why = self.drift_reason or (f"new version {self.learner.version}"
                                    if self.learner.strategy.shared else "new windows")
        return f"training: {why} ({decision.reason})", 0.0

    async def _train(self) -> None:
        while True:
            self.decision, wait_s = self._training_decision()
            if wait_s > 0:
                self._wake_trainer.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):  # not wait_for: see fedd/link.py
                        await self._wake_trainer.wait()
                continue
            self.training_now = True
            try:
                await self._in_worker(self._local_round)
            finally:
                self.training_now = False
            self._wake_publisher.set()

    def _local_round(self) -> None:
        """Train, personalize and queue the update durably (worker)."""
        features, labels = self.store.labelled_windows()
        diverged: Diverged | None = None
        trigger = (TRIGGER_DRIFT if self.drift_reason
                   else TRIGGER_VERSION if self.learner.strategy.shared else "new-data")
        with self.scheduler.training_run(self.readings) as run:
            self.learner.stop_check = run.should_stop  # heat, power, budget: stop mid-run
            try:
                self.learner.fit_scaler(features)
                result = self.learner.local_round(features, labels)
                self.learner.personalize(features, labels)
            except Diverged as exc:
                diverged = exc
            finally:
                self.learner.stop_check = None
        self.scheduler.record_run(run.cpu_s, run.energy_j or 0.0, time.time())
        if diverged is not None:
            # Retrying on the same version would diverge again: wait for the next one.
            self.last_trained_version = self.learner.version
            self.labelled_at_last_round = len(labels)
            self.last_round_at = time.monotonic()
            self.store.put(last_trained_version=self.last_trained_version,
                           labelled_at_last_round=self.labelled_at_last_round,
                           scheduler=self.scheduler.to_state())
            log.warning("round (%s) discarded, nothing sent: %s", trigger, diverged,
                        extra=log_fields(model_version=self.learner.version))
            return
        drift_reason = self.drift_reason
        self._drift_reference(features)
        if self.holdout is not None:
            self.evaluation = self.learner.evaluate(*self.holdout)
        created = time.time()
        # The `local` strategy shares nothing, and a round the scheduler stopped part-way
        # is discarded (its delta would claim all the windows): nothing to send either way.
        shares = bool(result.delta) and run.stopped is None
        # A fresh store starts at the clock in milliseconds: a device whose state was
        # wiped never reuses a seq the hub has already settled (it would be a "resend").
        seq = int(self.store.get("next_seq", time.time() * 1000)) if shares else None
        payload, residuals, sent_bytes, codec, budget = None, {}, None, self.uplink.spec, None
        if seq is not None:
            carried = {name: self.store.get(RESIDUAL_PREFIX + name) for name in result.delta}
            topic = topics.update(self.config.fleet, self.config.device_id)
            encodings: dict[str, tuple[bytes, dict[str, np.ndarray]]] = {}

            def size(pipeline: Pipeline) -> int:
                # Every level starts from the SAME carried residual.
                encoded = encode_deltas(pipeline, result.delta, carried)
                data = self.trust.sign(ModelUpdate(
                    device=self.config.device_id, seq=seq, base_version=result.base_version,
                    model=self.spec.name, num_samples=result.num_samples,
                    parts=encoded.payloads, created=created, codec=pipeline.spec,
                    trigger=trigger, format=UPDATE_FORMAT_COMPACT).encode(model=self.spec))
                encodings[pipeline.spec] = data, encoded.residuals
                # At most: the first publish on a connection carries the topic and its alias.
                return publish_wire_bytes(topic, data, qos=1, topic_alias=1)

            limit, budget = self._allowance(time.time())
            full = self._outbox_full()
            chosen = None if full else choose_level(self.uplink, max(self.spec.parts.values()),
                                                    size, limit)
            if chosen is None:
                # Outbox full or budget spent: send nothing; residual += delta is exactly
                # "send nothing", and the next update that goes out carries it.
                residuals = {RESIDUAL_PREFIX + name: residual for name, residual
                             in fold_deltas(result.delta, carried).items()}
                budget = f"{full or budget}; delta folded into the residual"
                seq, codec = None, None
            else:
                codec = chosen[0].spec
                payload, kept = encodings[codec]
                # A lossless codec leaves zeros behind: write a residual only when it holds
                # something or replaces one that did.
                residuals = {RESIDUAL_PREFIX + name: residual for name, residual in kept.items()
                             if residual.any() or carried.get(name) is not None}
                sent_bytes = len(payload)
                if codec != self.uplink.spec:
                    budget += f"; sent as {codec} ({chosen[1]:,} B)"
        self.last_update = {"seq": seq, "base_version": result.base_version,
                            "trigger": trigger, "drift": drift_reason,
                            "samples": result.num_samples, "time": created,
                            "codec": codec, "bytes": sent_bytes, "budget": budget,
                            "loss_before": _rounded(result.loss_before),
                            "loss_after": _rounded(result.loss_after),
                            **run.as_dict()}
        done = run.stopped is None  # a stopped round is retried when the scheduler allows
        state = {"last_update": self.last_update, "scheduler": self.scheduler.to_state(),
                 **self._personal_state()}
        if done:
            state.update(last_trained_version=result.base_version,
                         labelled_at_last_round=len(labels))
        if seq is None or payload is None:
            self.store.put(**state, **residuals)  # residuals: a delta folded in
        else:
            # The update, its seq and the residuals it leaves: one transaction.
            first = {} if self.store.get("first_seq") is not None else {"first_seq": seq}
            self.store.enqueue(topics.update(self.config.fleet, self.config.device_id),
                               payload, seq=seq,
                               state={**state, **residuals, **first, "next_seq": seq + 1})
        if done:
            self.last_trained_version = result.base_version
            self.labelled_at_last_round = len(labels)
        self.last_round_at = time.monotonic()
        log.info("round (%s) on version %d, %d windows, loss %.3f → %.3f: %s", trigger,
                 result.base_version, result.num_samples, result.loss_before, result.loss_after,
                 f"update {seq} queued" if seq is not None
                 else budget if budget
                 else f"stopped ({run.stopped}), nothing sent" if not done else "nothing to send",
                 extra=log_fields(model_version=result.base_version, update_seq=seq))

    def _outbox_full(self) -> str | None:
        """Why the outbox takes no more updates, or None while it has room."""
        uplink = self.config.uplink
        count, size = self.store.outbox_size(), self.store.outbox_bytes()
        if count >= uplink.outbox_max_updates or size >= uplink.outbox_max_bytes:
            return (f"outbox full: {count}/{uplink.outbox_max_updates} updates, "
                    f"{size:,}/{uplink.outbox_max_bytes:,} B")
        return None

    def _allowance(self, now: float) -> tuple[int | None, str | None]:
        """The bytes the next update may take (None: unlimited) and a sentence about it."""
        uplink = self.config.uplink
        used = self.uplink_window.used(now)
        queued = sum(publish_wire_bytes(item.topic, item.payload, qos=1, topic_alias=1)
                     for item in self.store.outgoing()) if uplink.bytes_per_hour else 0
        limit = allowance(max_update_bytes=uplink.max_update_bytes,
                          bytes_per_hour=uplink.bytes_per_hour, used=used, queued=queued)
        if uplink.bytes_per_hour is None:
            note = None if limit is None else f"budget: {limit:,} B per update"
        else:
            note = f"budget: {used + queued:,}/{uplink.bytes_per_hour:,} B this hour"
        # An update the link cannot carry before its publish times out would be sent
        # again and again: keep it to what the measured goodput moves in half that time.
        if self.goodput is not None:
            carried = int(self.goodput * PUBLISH_TIMEOUT_S * LINK_SHARE)
            if limit is None or carried < limit:
                limit = carried
                note = (f"link: {carried:,} B fit in {PUBLISH_TIMEOUT_S * LINK_SHARE:.0f} s at "
                        f"{self.goodput:,.0f} B/s")
        return limit, note

    # publisher

    async def _publish(self) -> None:
        """Send the oldest queued update until the hub acknowledges it, then the next."""
        assert self._link is not None
        link = self._link
        while True:
            item = self.store.oldest_outgoing()
            if item is None:
                self._wake_publisher.clear()
                await self._wake_publisher.wait()
                continue
            await link.connected.wait()
            wire = link.wire_bytes(item.topic, item.payload, qos=1, alias=True)  # as sent
            started = time.monotonic()
            self._ack_arrived.clear()
            try:
                await link.publish(item.topic, item.payload, qos=1, timeout=PUBLISH_TIMEOUT_S,
                                   alias=True)
            except LinkDown as exc:
                log.info("update %d not taken by the broker (%s); will retry", item.seq, exc,
                         extra=log_fields(update_seq=item.seq))
                await asyncio.sleep(1.0)
                continue
            except PublishRejected as exc:
                # The broker's ACL will refuse every resend too: settle it here, loudly.
                log.error("broker refused update %d, dropping it: %s", item.seq, exc,
                          extra=log_fields(update_seq=item.seq))
                self._settle(item.seq, ACK_REJECTED, "broker-refused")
                continue
            finally:
                self.uplink_window.add(time.time(), wire)  # a refused PUBLISH crossed too
            self.updates_sent += 1
            self.uplink_bytes += wire
            rate = wire / max(time.monotonic() - started, 1e-6)
            self.goodput = rate if self.goodput is None else (
                GOODPUT_ALPHA * rate + (1 - GOODPUT_ALPHA) * self.goodput)
            self.store.put(updates_sent=self.updates_sent, uplink_bytes=self.uplink_bytes,
                           uplink_window=self.uplink_window.to_state(),
                           goodput_bps=self.goodput)
            if not await self._until_acknowledged(item.seq):
                log.info("no acknowledgement of update %d within %.0f s; sending it again",
                         item.seq, self.config.uplink.ack_timeout_s,
                         extra=log_fields(update_seq=item.seq))

    async def _until_acknowledged(self, seq: int) -> bool:
        """Wait for the hub's acknowledgement of `seq` (the listener settles it)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.uplink.ack_timeout_s):
                while self.store.holds(seq):
                    await self._ack_arrived.wait()
                    self._ack_arrived.clear()
                return True
        return False

    def _on_ack(self, payload: bytes) -> None:
        """The hub settled one of our updates: take it out of the outbox."""
        try:
            ack = Ack.decode(payload)
        except WireError as exc:
            log.warning("ignored an acknowledgement: %s", exc)
            return
        if ack.device != self.config.device_id:
            log.warning("ignored an acknowledgement for device %s", ack.device)
            return
        seq = ack.seq
        if seq is None:  # an update the hub could not read, named by its bytes
            seq = next((item.seq for item in self.store.outgoing()
                        if payload_digest(item.payload) == ack.digest), None)
        if seq is None or not self.store.holds(seq):
            log.debug("acknowledgement of update %s again (already settled)", ack.seq)
            return
        if ack.outcome == ACK_REJECTED:
            log.warning("hub rejected update %d: %s", seq, ack.reason,
                        extra=log_fields(update_seq=seq, model_version=ack.version))
        self._settle(seq, ack.outcome, ack.reason, hub_version=ack.version)

    def _settle(self, seq: int, outcome: str, reason: str | None, *,
                hub_version: int | None = None) -> None:
        """Drop an update from the outbox and count its outcome, in one transaction."""
        if outcome == ACK_ACCEPTED:
            self.acked += 1
        else:
            self.rejected_updates[str(reason)] = self.rejected_updates.get(str(reason), 0) + 1
        self.last_ack = {"seq": seq, "outcome": outcome, "reason": reason,
                         "hub_version": hub_version, "time": time.time()}
        self.store.acknowledge(seq, state={"acked": self.acked, "last_ack": self.last_ack,
                                           "rejected_updates": self.rejected_updates})
        self._ack_arrived.set()

    # reporter

    async def _report(self) -> None:
        assert self._link is not None
        status_topic = topics.status(self.config.fleet, self.config.device_id)
        announced = 0
        next_beat = 0.0
        while True:
            if self._link.connected.is_set() and announced != self._link.connections:
                with contextlib.suppress(LinkDown, PublishRejected):
                    await self._link.publish(status_topic, Status(
                        self.config.device_id, "online", time.time()).encode(), retain=True)
                    # Ask for a challenge: trust is per hub run and per connection.
                    await self._link.publish(topics.attest(self.config.fleet,
                                                           self.config.device_id),
                                             Hello().encode(), qos=1)
                    announced = self._link.connections
            if time.monotonic() >= next_beat:
                await self._heartbeat()
                beat = self.config.heartbeat
                next_beat = time.monotonic() + beat.interval_s * (
                    1 + self._jitter.uniform(-beat.jitter, beat.jitter))
            await asyncio.sleep(min(REPORT_TICK_S, self.config.heartbeat.interval_s))

    def heartbeat(self) -> Heartbeat:
        link, readings, verdict = self._link, self.readings.read(), self.trust.verdict
        hottest, budget = readings.hottest(), self.scheduler.budget(time.time())
        evaluation = None if self.evaluation is None else Evaluation(
            version=self.evaluation.version, windows=self.evaluation.windows,
            global_accuracy=round(self.evaluation.global_accuracy, 4),
            personal_accuracy=round(self.evaluation.personal_accuracy, 4))
        return Heartbeat(
            device=self.config.device_id, time=time.time(),
            uptime_s=round(time.monotonic() - self.started, 1), activity=self.activity,
            decision=self.decision, model_version=self.learner.version,
            windows=self.store.count_windows(), outbox=self.store.outbox_size(),
            updates_sent=self.updates_sent, uplink_bytes=self.uplink_bytes,
            last_update_seq=None if self.last_update is None else self.last_update.get("seq"),
            delegate=self.delegate.name, rss_bytes=psutil.Process().memory_info().rss,
            last_update_energy_j=None if self.last_update is None
            else self.last_update.get("energy_j"),
            last_update_bytes=None if self.last_update is None
            else self.last_update.get("bytes"),
            uplink_bytes_hour=self.uplink_window.used(time.time()),
            uplink_budget_hour=self.config.uplink.bytes_per_hour,
            goodput_bps=None if self.goodput is None else round(self.goodput, 1),
            evaluation=evaluation, drift=None if self.drift_score is None else Drift(
                prediction_kl=round(self.drift_score.prediction_kl, 4),
                feature_shift=round(self.drift_score.feature_shift, 4),
                windows=self.drift_score.windows),
            outbox_bytes=self.store.outbox_bytes(), acked=self.acked,
            rejected=sum(self.rejected_updates.values()),
            last_ack_seq=None if self.last_ack is None else self.last_ack["seq"],
            last_ack_time=None if self.last_ack is None else self.last_ack["time"],
            connected=link is not None and link.connected.is_set(),
            reconnects=0 if link is None else link.stats.reconnects,
            connect_failures=0 if link is None else link.stats.failed_attempts,
            cpu_percent=None if readings.cpu_percent is None else round(readings.cpu_percent, 1),
            temperature_c=None if hottest is None else round(hottest.celsius, 1),
            battery_percent=readings.battery_percent, on_battery=readings.on_battery,
            cpu_s_hour=budget["cpu_s_hour"], runs_24h=budget["runs_24h"],
            software=__version__, model=self.spec.name,
            trusted=None if verdict is None else verdict.trusted,
            trust_reason=None if verdict is None else verdict.reason,
            trusted_until=None if verdict is None else verdict.until)

    async def _heartbeat(self) -> None:
        """Publish a heartbeat (QoS 0: the next one supersedes it) and the status."""
        assert self._link is not None
        beat = self.heartbeat()
        self.notifier.status(f"version {beat.model_version}, {beat.windows} windows, "
                             f"{beat.outbox} queued; {beat.decision}")
        self._write_status(beat)
        if self.config.heartbeat.prometheus_textfile:
            from fedd.agent.metrics import write_textfile  # ~1 MiB: only when configured

            try:
                write_textfile(self.config.heartbeat.prometheus_textfile, beat)
            except OSError as exc:
                log.warning("cannot write the Prometheus textfile: %s", exc)
        if self._link.connected.is_set():
            with contextlib.suppress(LinkDown, PublishRejected):
                await self._link.publish(topics.heartbeat(self.config.fleet,
                                                          self.config.device_id),
                                         beat.encode(), qos=0)

    def _write_status(self, beat: Heartbeat | None = None) -> None:
        beat = beat or self.heartbeat()
        status = {**json.loads(beat.encode()), "last_update": self.last_update,
                  "last_ack": self.last_ack, "rejected_updates": self.rejected_updates,
                  "pid": os.getpid()}
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status, indent=1))
        os.replace(tmp, self.status_path)

