"""An agent with a tiny hourly uplink budget keeps training and folds what it cannot send."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

TIMEOUT_S = 90.0
BUDGET = 1000  # bytes of update PUBLISHes an hour: two or three small updates


def _residual_norm(state: Path) -> float:
    with sqlite3.connect(state / "agent.sqlite") as db:
        rows = db.execute("SELECT value FROM state WHERE key LIKE 'residual_%'").fetchall()
    return float(sum(np.linalg.norm(np.frombuffer(value[1:], "<f4")) for (value,) in rows))


def test_a_spent_budget_folds_deltas_into_the_residual(
        broker, fedd, agent_yaml, hub_yaml, tmp_path, wait_for, status_of):
    fleet = "budget"
    hub_state, state = tmp_path / "hub-state", tmp_path / "agent-state"
    hub = fedd.hub("hub", hub_yaml(tmp_path / "hub.yaml", broker=broker, state_dir=hub_state,
                                   fleet=fleet))
    # An unlimited device keeps the hub making versions; each is a round for the other.
    driver = fedd.agent("driver", agent_yaml(tmp_path / "driver.yaml", broker=broker,
                                             device_id="driver", fleet=fleet, person=2,
                                             state_dir=tmp_path / "driver-state"))
    agent = fedd.agent("metered", agent_yaml(
        tmp_path / "agent.yaml", broker=broker, device_id="metered", fleet=fleet,
        state_dir=state, uplink={"codec": "topk:0.01+q:4+zstd", "bytes_per_hour": BUDGET}))
    agent.wait_log("delta folded into the residual", timeout=TIMEOUT_S)
    folded = agent.log().count("delta folded into the residual")
    agent.wait_log("delta folded into the residual", timeout=TIMEOUT_S,
                   after=len(agent.log()))  # it keeps training once the budget is spent
    status = wait_for(lambda: (s := status_of(state)) and s["updates_sent"] >= 1
                      and s["outbox"] == 0 and s, timeout=TIMEOUT_S,
                      what="the sent updates acknowledged", watch=[hub, agent])
    assert agent.log().count("delta folded into the residual") > folded
    assert status["uplink_budget_hour"] == BUDGET
    assert status["uplink_bytes"] <= BUDGET
    assert status["uplink_bytes_hour"] == status["uplink_bytes"]
    assert status["goodput_bps"] is not None and status["goodput_bps"] > 0
    assert agent.terminate() == 0, agent.tail()
    status = status_of(state)
    last = status["last_update"]
    assert last["seq"] is None and "delta folded into the residual" in last["budget"]
    assert last["budget"].startswith("budget: ") and f"/{BUDGET:,} B this hour" in last["budget"]
    assert status["uplink_bytes"] <= BUDGET
    assert _residual_norm(state) > 0
    assert driver.terminate() == 0, driver.tail()
    assert hub.terminate() == 0, hub.tail()
