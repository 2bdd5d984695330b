"""A replayed person switches activities mid-stream: drift asks for a round.

The hub never cuts a version past 0 here (a buffer it cannot fill), so after
its first round on version 0 the agent is up to date: only drift can make it
train again, and that update must say so. The control replays the same
activity mix twice and must not drift.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedd.datasets import PersonData, Segment, hapt_person, save_stream

pytestmark = pytest.mark.integration

TIMEOUT_S = 90.0
WALKING, SITTING, LYING = 0, 3, 5
FIRST_ROUND_AT = 90  # person 1 has 95 walking and sitting windows: train on nearly all


def _stream(path: Path, *, then: str) -> Path:
    """Person 1's walking and sitting, then lying (twice over) or the same mix again."""
    person = hapt_person(1)

    def only(classes: set[int]) -> list[Segment]:
        return [s for s in person.stream if set(np.unique(s.labels[s.labels >= 0])) <= classes]

    mix = only({WALKING, SITTING})
    second = only({LYING}) * 2 if then == "lying" else mix
    save_stream(PersonData(1, mix + second, person.holdout_windows, person.holdout_labels),
                path)
    return path


def _run(tmp_path, broker, fedd, agent_yaml, hub_yaml, *, then: str):
    fedd.hub("hub", hub_yaml(tmp_path / "hub.yaml", broker=broker, state_dir=tmp_path / "hub",
                             aggregation={"buffer_size": 1000, "quorum": 1000,
                                          "max_wait_s": 86400.0}))
    state = tmp_path / "agent"
    stream = _stream(tmp_path / "stream.npz", then=then)
    agent = fedd.agent("drifting", agent_yaml(
        tmp_path / "agent.yaml", broker=broker, device_id="drifting", state_dir=state,
        sensor={"replay": {"dataset": "stream", "npz_path": str(stream), "speed": 20.0}},
        training={"min_windows": FIRST_ROUND_AT},
        drift={"check_interval_s": 0.5, "recent_windows": 96, "min_windows": 60}))
    return agent, state


def test_a_new_activity_mix_triggers_a_drift_round(broker, fedd, tmp_path, agent_yaml,
                                                   hub_yaml, wait_for, status_of):
    agent, state = _run(tmp_path, broker, fedd, agent_yaml, hub_yaml, then="lying")
    drifted = wait_for(
        lambda: (s := status_of(state)) and s["last_update"]
        and s["last_update"]["trigger"] == "drift" and s,
        timeout=TIMEOUT_S, what="a drift-triggered round", watch=[agent])
    assert drifted["model_version"] == 0  # no new version: only drift could ask for it
    assert drifted["last_update"]["drift"]
    assert agent.terminate() == 0
    # The drift round came right after the first round, on version 0.
    assert agent.log().count("round (version) on version 0") == 1
    assert "drift: " in agent.log()


def test_the_same_mix_again_is_not_drift(broker, fedd, tmp_path, agent_yaml, hub_yaml,
                                         wait_for, status_of):
    agent, state = _run(tmp_path, broker, fedd, agent_yaml, hub_yaml, then="same")
    done = wait_for(
        lambda: (s := status_of(state)) and s["activity"] == "stream ended"
        and s["drift"] and s["drift"]["windows"] >= 90 and s,
        timeout=TIMEOUT_S, what="the stream to end with drift scored", watch=[agent])
    assert done["last_update"]["trigger"] == "version"
    assert done["drift"]["prediction_kl"] < 0.5 and done["drift"]["feature_shift"] < 1.0
    assert agent.terminate() == 0
    assert agent.log().count("round (") == 1  # the one on version 0, nothing more
    assert "drift: " not in agent.log()
