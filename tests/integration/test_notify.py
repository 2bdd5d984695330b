"""The agent's watchdog as systemd sees it: the ping period, and a hung loop going silent.

tests/integration/test_lifecycle.py already checks READY=1, WATCHDOG=1,
STATUS= and STOPPING=1 in order; this module times the pings against the
configured WatchdogSec (WATCHDOG_USEC) and shows that they come from the
event loop, so that a loop that hangs stops feeding the watchdog and systemd
would restart the agent. The hang is injected by the test: a
`sitecustomize` module on PYTHONPATH wraps `Notifier.status` (called from
the event loop at every heartbeat) to block the loop at the third heartbeat.
The packaging test does the same end to end under a real systemd (SIGSTOP
under WatchdogSec=5: the unit is killed and restarted).
"""

from __future__ import annotations

import itertools
import statistics
import textwrap
import time

import pytest

from tests.conftest import NotifyListener

pytestmark = pytest.mark.integration

TIMEOUT_S = 60.0
HANG_MARK = "test: hanging the event loop"

HANG_AT_STATUS = textwrap.dedent(f"""\
    # Test-provided fault: block the event loop inside the N-th Notifier.status().
    import os
    import sys
    import time

    import fedd.service as service

    _status, _calls = service.Notifier.status, []


    def status(self, text):
        _status(self, text)
        _calls.append(text)
        if len(_calls) == int(os.environ["FEDD_TEST_HANG_AT_STATUS"]):
            sys.stderr.write({HANG_MARK!r} + "\\n")
            sys.stderr.flush()
            time.sleep(3600)


    service.Notifier.status = status
""")


@pytest.fixture
def listener(tmp_path):
    made: list[NotifyListener] = []

    def make(name: str) -> NotifyListener:
        made.append(NotifyListener(tmp_path, name))
        return made[-1]

    try:
        yield make
    finally:
        for one in made:
            one.close()


@pytest.mark.parametrize("watchdog_sec", [1.0, 4.0])
def test_watchdog_pings_come_every_half_watchdog_period(broker, fedd, tmp_path, agent_yaml,
                                                        listener, watchdog_sec):
    notify = listener(f"wd{watchdog_sec:g}")
    config = agent_yaml(tmp_path / "agent.yaml", broker=broker, device_id="timed",
                        state_dir=tmp_path / "state")
    agent = fedd.agent("timed", config, env={
        **notify.env, "WATCHDOG_USEC": str(int(watchdog_sec * 1e6))})
    notify.wait(lambda ms: "READY=1" in ms, timeout=TIMEOUT_S, what="READY=1", watch=[agent])
    want = 6
    deadline = time.monotonic() + TIMEOUT_S
    while len(notify.pings()) < want + 1 and time.monotonic() < deadline:
        assert agent.alive(), agent.tail()
        time.sleep(0.1)
    pings = notify.pings()
    assert len(pings) > want, f"{len(pings)} pings in {TIMEOUT_S:.0f} s"
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    period = watchdog_sec / 2
    assert statistics.median(gaps) == pytest.approx(period, rel=0.15), gaps
    # No gap may reach WatchdogSec: systemd would kill the agent then.
    assert max(gaps) < watchdog_sec, gaps
    assert agent.terminate() == 0, agent.tail()


def test_no_watchdog_usec_means_no_pings(broker, fedd, tmp_path, agent_yaml, listener,
                                         wait_for, status_of):
    notify = listener("nowd")
    state = tmp_path / "state"
    agent = fedd.agent("nowd", agent_yaml(tmp_path / "agent.yaml", broker=broker,
                                          device_id="nowd", state_dir=state), env=notify.env)
    notify.wait(lambda ms: any(m.startswith("STATUS=") for m in ms), timeout=TIMEOUT_S,
                what="a STATUS line", watch=[agent])
    first = wait_for(lambda: status_of(state), timeout=TIMEOUT_S, what="a status file",
                     watch=[agent])
    wait_for(lambda: (s := status_of(state)) and s["time"] > first["time"] + 1.0,
             timeout=TIMEOUT_S, what="more heartbeats", watch=[agent])
    assert "READY=1" in notify.poll()
    assert "WATCHDOG=1" not in notify.poll()
    assert agent.terminate() == 0, agent.tail()


def test_a_watchdog_pid_of_another_process_is_not_fed(broker, fedd, tmp_path, agent_yaml,
                                                      listener):
    """sd_watchdog_enabled(3): WATCHDOG_PID names the process the watchdog belongs to."""
    notify = listener("otherpid")
    agent = fedd.agent("otherpid", agent_yaml(
        tmp_path / "agent.yaml", broker=broker, device_id="otherpid",
        state_dir=tmp_path / "state"),
        env={**notify.env, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    notify.wait(lambda ms: any(m.startswith("STATUS=") for m in ms), timeout=TIMEOUT_S,
                what="a STATUS line", watch=[agent])
    time.sleep(1.5)  # three ping periods
    assert "WATCHDOG=1" not in notify.poll()
    assert agent.terminate() == 0, agent.tail()


def test_a_hung_event_loop_stops_feeding_the_watchdog(broker, fedd, tmp_path, agent_yaml,
                                                      listener):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HANG_AT_STATUS)
    notify = listener("hung")
    agent = fedd.agent("hung", agent_yaml(tmp_path / "agent.yaml", broker=broker,
                                          device_id="hung", state_dir=tmp_path / "state"),
                       env={**notify.env, "WATCHDOG_USEC": "1000000",  # a ping every 0.5 s
                            "PYTHONPATH": str(hook), "FEDD_TEST_HANG_AT_STATUS": "3"})
    agent.wait_log(HANG_MARK, timeout=TIMEOUT_S)
    hung_at = time.monotonic()
    before = [t for t in notify.pings() if t < hung_at]
    assert len(before) >= 2, "the watchdog was not fed before the hang"
    time.sleep(3.0)  # six ping periods, three WatchdogSec
    late = [t for t in notify.pings() if t > hung_at + 0.1]
    assert late == [], f"{len(late)} pings from a hung event loop"
    assert agent.alive(), "the agent should hang, not exit"
    agent.kill()
