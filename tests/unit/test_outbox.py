"""The agent's outbox bound: a full outbox keeps training and folds into the residual.

Drives a real Agent (real LiteRT model, real store, HAPT person 1's holdout
as its stored windows) without MQTT: the local round and the hub's
acknowledgement are called directly, so the test is about the rule alone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedd.agent.daemon import RESIDUAL_PREFIX, Agent
from fedd.config import load_agent_config
from fedd.link import publish_wire_bytes
from fedd.model import TrainableModel
from fedd.service import Notifier
from fedd.wire import Ack, GlobalModel, ModelUpdate, payload_digest
from tests.conftest import agent_settings, write_yaml

MANIFEST = Path(__file__).resolve().parents[2] / "models" / "manifest.json"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    nowhere = SimpleNamespace(host="127.0.0.1", port=1)  # never connected in this test
    settings = agent_settings(broker=nowhere, device_id="bounded", state_dir=tmp_path / "state",
                              manifest=MANIFEST, uplink={"outbox_max_updates": 1})
    agent = Agent(load_agent_config(write_yaml(tmp_path / "fedd.yaml", settings)), Notifier())
    assert agent.holdout is not None
    agent.store.add_windows(*agent.holdout)
    yield agent
    agent._worker.shutdown()
    agent.store.close()


def version(agent: Agent, number: int) -> GlobalModel:
    return GlobalModel(version=number, parent=number - 1 if number else None,
                       model=agent.spec.name, model_sha256=agent.spec.sha256,
                       created=time.time(), contributors=0, mean_staleness=0.0,
                       parts=TrainableModel(agent.spec).get_parts())


def residual_norm(agent: Agent) -> float:
    return sum(float(np.linalg.norm(agent.store.get(RESIDUAL_PREFIX + name, np.zeros(1))))
               for name in agent.spec.parts)


def test_a_full_outbox_folds_new_deltas_into_the_residual(agent: Agent) -> None:
    before = time.time() * 1000
    agent._adopt(version(agent, 0))
    agent._local_round()
    first = agent.last_update["seq"]
    # A fresh store numbers from the clock (ms): a wiped device never reuses a seq.
    assert agent.store.outbox_size() == 1 and before <= first <= time.time() * 1000
    assert residual_norm(agent) == 0.0  # float32 sends everything

    # The hub has not acknowledged update 0: the next round trains but queues nothing.
    agent._adopt(version(agent, 1))
    agent._local_round()
    assert agent.store.outbox_size() == 1 and agent.store.get("next_seq") == first + 1
    assert agent.last_update["seq"] is None
    assert agent.last_update["budget"].startswith("outbox full: 1/1 updates")
    assert agent.last_update["budget"].endswith("delta folded into the residual")
    assert agent.last_trained_version == 1  # trained, not deferred
    folded = residual_norm(agent)
    assert folded > 0

    # Acknowledged: room again, and the next update carries what was folded.
    agent._settle(first, "accepted", None, hub_version=1)
    assert agent.store.outbox_size() == 0 and agent.acked == 1
    agent._adopt(version(agent, 2))
    agent._local_round()
    (queued,) = agent.store.outgoing()
    update = ModelUpdate.decode(queued.payload, max_bytes=1 << 20,
                                device=agent.config.device_id, model=agent.spec)
    assert (update.seq, update.base_version, update.format) == (first + 1, 2, 2)
    assert residual_norm(agent) == 0.0
    assert agent.store.get("acked") == 1 and agent.store.get("last_ack")["seq"] == first


def test_the_byte_bound_counts_too(agent: Agent) -> None:
    agent.config = dataclasses.replace(agent.config, uplink=dataclasses.replace(
        agent.config.uplink, outbox_max_updates=100, outbox_max_bytes=1024))
    agent._adopt(version(agent, 0))
    agent._local_round()  # an empty outbox takes one update, whatever its size
    agent._adopt(version(agent, 1))
    agent._local_round()
    assert agent.store.outbox_size() == 1
    assert "B; delta folded into the residual" in agent.last_update["budget"]
    assert f"{agent.store.outbox_bytes():,}/1,024 B" in agent.last_update["budget"]


def test_a_rejection_is_settled_and_counted_by_reason(agent: Agent) -> None:
    agent._adopt(version(agent, 0))
    agent._local_round()
    seq = agent.last_update["seq"]
    agent._settle(seq, "rejected", "too-stale", hub_version=30)
    assert agent.store.outbox_size() == 0
    assert (agent.acked, agent.rejected_updates) == (0, {"too-stale": 1})
    beat = agent.heartbeat()
    assert (beat.rejected, beat.acked, beat.last_ack_seq, beat.outbox, beat.connected) == (
        1, 0, seq, 0, False)


def test_an_update_the_hub_cannot_read_is_settled_by_its_digest(agent: Agent) -> None:
    """No seq in the ack (the hub could not read one): the bytes name the update, so the
    device stops resending what no hub will ever acknowledge by seq."""
    agent._adopt(version(agent, 0))
    agent._local_round()
    (queued,) = agent.store.outgoing()
    other = Ack(device="bounded", seq=None, digest=payload_digest(b"something else"),
                outcome="rejected", reason="not-cbor", duplicate=False, version=0, time=0.0)
    agent._on_ack(other.encode())
    assert agent.store.outbox_size() == 1  # not ours: ignored
    ours = Ack(device="bounded", seq=None, digest=payload_digest(queued.payload),
               outcome="rejected", reason="unknown-format", duplicate=False, version=0, time=0.0)
    agent._on_ack(ours.encode())
    assert agent.store.outbox_size() == 0
    assert agent.rejected_updates == {"unknown-format": 1}


def test_a_slow_link_gets_updates_it_can_carry_before_the_publish_times_out(
        agent: Agent) -> None:
    """At 100 B/s a float32 update (34 kB) would outlast its 30 s publish timeout and be
    sent again and again: the agent sends a sparser level that fits half of it."""
    agent.goodput = 100.0
    agent._adopt(version(agent, 0))
    agent._local_round()
    last = agent.last_update
    assert last["budget"].startswith("link: 1,500 B fit in 15 s at 100 B/s; sent as topk:")
    (queued,) = agent.store.outgoing()
    assert publish_wire_bytes(queued.topic, queued.payload, qos=1, topic_alias=1) <= 1500
    assert last["codec"].startswith("topk:") and residual_norm(agent) > 0
