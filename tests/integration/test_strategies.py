"""Strategies end to end: what each sends is what the hub folds."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration

TIMEOUT_S = 90.0


def _hub_status(state):
    try:
        return json.loads((state / "status.json").read_text())
    except (OSError, ValueError):
        return None


def test_fedper_sends_the_body_alone_and_the_hub_folds_it(broker, fedd, tmp_path, agent_yaml,
                                                           hub_yaml, wait_for, status_of):
    hub_state, state = tmp_path / "hub", tmp_path / "agent"
    hub = fedd.hub("hub", hub_yaml(tmp_path / "hub.yaml", broker=broker, state_dir=hub_state))
    agent = fedd.agent("fedper", agent_yaml(tmp_path / "agent.yaml", broker=broker,
                                            device_id="fedper", state_dir=state,
                                            training={"strategy": "fedper"}))
    folded = wait_for(lambda: (s := _hub_status(hub_state)) and s["version"] >= 2 and s,
                      timeout=TIMEOUT_S, what="two versions from body-only updates",
                      watch=[hub, agent])
    assert folded["rejected"] == {}
    assert wait_for(lambda: (s := status_of(state)) and s["model_version"] >= 2 and s,
                    timeout=TIMEOUT_S, what="the agent on version 2", watch=[agent])
    assert agent.terminate() == 0 and hub.terminate() == 0


def test_local_strategy_trains_but_never_sends(broker, fedd, tmp_path, agent_yaml, hub_yaml,
                                               wait_for, status_of):
    hub_state, state = tmp_path / "hub", tmp_path / "agent"
    hub = fedd.hub("hub", hub_yaml(tmp_path / "hub.yaml", broker=broker, state_dir=hub_state))
    agent = fedd.agent("local", agent_yaml(tmp_path / "agent.yaml", broker=broker,
                                           device_id="local", state_dir=state,
                                           training={"strategy": "local"}))
    done = wait_for(lambda: (s := status_of(state)) and s["activity"] == "stream ended"
                    and s["decision"].startswith("up to date: trained on all") and s,
                    timeout=TIMEOUT_S, what="the local device to catch up with its data",
                    watch=[agent])
    assert done["last_update"]["seq"] is None and done["updates_sent"] == 0
    assert done["evaluation"]["personal_accuracy"] > 0.5  # it learned, alone
    assert _hub_status(hub_state)["accepted"] == 0
    assert agent.terminate() == 0 and hub.terminate() == 0
