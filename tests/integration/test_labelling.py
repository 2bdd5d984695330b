"""A live source gives no labels: the agent waits until `fedd label` names the activity.

The agent reads person 1's real HAPT walking samples from a command that
prints them without a label column (as a sensor program would), so every
window it stores is unlabelled and it waits for data. `fedd label walking
--last …`, run while it samples, labels them in its store: it trains on its
own, and (finetune) sends an update the hub accepts, or (local) trains
again when more windows are labelled.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedd.datasets import hapt_person

pytestmark = pytest.mark.integration

TIMEOUT_S = 60.0
WALKING = 0
MIN_WINDOWS = 32
WAITING = f"waiting for data: 0/{MIN_WINDOWS} labelled windows"

# Prints the samples over and over, ~20x faster than real time, without labels.
SENSOR = textwrap.dedent("""\
    import sys, time
    import numpy as np
    samples = np.load(sys.argv[1])
    while True:
        for start in range(0, len(samples), 100):
            block = samples[start:start + 100]
            sys.stdout.write("".join(" ".join(f"{v:.6f}" for v in row) + "\\n" for row in block))
            sys.stdout.flush()
            time.sleep(0.1)
""")


def _sensor(folder: Path) -> list[str]:
    """The command of a sensor that prints person 1's walking, six columns, no label."""
    walking = [s.samples for s in hapt_person(1).stream if (s.labels == WALKING).all()]
    np.save(folder / "walking.npy", np.concatenate(walking).astype(np.float32))
    (folder / "sensor.py").write_text(SENSOR)
    return [sys.executable, str(folder / "sensor.py"), str(folder / "walking.npy")]


@pytest.mark.parametrize("strategy", ["finetune", "local"])
def test_labelling_live_windows_makes_the_agent_train(strategy, broker, fedd, fedd_cli,
                                                      tmp_path, agent_yaml, hub_yaml, wait_for,
                                                      status_of):
    hub_state, state = tmp_path / "hub", tmp_path / "agent"
    hub = fedd.hub("hub", hub_yaml(tmp_path / "hub.yaml", broker=broker, state_dir=hub_state))
    config = agent_yaml(tmp_path / "agent.yaml", broker=broker, device_id="live",
                        state_dir=state,
                        sensor={"kind": "command", "command": {"argv": _sensor(tmp_path)}},
                        training={"min_windows": MIN_WINDOWS, "strategy": strategy})
    agent = fedd.agent("agent", config)

    waiting = wait_for(lambda: (s := status_of(state)) and s["decision"] == WAITING
                       and s["windows"] >= MIN_WINDOWS + 8 and s,
                       timeout=TIMEOUT_S, what="unlabelled windows and the agent waiting",
                       watch=[agent, hub])
    assert waiting["last_update"] is None and waiting["updates_sent"] == 0

    done = fedd_cli("label", "-c", str(config), "walking", "--last", "10m")
    assert done.returncode == 0, done.stderr
    labelled = int(done.stdout.split()[1])  # "labelled <n> windows as walking (class 0), …"
    assert labelled >= waiting["windows"]
    assert "as walking (class 0), stored from " in done.stdout

    trained = wait_for(lambda: (s := status_of(state)) and s["last_update"] and s,
                       timeout=TIMEOUT_S, what="a round on the labelled windows",
                       watch=[agent, hub])
    assert trained["last_update"]["samples"] >= labelled
    if strategy == "local":
        assert trained["last_update"]["seq"] is None and trained["updates_sent"] == 0
        # More windows labelled: a new count of labelled windows, another round.
        first = trained["last_update"]["time"]
        wait_for(lambda: (s := status_of(state)) and s["windows"] >= labelled + 8,
                 timeout=TIMEOUT_S, what="more unlabelled windows", watch=[agent])
        again = fedd_cli("label", "-c", str(config), "walking", "--last", "10m")
        assert again.returncode == 0, again.stderr
        assert "kept " in again.stdout  # the first span's windows keep their label
        wait_for(lambda: (s := status_of(state)) and s["last_update"]["time"] > first
                 and s["last_update"]["samples"] > trained["last_update"]["samples"],
                 timeout=TIMEOUT_S, what="a second round on the new labels", watch=[agent])
    else:
        assert trained["last_update"]["seq"] is not None
        wait_for(lambda: (h := status_of(hub_state)) and h["accepted"] >= 1,
                 timeout=TIMEOUT_S, what="the hub accepting the update", watch=[agent, hub])
        assert wait_for(lambda: (s := status_of(state)) and s["acked"] >= 1 and s,
                        timeout=TIMEOUT_S, what="the hub's acknowledgement", watch=[agent])
    assert agent.terminate() == 0
    assert hub.terminate() == 0
    assert "sensor command started" in agent.log()
