"""HubCore (fedd/hub/service.py): verify, fold and version, on a real model store."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedd import topics
from fedd.config import HubConfig, RobustConfig, load_hub_config
from fedd.hub.aggregate import weighted_mean
from fedd.hub.ledger import Ledger
from fedd.hub.models import ModelStore
from fedd.hub.robust import Median, update_norm
from fedd.hub.service import HubCore, Receipt, Rejected
from fedd.model import ModelSpec, TrainableModel
from fedd.pipeline import Pipeline
from fedd.wire import ModelUpdate, encode_deltas

MANIFEST = Path(__file__).resolve().parents[2] / "models" / "manifest.json"
FLEET = "lab"


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.from_manifest(MANIFEST, "har-mlp")


@pytest.fixture(scope="module")
def initial_parts(spec: ModelSpec) -> dict[str, np.ndarray]:
    return TrainableModel(spec).get_parts()


def hub_config(tmp_path: Path, learning_rate: float = 1.0) -> HubConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "hub.yaml"
    path.write_text(textwrap.dedent(f"""\
        fleet: {FLEET}
        state_dir: {tmp_path / "state"}
        model:
          manifest: {MANIFEST}
          name: har-mlp
        aggregation:
          buffer_size: 2
          quorum: 1
          max_wait_s: 60
          max_staleness: 2
          staleness_exponent: 0.5
          server_learning_rate: {learning_rate}
        limits:
          max_update_bytes: 200000
        """))
    return load_hub_config(path)


@pytest.fixture
def config(tmp_path: Path) -> HubConfig:
    return hub_config(tmp_path)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite"


@pytest.fixture
def core(config: HubConfig, spec: ModelSpec, store: ModelStore, ledger_path: Path) -> HubCore:
    return HubCore(config, spec, store, Ledger(ledger_path))


def restarted(core: HubCore, config: HubConfig, spec: ModelSpec, ledger_path: Path) -> HubCore:
    """A new hub on the same model store and ledger, as after a crash."""
    return HubCore(config, spec, ModelStore(core.store.directory), Ledger(ledger_path))


def delta(spec: ModelSpec, seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (scale * rng.normal(0, 1, n)).astype(np.float32)
            for name, n in spec.parts.items()}


def payload(spec: ModelSpec, device: str = "dev-1", seq: int = 0, base: int = 0,
            num_samples: int = 100, parts: dict[str, np.ndarray] | None = None,
            model: str = "har-mlp", seed: int = 0, codec: str = "float32",
            payloads: dict[str, bytes] | None = None) -> bytes:
    """An encoded update of float32 deltas through `codec`, or of raw part `payloads`."""
    fields = dict(device=device, seq=seq, base_version=base, model=model,
                  num_samples=num_samples, created=1_700_000_000.0)
    if payloads is not None:
        return ModelUpdate(parts=payloads, codec=Pipeline.from_spec(codec).spec,
                           **fields).encode()
    return ModelUpdate.from_deltas(delta(spec, seed) if parts is None else parts, codec=codec,
                                   rng=np.random.default_rng(seed), **fields).encode()


def float32_payload(values: np.ndarray) -> bytes:
    """A float32-stack payload written by hand (so it may hold NaN); n < 2**14."""
    n = values.size
    return (Pipeline.from_spec("float32").header + bytes([n & 0x7F | 0x80, n >> 7])
            + np.asarray(values, "<f4").tobytes())


def topic(device: str) -> str:
    return topics.update(FLEET, device)


def send(core: HubCore, spec: ModelSpec, **kw: Any) -> Receipt:
    device = kw.get("device", "dev-1")
    return core.receive(topic(device), payload(spec, **kw), now=0.0)


def refusal(core: HubCore, where: str, body: bytes) -> str:
    """The reason an update is refused: raised (no readable seq) or acknowledged."""
    try:
        receipt = core.receive(where, body, now=0.0)
    except Rejected as exc:
        return exc.reason
    assert receipt.outcome == "rejected" and not receipt.duplicate
    return str(receipt.reason)


PUSHER_SEQS = itertools.count(1000)


def advance(core: HubCore, spec: ModelSpec, versions: int, device: str = "pusher") -> None:
    """Cut `versions` new versions from fresh updates of one device."""
    for _ in range(versions):
        for _ in range(core.config.aggregation.buffer_size):
            seq = next(PUSHER_SEQS)
            assert send(core, spec, device=device, seq=seq, base=core.current.version,
                        seed=seq).outcome == "accepted"
        assert core.buffer.ready(now=0.0)
        core.next_version()


def buffer_state(core: HubCore) -> tuple[Any, ...]:
    """What the buffer holds, read back by flushing a copy of it."""
    if not len(core.buffer):
        return (0, core.buffer.due_at())
    flushed = copy.deepcopy(core.buffer).flush()
    return (len(core.buffer), core.buffer.due_at(), flushed.contributors, flushed.samples,
            flushed.mean_staleness, {n: v.tobytes() for n, v in flushed.delta.items()})


# ---------------------------------------------------------------- version 0


def test_version_zero_is_the_models_initial_weights(
        core: HubCore, store: ModelStore, spec: ModelSpec,
        initial_parts: dict[str, np.ndarray]) -> None:
    v0 = core.current
    assert (v0.version, v0.parent, v0.contributors, v0.mean_staleness) == (0, None, 0, 0.0)
    assert (v0.model, v0.model_sha256) == ("har-mlp", spec.sha256)
    assert {n: len(p) for n, p in v0.parts.items()} == spec.parts
    for name, values in initial_parts.items():
        assert v0.parts[name].tobytes() == values.tobytes()
    assert store.versions() == [0]
    stored = store.load(0)
    assert stored.digest == v0.digest
    assert (store.directory / "v00000000.cbor").read_bytes() == v0.encode()


def test_status_before_any_update(core: HubCore) -> None:
    status = core.status()
    assert status["version"] == 0 and status["digest"] == core.current.digest
    assert (status["buffered"], status["accepted"], status["rejected"], status["devices"],
            status["duplicates"], status["ledger"]) == (0, 0, {}, 0, 0, {})


# --------------------------------------------------------------- aggregation


def test_two_updates_make_version_one(core: HubCore, store: ModelStore, spec: ModelSpec) -> None:
    v0 = core.current
    d1, d2 = delta(spec, 1), delta(spec, 2)
    first = send(core, spec, device="dev-1", parts=d1, num_samples=120)
    assert first == Receipt("dev-1", 0, "accepted", staleness=0, weight=120.0)
    assert len(core.buffer) == 1 and not core.buffer.ready(now=1.0)
    send(core, spec, device="dev-2", parts=d2, num_samples=40)
    assert core.buffer.ready(now=0.0)
    v1 = core.next_version()
    assert (v1.version, v1.parent, v1.contributors, v1.mean_staleness) == (1, 0, 2, 0.0)
    assert core.current is v1 and len(core.buffer) == 0
    for name in spec.parts:
        mean = (120 * d1[name].astype(np.float64) + 40 * d2[name]) / 160
        np.testing.assert_allclose(v1.parts[name], v0.parts[name] + mean, rtol=1e-6, atol=1e-7)
    assert store.versions() == [0, 1]
    assert store.load(1).digest == v1.digest
    assert core.status()["accepted"] == 2 and core.status()["devices"] == 2
    assert core.status()["ledger"] == {"folded": 2}


def test_stale_update_is_damped_and_learning_rate_applied(
        tmp_path: Path, spec: ModelSpec, store: ModelStore, ledger_path: Path) -> None:
    core = HubCore(hub_config(tmp_path, learning_rate=0.5), spec, store, Ledger(ledger_path))
    advance(core, spec, 1)
    v1 = core.current
    fresh, stale = delta(spec, 11), delta(spec, 12)
    send(core, spec, device="a", seq=0, base=1, parts=fresh, num_samples=30)
    accepted = send(core, spec, device="b", seq=0, base=0, parts=stale, num_samples=70)
    assert accepted.staleness == 1
    assert accepted.weight == pytest.approx(70 * 2 ** -0.5)
    v2 = core.next_version()
    assert v2.mean_staleness == 0.5
    for name in spec.parts:
        mean = (30 * fresh[name].astype(np.float64) + 70 * 2 ** -0.5 * stale[name]) / 100
        np.testing.assert_allclose(v2.parts[name], v1.parts[name] + 0.5 * mean,
                                   rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- rejections


@pytest.mark.parametrize(("make", "reason"), [
    (lambda spec: (topic("dev-2"), payload(spec, device="dev-1")), "device-mismatch"),
    (lambda spec: (topic("dev-1"), payload(spec, model="har-cnn")), "wrong-model"),
    (lambda spec: (topic("dev-1"), payload(spec, parts={"body": np.zeros(8287, np.float32)})),
     "payload-wrong-length"),
    (lambda spec: (topic("dev-1"), payload(spec, parts={
        "body": np.zeros(8288, np.float32), "head": np.zeros(197, np.float32)})),
     "payload-wrong-length"),
    (lambda spec: (topic("dev-1"), payload(spec, parts={
        **delta(spec, 0), "tail": np.zeros(1, np.float32)})), "wrong-shape"),
    (lambda spec: (topic("dev-1"), payload(spec, payloads={
        "body": float32_payload(np.full(8288, np.nan, np.float32))})), "payload-non-finite"),
    (lambda spec: (topic("dev-1"), payload(spec, payloads={
        "body": float32_payload(np.zeros(8288, np.float32))[:-1]})), "payload-truncated"),
    (lambda spec: (topic("dev-1"), payload(spec, payloads={
        "body": Pipeline.from_spec("topk:0.01+q:4").encode(
            np.ones(8288, np.float32)).payload})), "payload-stack-mismatch"),
    (lambda spec: (topic("dev-1"), payload(spec, payloads={
        "body": b"\x02" + float32_payload(np.zeros(8288, np.float32))[1:]})),
     "payload-unknown-version"),
    (lambda spec: (topic("dev-1"), payload(spec, base=1)), "future-base"),
    (lambda spec: (topic("dev-1"), b"\xffgarbage"), "not-cbor"),
    (lambda spec: (topic("dev-1"), payload(spec)[:-7]), "not-cbor"),
    (lambda spec: (topic("dev-1"), b"\xa0"), "bad-keys"),
    (lambda spec: (topic("dev-1"), b"\0" * 200001), "too-large"),
], ids=["device-mismatch", "wrong-model", "short-body-alone", "short-part", "extra-part",
        "nan-payload", "truncated-payload", "other-stack", "payload-version", "future-base",
        "garbage", "truncated", "empty-map", "too-large"])
def test_rejections_are_counted_and_change_nothing(
        core: HubCore, spec: ModelSpec, make: Any, reason: str) -> None:
    send(core, spec, device="other", seq=0, seed=5)
    before = buffer_state(core)
    where, body = make(spec)
    assert refusal(core, where, body) == reason
    assert core.rejected == {reason: 1}
    assert core.accepted == 1
    assert buffer_state(core) == before
    assert core.status()["rejected"] == {reason: 1}
    # A refusal with a readable (device, seq) is recorded, so its resend is recognized.
    recorded = core.ledger.counts().get("rejected", 0)
    assert core.ledger.counts()["buffered"] == 1
    assert recorded == (0 if reason in ("not-cbor", "bad-keys", "too-large") else 1)


def test_a_resend_is_acknowledged_again_and_never_folded_twice(
        core: HubCore, spec: ModelSpec) -> None:
    assert send(core, spec, device="dev-1", seq=5).outcome == "accepted"
    before = buffer_state(core)
    for _ in range(3):
        assert send(core, spec, device="dev-1", seq=5) == Receipt(
            "dev-1", 5, "accepted", duplicate=True)
    assert (core.duplicates, core.accepted, core.rejected) == (3, 1, {})
    assert buffer_state(core) == before
    # Sequence numbers are per device; a lower, unseen one is simply new.
    assert send(core, spec, device="dev-2", seq=5).outcome == "accepted"
    assert send(core, spec, device="dev-1", seq=4).outcome == "accepted"
    assert core.accepted == 3


def test_a_rejected_update_resent_gets_the_same_rejection(
        core: HubCore, spec: ModelSpec) -> None:
    assert send(core, spec, device="dev-1", seq=3, base=9) == Receipt(
        "dev-1", 3, "rejected", "future-base")
    # Even if the resend would now pass: the device's update 3 was settled once.
    assert send(core, spec, device="dev-1", seq=3, base=0) == Receipt(
        "dev-1", 3, "rejected", "future-base", duplicate=True)
    assert core.rejected == {"future-base": 1} and core.accepted == 0
    assert len(core.buffer) == 0


def test_too_stale_after_advancing(core: HubCore, spec: ModelSpec) -> None:
    advance(core, spec, 2)
    assert core.current.version == 2
    assert send(core, spec, device="d", seq=0, base=0).staleness == 2  # max_staleness: kept
    advance(core, spec, 1)
    assert core.current.version == 3
    before = buffer_state(core)
    assert send(core, spec, device="d", seq=1, base=0) == Receipt("d", 1, "rejected",
                                                                  "too-stale")
    assert core.rejected == {"too-stale": 1}
    assert buffer_state(core) == before


def test_rejected_updates_leave_the_next_version_unchanged(
        tmp_path: Path, spec: ModelSpec) -> None:
    """Same accepted updates, with or without rejected ones between: same version."""
    digests = []
    for run, noisy in enumerate((False, True)):
        core = HubCore(hub_config(tmp_path / str(run)), spec, ModelStore(tmp_path / f"m{run}"),
                       Ledger(tmp_path / f"ledger{run}.sqlite"))
        send(core, spec, device="a", seq=0, seed=21, num_samples=10)
        if noisy:
            assert send(core, spec, device="a", seq=0, seed=99).duplicate
            for bad in (dict(device="b", seq=1, base=7, seed=98),
                        dict(device="b", seq=2, model="nope", seed=97)):
                assert send(core, spec, **bad).outcome == "rejected"
        send(core, spec, device="b", seq=0, seed=22, num_samples=30)
        digests.append(core.next_version().digest)
    assert digests[0] == digests[1]


# -------------------------------------------------------------------- restart


def test_restart_resumes_at_the_latest_version(
        core: HubCore, config: HubConfig, spec: ModelSpec, store: ModelStore,
        ledger_path: Path) -> None:
    advance(core, spec, 3)
    latest = core.current
    again = restarted(core, config, spec, ledger_path)
    assert again.current.version == 3
    assert again.current.digest == latest.digest
    assert again.current.parent == 2
    assert store.versions() == [0, 1, 2, 3]
    for name in spec.parts:
        assert again.current.parts[name].tobytes() == latest.parts[name].tobytes()
    # It goes on from there, not from version 0.
    advance(again, spec, 1, device="after")
    assert again.current.version == 4 and store.versions()[-1] == 4


def test_restart_over_version_zero_only(core: HubCore, config: HubConfig, spec: ModelSpec,
                                        store: ModelStore, ledger_path: Path) -> None:
    again = restarted(core, config, spec, ledger_path)
    assert again.current.version == 0 and again.current.digest == core.current.digest
    assert store.versions() == [0]


def test_restart_rebuilds_the_buffer_of_acknowledged_updates(
        core: HubCore, config: HubConfig, spec: ModelSpec, ledger_path: Path,
        tmp_path: Path) -> None:
    """An acknowledged update is never lost: a hub that stops mid-buffer folds it again."""
    send(core, spec, device="a", seq=0, seed=31, num_samples=20)
    before = buffer_state(core)
    again = restarted(core, config, spec, ledger_path)
    # The same buffer; its deadline is on this process's clock (tests fold at now=0).
    assert buffer_state(again)[::2] == before[::2] and buffer_state(again)[3:] == before[3:]
    assert send(again, spec, device="a", seq=0, seed=31).duplicate
    send(again, spec, device="b", seq=0, seed=32, num_samples=60)
    # The same version as a hub that never stopped would have made.
    steady = HubCore(hub_config(tmp_path / "steady"), spec, ModelStore(tmp_path / "steady"),
                     Ledger(tmp_path / "steady.sqlite"))
    send(steady, spec, device="a", seq=0, seed=31, num_samples=20)
    send(steady, spec, device="b", seq=0, seed=32, num_samples=60)
    assert again.next_version().digest == steady.next_version().digest


def test_a_crash_between_saving_a_version_and_marking_its_updates(
        core: HubCore, config: HubConfig, spec: ModelSpec, ledger_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The saved version already holds the buffered updates: a restart must not fold
    them into the next one as well."""
    for device in ("a", "b"):
        send(core, spec, device=device, seq=0, seed=41)
    monkeypatch.setattr(core.ledger, "folded_into", lambda version: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        core.next_version()
    assert core.store.versions() == [0, 1]
    again = restarted(core, config, spec, ledger_path)
    assert again.current.version == 1 and len(again.buffer) == 0
    assert again.ledger.counts() == {"folded": 2}
    assert send(again, spec, device="a", seq=0, seed=41).duplicate


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_overflowing_updates_never_make_an_unloadable_version(
        tmp_path: Path, spec: ModelSpec, ledger_path: Path) -> None:
    # Without the norm screen, which would refuse them first (norm-outlier).
    config = dataclasses.replace(hub_config(tmp_path), robust=RobustConfig(
        clip_multiple=None, reject_multiple=None))
    core = HubCore(config, spec, ModelStore(tmp_path / "models"), Ledger(ledger_path))
    huge = {name: np.full(n, np.finfo(np.float32).max, np.float32)
            for name, n in spec.parts.items()}
    seq = 0
    for _ in range(2):
        for _ in range(2):
            with contextlib.suppress(Rejected):
                send(core, spec, device="evil", seq=seq, base=core.current.version, parts=huge)
            seq += 1
        if core.buffer.ready(now=0.0):
            with contextlib.suppress(Rejected):
                core.next_version()
    assert all(np.isfinite(p).all() for p in core.current.parts.values())
    assert core.ledger.counts().get("rejected:non-finite-result", 0) >= 2
    assert len(restarted(core, config, spec, ledger_path).buffer) == 0


def test_a_body_only_update_moves_only_the_body(core: HubCore, spec: ModelSpec) -> None:
    """FedPer/FedRep devices share the body alone; the global head stays as it was."""
    before = {name: values.copy() for name, values in core.current.parts.items()}
    body = np.full(spec.parts["body"], 0.05, np.float32)
    for device in ("dev-1", "dev-2"):
        core.receive(topic(device), payload(spec, device=device, parts={"body": body}))
    model = core.next_version()
    np.testing.assert_allclose(model.parts["body"], before["body"] + 0.05, rtol=1e-5)
    np.testing.assert_array_equal(model.parts["head"], before["head"])


# ---------------------------------------------------------------- compressed


def test_compressed_updates_fold_to_the_dense_reference(
        core: HubCore, spec: ModelSpec) -> None:
    """topk+q+zstd updates: the new version is v0 + the weighted mean of what was sent,
    and that is the top-k (float32) reference within 4-bit quantization error."""
    codec = "topk:0.01+q:4+zstd"
    v0 = core.current
    pipe = Pipeline.from_spec(codec)
    deltas = [delta(spec, seed) for seed in (1, 2)]
    counts = [100, 300]
    sent, sparse_only = [], []
    for i, (d, n) in enumerate(zip(deltas, counts, strict=True)):
        encoded = encode_deltas(pipe, d, rng=np.random.default_rng(i))
        assert encoded.bytes < 0.02 * sum(v.nbytes for v in d.values())
        core.receive(topic(f"dev-{i}"), ModelUpdate(
            device=f"dev-{i}", seq=0, base_version=0, model=spec.name, num_samples=n,
            parts=encoded.payloads, created=1.0, codec=pipe.spec).encode(), now=0.0)
        sent.append({name: pipe.decode(p, length=spec.parts[name], max_bytes=1 << 20)
                     for name, p in encoded.payloads.items()})
        sparse_only.append({name: Pipeline.from_spec("topk:0.01").decode(
            Pipeline.from_spec("topk:0.01").encode(v).payload, length=v.size,
            max_bytes=1 << 20) for name, v in d.items()})
    model = core.next_version()
    exact = weighted_mean(sent, counts, sum(counts))
    reference = weighted_mean(sparse_only, counts, sum(counts))
    for name in spec.parts:
        moved = model.parts[name] - v0.parts[name]
        np.testing.assert_allclose(moved, exact[name], rtol=1e-5, atol=1e-7)
        # 4 bits: at most one quantization step (2 * scale / 15) per sent value.
        step = 2 * max(float(np.abs(d[name]).max()) for d in deltas) / 15
        assert np.abs(moved - reference[name]).max() <= step
        assert np.count_nonzero(moved) <= sum(max(1, round(0.01 * spec.parts[name]))
                                              for _ in deltas)


def test_an_update_must_read_as_its_declared_codec(core: HubCore, spec: ModelSpec) -> None:
    sparse = Pipeline.from_spec("topk:0.01+q:4+zstd").encode(np.ones(8288, np.float32))
    assert refusal(core, topic("dev-1"), payload(spec, codec="float32", payloads={
        "body": sparse.payload})) == "payload-stack-mismatch"
    assert send(core, spec, seq=1, codec="topk:0.01+q:4+zstd").outcome == "accepted"


# ---------------------------------------------------------------- robust aggregation


def robust_core(tmp_path: Path, spec: ModelSpec, **robust: Any) -> HubCore:
    """A hub with its `robust:` section set (bounds as shipped unless given)."""
    config = dataclasses.replace(hub_config(tmp_path), robust=RobustConfig(**robust))
    return HubCore(config, spec, ModelStore(tmp_path / "models"),
                   Ledger(tmp_path / "ledger.sqlite"))


def scaled(spec: ModelSpec, seed: int, factor: float) -> dict[str, np.ndarray]:
    return {name: factor * values for name, values in delta(spec, seed).items()}


def test_a_norm_outlier_is_rejected_counted_and_acknowledged(
        tmp_path: Path, spec: ModelSpec) -> None:
    core = robust_core(tmp_path, spec, warmup=4, norm_history=10)
    advance(core, spec, 2)  # 4 accepted updates of about the same norm
    before = buffer_state(core)
    receipt = send(core, spec, device="evil", seq=0, parts=scaled(spec, 7, 100.0), base=2)
    assert receipt == Receipt("evil", 0, "rejected", "norm-outlier")
    assert core.rejected == {"norm-outlier": 1} and buffer_state(core) == before
    assert core.ledger.counts()["rejected:norm-outlier"] == 1
    assert send(core, spec, device="evil", seq=0, parts=scaled(spec, 7, 100.0), base=2) == (
        Receipt("evil", 0, "rejected", "norm-outlier", duplicate=True))
    robust = core.status()["robust"]
    assert (robust["checked"], robust["rejected"], robust["history"]) == (5, 1, 5)  # type: ignore[index]
    assert core.ledger.recent_norms(10)[-1] == pytest.approx(update_norm(scaled(spec, 7, 100.0)))
    # While warming up, no update may outgrow the model (norm 11.4) it is added to.
    fresh = robust_core(tmp_path / "fresh", spec, warmup=4, norm_history=10)
    assert send(fresh, spec, device="evil", seq=0, parts=scaled(spec, 7, 100.0)) == Receipt(
        "evil", 0, "rejected", "norm-outlier")
    assert send(fresh, spec, device="evil", seq=1, parts=scaled(spec, 7, 10.0)).outcome == (
        "accepted")  # norm 9.2
    assert fresh.status()["robust"]["clipped"] == 0  # type: ignore[index]


def test_an_update_above_the_clip_bound_is_folded_scaled_onto_it(
        tmp_path: Path, spec: ModelSpec) -> None:
    core = robust_core(tmp_path, spec, warmup=4, norm_history=10, clip_multiple=3.0)
    advance(core, spec, 2)
    v2 = core.current
    median = float(np.median(core.screen.tracker.norms))
    big, small = scaled(spec, 8, 5.0), delta(spec, 9)
    assert send(core, spec, device="a", parts=big, num_samples=10, base=2).outcome == "accepted"
    assert send(core, spec, device="b", parts=small, num_samples=30, base=2).outcome == (
        "accepted")
    scale = 3.0 * median / update_norm(big)
    assert 0.1 < scale < 1
    assert core.ledger.buffered()[0].scale == pytest.approx(scale)
    v3 = core.next_version()
    for name in spec.parts:
        mean = (10 * scale * big[name].astype(np.float64) + 30 * small[name]) / 40
        np.testing.assert_allclose(v3.parts[name], v2.parts[name] + mean, rtol=1e-5, atol=1e-6)
    assert core.status()["robust"]["clipped"] == 1  # type: ignore[index]


def test_a_restarted_hub_keeps_its_norm_history_and_refolds_with_the_same_scale(
        tmp_path: Path, spec: ModelSpec) -> None:
    core = robust_core(tmp_path, spec, warmup=4, norm_history=6)
    advance(core, spec, 3)
    assert send(core, spec, device="a", parts=scaled(spec, 8, 5.0), base=3).outcome == (
        "accepted")
    before, norms = buffer_state(core), core.screen.tracker.norms
    assert len(norms) == 6  # 7 screened, the newest 6 kept
    again = HubCore(core.config, spec, ModelStore(core.store.directory),
                    Ledger(tmp_path / "ledger.sqlite"))
    assert again.screen.tracker.norms == norms
    state = buffer_state(again)
    assert state[0] == before[0] and state[2:] == before[2:]  # the deadline is on a new clock
    for seq, hub in enumerate((core, again)):
        assert send(hub, spec, device="evil", seq=seq, parts=scaled(spec, 9, 50.0), base=3) == (
            Receipt("evil", seq, "rejected", "norm-outlier"))


def test_reloading_another_rule_refolds_the_buffer(tmp_path: Path, spec: ModelSpec) -> None:
    core = robust_core(tmp_path, spec)
    deltas = [delta(spec, seed) for seed in (1, 2, 3)]
    for i, d in enumerate(deltas):
        assert send(core, spec, device=f"d{i}", parts=d, num_samples=10 + i).outcome == (
            "accepted")
    assert core.status()["robust"]["buffer_bytes"] == 8 * sum(spec.parts.values())  # type: ignore[index]
    core.reconfigure(dataclasses.replace(core.config, robust=RobustConfig(rule="median")))
    assert isinstance(core.buffer.reducer, Median) and len(core.buffer) == 3
    assert core.status()["robust"]["buffer_bytes"] == 3 * 4 * sum(spec.parts.values())  # type: ignore[index]
    v0 = core.current
    v1 = core.next_version()
    for name in spec.parts:
        median = np.median([d[name] for d in deltas], axis=0)
        np.testing.assert_allclose(v1.parts[name], v0.parts[name] + median, rtol=1e-6,
                                   atol=1e-7)


def test_huge_updates_are_norm_outliers_from_the_first_one(core: HubCore,
                                                         spec: ModelSpec) -> None:
    huge = {name: np.full(n, np.finfo(np.float32).max, np.float32)
            for name, n in spec.parts.items()}
    for seq in range(3):
        assert send(core, spec, device="evil", seq=seq, parts=huge).reason == "norm-outlier"
    assert len(core.buffer) == 0


# ------------------------------------------------------------ update format 2


def payload2(spec: ModelSpec, **kw: Any) -> bytes:
    """`payload(spec, ...)` as a format-2 update (what the agent sends) for model `spec`."""
    update = ModelUpdate.decode(payload(spec, **{"model": spec.name, **kw}), max_bytes=1 << 20)
    return replace(update, format=2).encode(model=spec)


def test_format2_updates_fold_as_format1_does(
        core: HubCore, spec: ModelSpec, tmp_path: Path) -> None:
    """The hub reads both formats (a fleet upgrades gradually) and folds them alike."""
    other = HubCore(hub_config(tmp_path / "other"), spec, ModelStore(tmp_path / "other"),
                    Ledger(tmp_path / "other.sqlite"))
    for device, seed, samples in (("dev-1", 1, 120), ("dev-2", 2, 40)):
        kw = dict(device=device, seed=seed, num_samples=samples, codec="topk:0.01+q:4+zstd")
        assert core.receive(topic(device), payload(spec, **kw), now=0.0).outcome == "accepted"
        got = other.receive(topic(device), payload2(spec, **kw), now=0.0)
        assert got == Receipt(device, 0, "accepted", staleness=0, weight=float(samples))
    assert core.next_version().digest == other.next_version().digest


def test_a_format2_resend_of_a_format1_update_is_a_duplicate(
        core: HubCore, spec: ModelSpec) -> None:
    assert send(core, spec, device="dev-1", seq=5).outcome == "accepted"
    again = core.receive(topic("dev-1"), payload2(spec, device="dev-1", seq=5), now=0.0)
    assert again == Receipt("dev-1", 5, "accepted", duplicate=True)


def test_format2_takes_its_device_from_the_topic_and_its_model_from_the_tag(
        core: HubCore, spec: ModelSpec) -> None:
    # The device field is not on the wire: the topic (mTLS + ACL) is the device.
    body = payload2(spec, device="dev-1", seq=1)
    assert core.receive(topic("dev-9"), body, now=0.0) == Receipt(
        "dev-9", 1, "accepted", staleness=0, weight=100.0)
    cnn = ModelSpec.from_manifest(MANIFEST, "har-cnn")
    alien = payload2(cnn, device="dev-1", seq=2, parts={
        name: np.zeros(n, np.float32) for name, n in cnn.parts.items()})
    assert refusal(core, topic("dev-1"), alien) == "wrong-model"  # unreadable: no seq
    assert refusal(core, topic("dev-1"), body[:-1] + bytes([body[-1] ^ 1])) == "bad-checksum"
    assert core.rejected == {"wrong-model": 1, "bad-checksum": 1}


def test_restart_rebuilds_a_buffer_of_format2_updates(
        core: HubCore, config: HubConfig, spec: ModelSpec, ledger_path: Path) -> None:
    core.receive(topic("a"), payload2(spec, device="a", seq=0, seed=31), now=0.0)
    core.receive(topic("b"), payload2(spec, device="b", seq=0, seed=32,
                                      parts={"body": delta(spec, 32)["body"]}), now=0.0)
    before = buffer_state(core)
    again = restarted(core, config, spec, ledger_path)
    assert buffer_state(again)[::2] == before[::2] and buffer_state(again)[3:] == before[3:]
    assert again.ledger.counts() == {"buffered": 2}
