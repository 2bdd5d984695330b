"""A real hub and real agents exchange updates through a real Mosquitto."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import cbor2
import numpy as np
import pytest

from fedd import topics
from fedd.link import Message
from fedd.model import ModelSpec
from fedd.pipeline import Pipeline
from fedd.wire import Ack, GlobalModel, Heartbeat, ModelUpdate

pytestmark = pytest.mark.integration

MAX_MODEL_BYTES = 64 * 2**20
TIMEOUT_S = 60.0


def _stored(hub_state: Path, version: int) -> Path:
    return hub_state / "models" / f"v{version:08d}.cbor"


def _status_state(message: Message | None) -> str | None:
    return None if message is None else json.loads(message.payload)["state"]


def test_hub_and_agents_exchange_updates(broker, probe, fedd, agent_yaml, hub_yaml, tmp_path,
                                         wait_for, status_of):
    fleet = "exchange"
    hub_state = tmp_path / "hub-state"
    # K = 2 with a quorum of 1: one agent alone gets versions through the T rule,
    # two agents through the K rule.
    hub = fedd.hub("hub", hub_yaml(tmp_path / "hub.yaml", broker=broker, state_dir=hub_state,
                                   fleet=fleet, aggregation={"buffer_size": 2, "quorum": 1,
                                                             "max_wait_s": 1.0}))
    first = probe.first(topics.model_current(fleet), what="the hub's version 0")
    assert GlobalModel.decode(first.payload, max_bytes=MAX_MODEL_BYTES).version == 0
    assert probe.retained(topics.model_current(fleet)) is not None, "version 0 is not retained"

    agents = {}
    for person, device in ((1, "dev-a"), (2, "dev-b")):
        state = tmp_path / f"{device}-state"
        config = agent_yaml(tmp_path / f"{device}.yaml", broker=broker, device_id=device,
                            state_dir=state, fleet=fleet, person=person)
        agents[device] = (fedd.agent(device, config), state)
        process = agents[device][0]

        status = wait_for(
            lambda state=state: (s := status_of(state)) and s["model_version"] is not None
            and s["model_version"] >= 1 and s["updates_sent"] >= 1 and s,
            timeout=TIMEOUT_S, what=f"{device} to adopt a version >= 1 and send an update",
            watch=[hub, process])
        assert status["device"] == device
        assert status["last_update"]["seq"] >= 0
        hub_status = wait_for(
            lambda: (s := status_of(hub_state)) and s["devices"] >= len(agents) and s,
            timeout=TIMEOUT_S, what=f"the hub to accept updates from {len(agents)} device(s)",
            watch=[hub])
        assert hub_status["accepted"] >= len(agents)
        assert hub_status["version"] >= 1
        assert hub_status["rejected"] == {}

        # The retained current model is exactly what the hub stored for that version.
        current = probe.retained(topics.model_current(fleet))
        assert current is not None, "no retained model/current"
        model = GlobalModel.decode(current.payload, max_bytes=MAX_MODEL_BYTES)
        assert model.version >= 1
        assert model.parent == model.version - 1
        assert model.contributors >= 1
        assert _stored(hub_state, model.version).read_bytes() == current.payload

        # Heartbeats decode strictly and describe this device.
        beats = probe.collect([topics.heartbeat(fleet, device)], lambda ms: len(ms) >= 2,
                              timeout=TIMEOUT_S, what=f"two heartbeats of {device}")
        for message in beats:
            beat = Heartbeat.decode(message.payload)
            assert beat.device == device
            assert beat.model_version is not None and beat.model_version >= 1
            assert beat.windows > 0
            assert beat.delegate

        online = probe.retained(topics.status(fleet, device))
        assert _status_state(online) == "online"

    assert all(p.alive() for p, _ in agents.values())
    assert hub.alive()
    for device, (process, state) in agents.items():
        assert process.terminate() == 0, process.tail()
        assert "stopped cleanly" in process.log()
        offline = probe.retained(topics.status(fleet, device))
        assert _status_state(offline) == "offline"
        assert status_of(state)["updates_sent"] >= 1

    final = status_of(hub_state)
    assert final["devices"] == 2
    # Every stored version decodes and chains to its parent.
    versions = sorted(int(p.stem[1:]) for p in (hub_state / "models").glob("v*.cbor"))
    assert versions == list(range(len(versions))) and versions[-1] >= 2
    assert hub.terminate() == 0, hub.tail()


def _update(spec: ModelSpec, *, device: str, seq: int, base_version: int,
            parts: dict[str, np.ndarray] | None = None, codec: str = "float32",
            payloads: dict[str, bytes] | None = None) -> bytes:
    fields = dict(device=device, seq=seq, base_version=base_version, model=spec.name,
                  num_samples=10, created=1.0)
    if payloads is not None:  # raw part payloads, e.g. a hand-made bad one
        return ModelUpdate(parts=payloads, codec=codec, **fields).encode()
    parts = parts if parts is not None else {
        name: np.full(size, 1e-3, np.float32) for name, size in spec.parts.items()}
    return ModelUpdate.from_deltas(parts, codec=codec, **fields).encode()


def _nan_body(spec: ModelSpec) -> bytes:
    """A float32-stack body payload holding NaN, written by hand (no encoder makes one)."""
    n = spec.parts["body"]
    return (Pipeline.from_spec("float32").header + bytes([n & 0x7F | 0x80, n >> 7])
            + np.full(n, np.nan, "<f4").tobytes())


def test_malformed_updates_are_counted_and_the_hub_keeps_folding(
        broker, probe, fedd, hub_yaml, manifest_path, tmp_path, wait_for, status_of):
    fleet = "malformed"
    hub_state = tmp_path / "hub-state"
    hub = fedd.hub("hub", hub_yaml(tmp_path / "hub.yaml", broker=broker, state_dir=hub_state,
                                   fleet=fleet, limits={"max_update_bytes": 65536}))
    probe.first(topics.model_current(fleet), what="the hub's retained version 0")
    spec = ModelSpec.from_manifest(manifest_path, "har-mlp")
    topic = topics.update(fleet, "probe-1")

    # Refusals with a readable (device, seq) are recorded and acknowledged: each gets
    # its own seq, as a device's resends of a settled update would be duplicates.
    bad = {
        "not-cbor": b"\xff\xfe this is not CBOR",
        "not-a-map": cbor2.dumps([1, 2, 3]),
        "bad-keys": cbor2.dumps({"format": 1, "device": "probe-1"}),
        "too-large": b"\x00" * 70000,
        "wrong-shape": _update(spec, device="probe-1", seq=1, base_version=0,
                               parts={"tail": np.zeros(3, np.float32)}),
        "payload-wrong-length": _update(spec, device="probe-1", seq=2, base_version=0,
                                        parts={"body": np.zeros(3, np.float32)}),
        "payload-non-finite": _update(spec, device="probe-1", seq=3, base_version=0,
                                      payloads={"body": _nan_body(spec)}),
        "unknown-codec": cbor2.dumps({**cbor2.loads(_update(
            spec, device="probe-1", seq=4, base_version=0)), "codec": "gzip"}),
        "device-mismatch": _update(spec, device="someone-else", seq=5, base_version=0),
        "future-base": _update(spec, device="probe-1", seq=6, base_version=7),
    }
    acknowledged = ("wrong-shape", "payload-wrong-length", "payload-non-finite",
                    "device-mismatch", "future-base")
    valid = _update(spec, device="probe-1", seq=10, base_version=0)
    # One session, QoS 1: the hub sees them in this order, the valid one last.
    probe.publish(*((topic, payload) for payload in bad.values()), (topic, valid))

    status = wait_for(lambda: (s := status_of(hub_state)) and s["accepted"] >= 1 and s,
                      timeout=TIMEOUT_S, what="the valid update after the bad ones",
                      watch=[hub])
    assert status["rejected"] == dict.fromkeys(bad, 1)
    assert status["accepted"] == 1
    assert status["ledger"] == {"folded": 1, "rejected": len(acknowledged),
                                **{f"rejected:{r}": 1 for r in acknowledged}}
    model = GlobalModel.decode(
        probe.first(topics.model_current(fleet),
                    lambda m: GlobalModel.decode(m.payload, max_bytes=MAX_MODEL_BYTES).version
                    >= 1, what="version 1").payload, max_bytes=MAX_MODEL_BYTES)
    assert (model.version, model.contributors) == (1, 1)
    assert np.allclose(model.parts["body"] - GlobalModel.decode(
        _stored(hub_state, 0).read_bytes(), max_bytes=MAX_MODEL_BYTES).parts["body"], 1e-3,
        atol=1e-6)
    for reason in bad:
        assert reason in hub.log(), f"the hub did not log the {reason} rejection"

    # A replay of the same update is acknowledged as a duplicate and not folded again;
    # the next seq, compressed, is folded. The acknowledgements reach the device's topic.
    with probe.listening([topics.ack(fleet, "probe-1")]) as heard:
        probe.publish((topic, valid), (topic, _update(spec, device="probe-1", seq=11,
                                                      base_version=1,
                                                      codec="topk:0.01+q:4+zstd")))
        status = wait_for(lambda: (s := status_of(hub_state)) and s["accepted"] >= 2 and s,
                          timeout=TIMEOUT_S, what="the second valid update", watch=[hub])
        acks = [Ack.decode(m.payload) for m in heard(2, timeout=TIMEOUT_S)]
    assert [(a.seq, a.outcome, a.duplicate) for a in acks] == [
        (10, "accepted", True), (11, "accepted", False)]
    assert status["rejected"] == dict.fromkeys(bad, 1)
    assert status["duplicates"] == 1
    assert status["version"] == 2
    assert hub.alive()
    assert "Traceback" not in hub.log()
    assert hub.terminate() == 0, hub.tail()


def _residuals(state: Path) -> dict[str, np.ndarray]:
    """The error-feedback residuals in a stopped agent's store (state residual_<part>)."""
    with sqlite3.connect(state / "agent.sqlite") as db:
        rows = db.execute("SELECT key, value FROM state WHERE key LIKE 'residual_%'").fetchall()
    return {key.removeprefix("residual_"): np.frombuffer(value[1:], "<f4")
            for key, value in rows}


def test_compressed_updates_keep_their_residuals_across_a_restart(
        broker, fedd, agent_yaml, hub_yaml, manifest_path, tmp_path, wait_for, status_of):
    fleet = "residual"
    codec = Pipeline.from_spec("topk:0.01+q:4+zstd").spec
    hub_state, agent_state = tmp_path / "hub-state", tmp_path / "agent-state"
    hub = fedd.hub("hub", hub_yaml(tmp_path / "hub.yaml", broker=broker, state_dir=hub_state,
                                   fleet=fleet))
    config = agent_yaml(tmp_path / "agent.yaml", broker=broker, device_id="squeezed",
                        fleet=fleet, state_dir=agent_state, uplink={"codec": codec})
    first = fedd.agent("agent-1", config)
    status = wait_for(lambda: (s := status_of(agent_state)) and s["updates_sent"] >= 2 and s,
                      timeout=TIMEOUT_S, what="two compressed updates", watch=[hub, first])
    assert first.terminate() == 0, first.tail()
    status = status_of(agent_state)
    last = status["last_update"]
    assert last["codec"] == codec and status["last_update_bytes"] == last["bytes"]
    assert last["bytes"] < 1000, "a top-k 1 % update of har-mlp should be a few hundred bytes"
    assert status["uplink_bytes"] / status["updates_sent"] < 1200  # MQTT framing included
    spec = ModelSpec.from_manifest(manifest_path, "har-mlp")
    residuals = _residuals(agent_state)
    assert set(residuals) == set(spec.parts)
    assert all(r.size == spec.parts[n] and np.isfinite(r).all() for n, r in residuals.items())
    assert np.linalg.norm(residuals["body"]) > 0, "top-k 1 % leaves most of the delta unsent"

    second = fedd.agent("agent-2", config)
    line = second.wait_log("residuals carried")
    for name, residual in residuals.items():
        norm = re.search(rf"{name} \|r\|=([0-9.e+-]+)", line)
        assert norm, line
        assert float(norm.group(1)) == pytest.approx(float(np.linalg.norm(residual)), rel=1e-4)
    seq = last["seq"]
    wait_for(lambda: (s := status_of(agent_state)) and s["pid"] == second.pid
             and s["last_update"]["seq"] > seq and s,
             timeout=TIMEOUT_S, what="a compressed update from the second run",
             watch=[hub, second])
    assert second.terminate() == 0, second.tail()
    hub_status = status_of(hub_state)
    assert hub_status["rejected"] == {} and hub_status["accepted"] >= 3
    assert hub.terminate() == 0, hub.tail()


def test_an_agent_whose_training_diverges_sends_nothing_and_keeps_running(
        broker, probe, fedd, agent_yaml, manifest_path, tmp_path, wait_for, status_of):
    """A wrecked global version (finite, huge weights) makes local SGD overflow: the round is
    discarded with a log line, nothing is queued, and the agent waits for the next version
    instead of crashing (and being restarted into the same divergence by systemd)."""
    fleet, state = "diverge", tmp_path / "dev-state"
    spec = ModelSpec.from_manifest(manifest_path, "har-mlp")
    wrecked = GlobalModel(version=3, parent=2, model=spec.name, model_sha256=spec.sha256,
                          created=0.0, contributors=1, mean_staleness=0.0,
                          parts={name: np.full(size, 1e15, np.float32)
                                 for name, size in spec.parts.items()})
    probe.publish((topics.model_current(fleet), wrecked.encode()), retain=True)
    agent = fedd.agent("dev", agent_yaml(tmp_path / "dev.yaml", broker=broker, device_id="dev",
                                         state_dir=state, fleet=fleet, person=1))
    wait_for(lambda: "discarded, nothing sent" in agent.log(), timeout=TIMEOUT_S,
             what="the agent to discard a diverged round", watch=[agent])
    status = wait_for(lambda: (s := status_of(state)) and s["model_version"] == 3 and s,
                      timeout=TIMEOUT_S, what="the agent's status on version 3", watch=[agent])
    assert status["updates_sent"] == 0 and status["outbox"] == 0
    assert agent.log().count("discarded, nothing sent") == 1  # not retried on version 3
    assert agent.alive()
    assert agent.terminate() == 0, agent.tail()
