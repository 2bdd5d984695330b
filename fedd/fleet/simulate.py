"""An in-process federated simulation, the fast harness for comparing strategies.

No broker and no processes (`fedd fleet` is the real multi-process fleet):
each HAPT person is one device with the real `Learner` on its own LiteRT
interpreter, and the hub is the real FedBuff buffer of `fedd.hub.aggregate`.
A device trains on its past (the first 70 % of each activity's windows, in
time order) and is scored on its future (the rest), as `hapt_person` splits.

Two schedules:

* ``sync``: each round K of the N devices, chosen at random, run a local round
  on the current version; their updates (staleness 0) make the next version.
* ``async``: every device trains continuously; FedBuff publishes a version
  whenever K updates are buffered, stale updates are damped
  (s(τ) = (1 + τ)^-a) and those staler than `max_staleness` are dropped, as
  the hub does.

Both run until version `rounds` (``local``, which sends nothing, for `rounds`
x K local rounds). A share of the devices is `slow_factor` times slower;
`sim_time` is the simulated clock in rounds of a fast device (a synchronous
round waits for its slowest device). Every device adopts every version and
re-personalizes, as the agent's daemon does. `label_skew`
keeps only 2-4 of the 6 activities per person (seeded), in both the training
and the holdout windows, as real users who never climb stairs.

`robust` is the hub's `robust:` section (fedd.hub.robust: the norm screen
and the buffer's rule; None, the default, is the plain mean with no screen),
and `attack` makes some devices send a multiple of their honest update
(x100, or x-1 sign-flipped); they still learn and personalize honestly.

Updates travel as the agent sends them: each device encodes its delta with
`codec` and its own error-feedback residuals into a format-2 `ModelUpdate`,
and the hub decodes and checks it as `fedd hub` does before folding it, so
`uplink_bytes` are the MQTT PUBLISH bytes a connected device would send (the
topic on its first publish, its alias after). With `eval_every` every device
scores each such version on its holdout, which gives the accuracy-against-
bytes curve (`SimResult.curve`).
"""

from __future__ import annotations

import heapq
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np

from fedd import topics
from fedd.agent.features import FEATURE_SET, model_inputs
from fedd.agent.learner import STRATEGIES, Diverged, Learner, make_strategy
from fedd.config import RobustConfig, TrainingConfig
from fedd.datasets import hapt, hapt_person
from fedd.datasets.windows import window_labels, window_starts
from fedd.hub import robust
from fedd.hub.aggregate import FedBuff, apply_delta
from fedd.link import publish_wire_bytes
from fedd.model import ModelSpec, TrainableModel, all_finite
from fedd.pipeline import Decoded, DecodeError, Pipeline, SpecError
from fedd.trust.messages import seal
from fedd.trust.signing import SIGNATURE_BYTES
from fedd.wire import (
    CODEC_FLOAT32,
    UPDATE_FORMAT_COMPACT,
    GlobalModel,
    ModelUpdate,
    WireError,
    encode_deltas,
)

__all__ = ["Attack", "CurvePoint", "DeviceData", "PersonResult", "SimOptions", "SimResult",
           "load_fleet", "pooled", "simulate", "skewed_classes"]

MANIFEST = Path(__file__).resolve().parents[2] / "models" / "manifest.json"
WINDOW, STEP = 128, 64
NUM_CLASSES = len(hapt.ACTIVITIES)
ASYNC_STALL = 3  # async runs end after this many times rounds x per_round local rounds
FLEET = "sim"
FIRST_SEQ = 1_700_000_000_000  # seqs start at the clock in ms, as the agent's (6-byte varints)
MAX_UPDATE_BYTES = 4 << 20  # the hub's default limits.max_update_bytes


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class DeviceData:
    """One person's model inputs: train (x, y) and holdout (hx, hy), in time order."""

    person: int
    x: np.ndarray
    y: np.ndarray
    hx: np.ndarray
    hy: np.ndarray

    @property
    def classes(self) -> list[int]:
        return sorted(set(self.y.tolist()) | set(self.hy.tolist()))

    def keep(self, classes: Sequence[int]) -> DeviceData:
        """Only the windows of `classes`, in training and holdout alike."""
        train, test = np.isin(self.y, classes), np.isin(self.hy, classes)
        return DeviceData(self.person, self.x[train], self.y[train], self.hx[test], self.hy[test])


@cache
def _hapt_people() -> dict[int, list[hapt.Recording]]:
    return hapt.load()


@cache
def _featurized(person: int, feature_set: str) -> DeviceData:
    """A HAPT person's stream windows and holdout as model inputs (cached per process)."""
    inputs = model_inputs(feature_set)
    data = hapt_person(person, WINDOW, STEP, people=_hapt_people())
    xs, ys = [], []
    for seg in data.stream:
        starts = window_starts(len(seg.samples), WINDOW, STEP)
        labels = window_labels(seg.labels, starts, WINDOW)
        keep = labels >= 0
        windows = seg.samples[starts[keep][:, None] + np.arange(WINDOW)[None, :]]
        xs.append(inputs(windows, hapt.SAMPLE_RATE_HZ))
        ys.append(labels[keep])
    return DeviceData(person, np.concatenate(xs), np.concatenate(ys).astype(np.int32),
                      inputs(data.holdout_windows, hapt.SAMPLE_RATE_HZ),
                      data.holdout_labels.astype(np.int32))


def skewed_classes(person: int, available: Sequence[int], seed: int) -> list[int]:
    """2-4 of a person's activities, drawn reproducibly from (seed, person)."""
    rng = np.random.default_rng([seed, person, 0x5EED])
    available = sorted(available)
    k = int(rng.integers(2, min(4, len(available)) + 1))
    return sorted(int(c) for c in rng.choice(available, size=k, replace=False))


def load_fleet(people: Sequence[int], *, label_skew: bool = False, seed: int = 0,
               feature_set: str = FEATURE_SET) -> list[DeviceData]:
    """The devices' data as `feature_set` inputs (the model's, from its manifest);
    with `label_skew`, each keeps 2-4 activities (seeded)."""
    fleet = []
    for person in people:
        data = _featurized(int(person), feature_set)
        if label_skew:
            both = sorted(set(data.y.tolist()) & set(data.hy.tolist()))
            data = data.keep(skewed_classes(data.person, both, seed))
        fleet.append(data)
    return fleet


# ---------------------------------------------------------------- options and results


@dataclass(frozen=True, kw_only=True)
class Attack:
    """`devices` of the fleet send `factor` x their honest update (100: scaled, -1: flipped).

    Which devices is drawn from the run's seed apart from the schedule's draws,
    so a clean and an attacked run of one seed train the same devices each round.
    """

    factor: float
    devices: int = 3

    def __post_init__(self) -> None:
        if not math.isfinite(self.factor):
            raise ValueError(f"an attack's factor must be finite, got {self.factor}")
        if self.devices < 1:
            raise ValueError(f"an attack needs >= 1 device, got {self.devices}")


@dataclass(frozen=True, kw_only=True)
class SimOptions:
    """One simulated fleet run. Training defaults are the measured ones (bench-personalization)."""

    strategy: str = "finetune"
    strategy_params: dict[str, float] = field(default_factory=dict)
    people: tuple[int, ...] = tuple(range(1, 31))
    rounds: int = 300
    per_round: int = 10
    mode: Literal["sync", "async"] = "sync"
    slow_share: float = 0.2
    slow_factor: float = 5.0
    label_skew: bool = False
    seed: int = 0
    epochs: int = 2
    learning_rate: float | None = None  # None: the model's own (its manifest's)
    head_epochs: int = 1
    server_learning_rate: float = 1.0
    staleness_exponent: float = 0.5
    max_staleness: int = 20
    model: str = "har-mlp"
    manifest: str = str(MANIFEST)
    robust: RobustConfig | None = None  # the hub's robust: section; None: plain mean
    attack: Attack | None = None
    codec: str = CODEC_FLOAT32  # every device's uplink.codec
    eval_every: int = 0  # score the fleet every this many versions (0: at the end only)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r} "
                             f"(known: {', '.join(STRATEGIES)})")
        make_strategy(self.strategy, **self.strategy_params)  # validates the params
        object.__setattr__(self, "people", tuple(int(p) for p in self.people))
        if not self.people or len(set(self.people)) != len(self.people):
            raise ValueError(f"people must be distinct HAPT ids, got {self.people}")
        if not 1 <= self.per_round <= len(self.people):
            raise ValueError(f"per_round must be 1-{len(self.people)} (the fleet's size), "
                             f"got {self.per_round}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.learning_rate is not None and not (math.isfinite(self.learning_rate)
                                                   and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a number > 0, got {self.learning_rate}")
        if self.mode not in ("sync", "async"):
            raise ValueError(f"mode must be 'sync' or 'async', got {self.mode!r}")
        if not 0 <= self.slow_share <= 1 or self.slow_factor < 1:
            raise ValueError("slow_share must be in [0, 1] and slow_factor >= 1")
        if self.attack is not None and self.attack.devices > len(self.people):
            raise ValueError(f"an attack by {self.attack.devices} devices needs as many "
                             f"people, got {len(self.people)}")
        try:
            Pipeline.from_spec(self.codec)
        except SpecError as exc:
            raise ValueError(f"codec: {exc}") from None
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")

    @property
    def training(self) -> TrainingConfig:
        return TrainingConfig(epochs=self.epochs, learning_rate=self.learning_rate,
                              head_epochs=self.head_epochs)


@dataclass(frozen=True)
class PersonResult:
    """One device at the end: the final global model and its own, on its holdout."""

    person: int
    classes: list[int]
    train_windows: int
    holdout_windows: int
    global_accuracy: float
    personal_accuracy: float
    # The personal model on the holdout: [true class][predicted class] window counts,
    # which says where the remaining errors are (HAPT: mostly sitting vs standing).
    confusion: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True)
class CurvePoint:
    """The fleet at one version: what crossed the uplink so far, and its mean accuracies."""

    version: int
    local_rounds: int
    uplink_bytes: int
    personal_accuracy: float
    global_accuracy: float


@dataclass(frozen=True)
class SimResult:
    options: SimOptions
    people: list[PersonResult]
    versions: int
    local_rounds: int
    updates_folded: int
    updates_dropped: int
    uplink_values: int
    sim_time: float
    wall_s: float
    attackers: list[int] = field(default_factory=list)  # their HAPT person ids
    updates_rejected: int = 0  # by the norm screen (norm-outlier)
    updates_clipped: int = 0
    updates_invalid: int = 0  # non-finite (not encodable), or in a flush that would overflow
    uplink_bytes: int = 0  # MQTT PUBLISH bytes of every update sent
    uplink_signed_bytes: int = 0  # the same updates each in a [body, Ed25519 signature] envelope
    updates_sent: int = 0
    update_bytes_median: float = 0.0  # of one update's PUBLISH
    curve: list[CurvePoint] = field(default_factory=list)

    @property
    def personal_accuracy(self) -> np.ndarray:
        return np.array([p.personal_accuracy for p in self.people])

    @property
    def global_accuracy(self) -> np.ndarray:
        return np.array([p.global_accuracy for p in self.people])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, obj: dict) -> SimResult:
        options = dict(obj["options"])
        options["people"] = tuple(options["people"])
        for name, kind in (("robust", RobustConfig), ("attack", Attack)):
            if options.get(name) is not None:
                options[name] = kind(**options[name])
        return cls(**{**obj, "options": SimOptions(**options),
                      "people": [PersonResult(**p) for p in obj["people"]],
                      "curve": [CurvePoint(**c) for c in obj.get("curve", [])]})

    @classmethod
    def from_json(cls, text: str) -> SimResult:
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------- the simulation


def _global_model(spec: ModelSpec, version: int, parts: dict[str, np.ndarray], *,
                  contributors: int = 0, staleness: float = 0.0) -> GlobalModel:
    return GlobalModel(version=version, parent=version - 1 if version else None,
                       model=spec.name, model_sha256=spec.sha256, created=0.0,
                       contributors=contributors, mean_staleness=staleness, parts=parts)


class _Hub:
    """The real FedBuff buffer, norm screen and delta rule, versions as GlobalModel."""

    def __init__(self, spec: ModelSpec, initial: dict[str, np.ndarray],
                 options: SimOptions) -> None:
        self.spec = spec
        self.options = options
        self.buffer = FedBuff(buffer_size=options.per_round, max_wait_s=1e9, quorum=1,
                              staleness_exponent=options.staleness_exponent,
                              reducer=robust.reducer_for(options.robust))
        self.screen = (None if options.robust is None
                       else robust.NormScreen.from_config(options.robust))
        self.current = _global_model(spec, 0, initial)
        self.folded = self.dropped = self.rejected = self.uplink = 0
        self.invalid = 0  # non-finite updates, and updates of a flush that overflowed

    def receive(self, payload: bytes, device: str) -> None:
        """Decode and check one update as HubCore.receive does, then fold it."""
        try:
            update = ModelUpdate.decode(payload, max_bytes=MAX_UPDATE_BYTES, device=device,
                                        model=self.spec)
            delta: dict[str, Decoded] = {
                name: update.read_part(name, length=self.spec.parts[name])
                for name in update.parts}
        except (WireError, DecodeError):
            self.invalid += 1  # e.g. payload-non-finite
            return
        self.uplink += sum(part.values.size for part in delta.values())
        staleness = self.current.version - update.base_version
        if staleness > self.options.max_staleness:
            self.dropped += 1
            return
        scale = 1.0
        if self.screen is not None:  # as HubCore.receive
            try:
                verdict = self.screen.check(delta, model=self.current.parts)
            except robust.Outlier:
                self.rejected += 1
                return
            self.screen.admit(verdict)
            scale = verdict.scale
        self.buffer.fold(delta, num_samples=update.num_samples, staleness=staleness,
                         scale=scale)
        self.folded += 1

    def maybe_publish(self) -> GlobalModel | None:
        if not self.buffer.ready(now=0.0):
            return None
        flushed = self.buffer.flush()
        # A strategy that shares only some parts (fedper: the body) leaves the rest as is.
        current = self.current.parts
        moved = apply_delta({n: current[n] for n in flushed.delta}, flushed.delta,
                            self.options.server_learning_rate)
        if not all_finite(moved):
            self.invalid += flushed.contributors  # as HubCore.next_version: non-finite-result
            return None
        self.current = _global_model(self.spec, self.current.version + 1, {**current, **moved},
                                     contributors=flushed.contributors,
                                     staleness=flushed.mean_staleness)
        return self.current


class _Device:
    def __init__(self, data: DeviceData, learner: Learner, spec: ModelSpec,
                 options: SimOptions) -> None:
        self.data = data
        self.learner = learner
        self.factor = 1.0  # an attacker sends factor x its update
        self.spec = spec
        self.name = f"person-{data.person:02d}"
        self.topic = topics.update(FLEET, self.name)
        self.pipeline = Pipeline.from_spec(options.codec)
        self.residuals: dict[str, np.ndarray] = {}  # error feedback, as the agent's store
        self.rng = np.random.default_rng([options.seed, data.person, 0xC0DEC])
        self.seq = FIRST_SEQ
        self.aliased = False  # the broker knows this device's topic alias
        self.unsendable = 0  # rounds that diverged, or whose delta the encoder refused

    def adopt(self, model: GlobalModel) -> None:
        """What the daemon does with a new version: apply it and re-personalize."""
        self.learner.apply_global(model)
        self.learner.personalize(self.data.x, self.data.y)

    def round(self) -> bytes | None:
        """What the daemon's trainer does: a local round, personalize, encode the update."""
        try:
            result = self.learner.local_round(self.data.x, self.data.y)
        except Diverged:  # as the agent: discarded, nothing sent
            self.unsendable += 1
            return None
        self.learner.personalize(self.data.x, self.data.y)
        delta = result.delta
        if not delta:
            return None  # `local` shares nothing
        if self.factor != 1.0:
            delta = {name: (self.factor * values).astype(np.float32)
                     for name, values in delta.items()}
        try:
            encoded = encode_deltas(self.pipeline, delta, self.residuals, rng=self.rng)
        except ValueError:  # an attacker's x1e12: the encoder refuses non-finite values
            self.unsendable += 1
            return None
        self.residuals = dict(encoded.residuals)
        self.seq += 1
        return ModelUpdate(device=self.name, seq=self.seq, base_version=result.base_version,
                           model=self.spec.name, num_samples=result.num_samples,
                           parts=encoded.payloads, created=time.time(),
                           codec=self.pipeline.spec,
                           format=UPDATE_FORMAT_COMPACT).encode(model=self.spec)

    def wire_bytes(self, payload: bytes) -> tuple[int, int]:
        """The PUBLISH of `payload`, unsigned and signed: the topic and its alias the
        first time, the alias alone after, as `Link.publish(alias=True)`. An Ed25519
        signature is always 64 bytes, so the envelope's size needs no real one."""
        topic, self.aliased = ("" if self.aliased else self.topic), True
        signed = seal(payload, bytes(SIGNATURE_BYTES))
        return (publish_wire_bytes(topic, payload, qos=1, topic_alias=1),
                publish_wire_bytes(topic, signed, qos=1, topic_alias=1))


def _scored(learner: Learner, data: DeviceData) -> PersonResult:
    """One device at the end, on its holdout: the global and the personal model's
    accuracy and the personal model's confusion matrix (true x predicted)."""
    scores = learner.evaluate(data.hx, data.hy)
    predicted = learner.predict(data.hx)
    confusion = np.bincount(data.hy * NUM_CLASSES + predicted,
                            minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)
    return PersonResult(data.person, data.classes, len(data.y), len(data.hy),
                        scores.global_accuracy, scores.personal_accuracy, confusion.tolist())


def simulate(options: SimOptions, *, fleet: Sequence[DeviceData] | None = None,
             progress: Callable[[str], None] | None = None) -> SimResult:
    """Run one simulated fleet; `fleet` overrides the data `options` would load."""
    started = time.perf_counter()
    spec = ModelSpec.from_manifest(options.manifest, options.model)
    if fleet is None:
        fleet = load_fleet(options.people, label_skew=options.label_skew, seed=options.seed,
                           feature_set=spec.features)
    devices = []
    for data in fleet:
        learner = Learner(TrainableModel(spec), options.training,
                          strategy=make_strategy(options.strategy, **options.strategy_params),
                          seed=options.seed * 1000 + data.person)
        learner.fit_scaler(data.x)
        devices.append(_Device(data, learner, spec, options))
    if options.attack is not None:
        pick = np.random.default_rng([options.seed, 0xA77AC4])
        for i in pick.choice(len(devices), options.attack.devices, replace=False):
            devices[i].factor = options.attack.factor
    hub = _Hub(spec, TrainableModel(spec).get_parts(), options)
    for device in devices:
        device.adopt(hub.current)
    rng = np.random.default_rng([options.seed, 0xF1EE7])
    budget = options.rounds * options.per_round
    sizes: list[int] = []
    signed_bytes = 0
    curve: list[CurvePoint] = []
    local_rounds, clock = 0, 0.0

    def send(device: _Device, payload: bytes | None) -> None:
        nonlocal signed_bytes
        if payload is None:
            return
        size, signed = device.wire_bytes(payload)
        sizes.append(size)
        signed_bytes += signed
        hub.receive(payload, device.name)

    def publish() -> None:
        model = hub.maybe_publish()
        if model is None:
            return
        for device in devices:
            device.adopt(model)
        if options.eval_every and model.version % options.eval_every == 0:
            scores = [d.learner.evaluate(d.data.hx, d.data.hy) for d in devices]
            curve.append(CurvePoint(
                model.version, local_rounds, sum(sizes),
                float(np.mean([s.personal_accuracy for s in scores])),
                float(np.mean([s.global_accuracy for s in scores]))))
        if progress and (model.version % 10 == 0 or model.version == options.rounds):
            progress(f"version {model.version}")

    # Simulated time, in rounds of a typical fast device; slow ones take `slow_factor` x.
    slow = set(rng.choice(len(devices), round(options.slow_share * len(devices)),
                          replace=False).tolist())

    def duration(i: int) -> float:
        return (options.slow_factor if i in slow else 1.0) * rng.uniform(0.8, 1.2)

    shares = bool(devices[0].learner.strategy.shared)
    if options.mode == "sync":
        for _ in range(options.rounds):
            chosen = rng.choice(len(devices), options.per_round, replace=False)
            for i in chosen:
                send(devices[i], devices[i].round())
            clock += max(duration(i) for i in chosen)  # a round waits for its slowest
            local_rounds += options.per_round
            publish()
    else:
        # (finish time, device, its update): an update is computed when its round
        # starts, on the version the device holds then, and arrives when it ends.
        running: list[tuple[float, int, bytes | None]] = []
        for i, device in enumerate(devices):
            heapq.heappush(running, (duration(i), i, device.round()))
        # A fleet whose every update is refused (a wrecked model) makes no versions:
        # it stops after ASYNC_STALL x the rounds a working one needs.
        while (hub.current.version < options.rounds and local_rounds < ASYNC_STALL * budget
               if shares else local_rounds < budget):
            clock, i, payload = heapq.heappop(running)
            local_rounds += 1
            if payload is not None:
                send(devices[i], payload)
                publish()
            heapq.heappush(running, (clock + duration(i), i, devices[i].round()))

    return SimResult(options=options, people=[_scored(d.learner, d.data) for d in devices],
                     versions=hub.current.version,
                     local_rounds=local_rounds, updates_folded=hub.folded,
                     updates_dropped=hub.dropped, uplink_values=hub.uplink,
                     sim_time=round(clock, 3),
                     wall_s=round(time.perf_counter() - started, 3),
                     attackers=[d.data.person for d in devices if d.factor != 1.0],
                     updates_rejected=hub.rejected,
                     updates_invalid=hub.invalid + sum(d.unsendable for d in devices),
                     updates_clipped=0 if hub.screen is None else hub.screen.clipped,
                     uplink_bytes=sum(sizes), uplink_signed_bytes=signed_bytes,
                     updates_sent=len(sizes),
                     update_bytes_median=float(np.median(sizes)) if sizes else 0.0, curve=curve)


def pooled(options: SimOptions, *, fleet: Sequence[DeviceData] | None = None,
           epochs: int = 60, learning_rate: float = 0.1,
           head_epochs: int = 100) -> list[PersonResult]:
    """The centralized reference: every device's training windows in one place (each
    standardized with its own device's statistics), one model trained on them all, then
    each person's head fine-tuned on their own windows as ``finetune`` does, and scored
    as `simulate` scores. It moves the raw data that federation must not, so it bounds
    what a global model can reach on these windows (bench-personalization's
    "pooled" rows). The defaults are the best measured: 60 epochs at 0.1 (of 30 at
    0.1, 30 at 0.2, 60 at 0.1), head epochs 100 (of 5, 30, 100)."""
    spec = ModelSpec.from_manifest(options.manifest, options.model)
    if fleet is None:
        fleet = load_fleet(options.people, label_skew=options.label_skew, seed=options.seed,
                           feature_set=spec.features)
    training = TrainingConfig(epochs=epochs, learning_rate=learning_rate,
                              head_epochs=head_epochs)
    learners = []
    for data in fleet:
        learner = Learner(TrainableModel(spec), training, strategy="finetune",
                          seed=options.seed * 1000 + data.person)
        learner.fit_scaler(data.x)
        learners.append(learner)
    central = Learner(TrainableModel(spec), training, strategy="fedavg", seed=options.seed)
    x = [learner.standardize(data.x) for learner, data in zip(learners, fleet, strict=True)]
    central.fit(central.model.train_step, np.concatenate(x),
                np.concatenate([data.y for data in fleet]), epochs)
    model = _global_model(spec, 1, central.model.get_parts())
    for learner, data in zip(learners, fleet, strict=True):
        learner.apply_global(model)
        learner.personalize(data.x, data.y)
    return [_scored(learner, data) for learner, data in zip(learners, fleet, strict=True)]
