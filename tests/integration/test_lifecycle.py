"""The daemons as systemd runs them: notify, watchdog, signals, restart, CLI."""

from __future__ import annotations

import json
import re
import signal
import socket
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

import fedd
from fedd import topics
from fedd.config import EXIT_CONFIG_INVALID, EXIT_CONFIG_MISSING
from fedd.wire import Heartbeat
from tests.conftest import agent_settings, hub_settings, write_yaml

pytestmark = pytest.mark.integration

TIMEOUT_S = 60.0
WATCHDOG_ENV = {"WATCHDOG_USEC": "1000000"}  # WatchdogSec=1: a ping every 0.5 s


def _after_ready(messages: list[str]) -> list[str]:
    return messages[messages.index("READY=1") + 1:] if "READY=1" in messages else []


def _notified(messages: list[str], *, status_contains: str) -> bool:
    """READY=1, then three watchdog pings, and a STATUS= line saying `status_contains`."""
    later = _after_ready(messages)
    return (later.count("WATCHDOG=1") >= 3
            and any(m.startswith("STATUS=") and status_contains in m for m in messages))


def _working(status: dict[str, Any] | None, *, updates: int = 1) -> dict[str, Any] | None:
    """An agent status once it runs a global version >= 1 and has sent `updates`."""
    if (status and status["model_version"] is not None and status["model_version"] >= 1
            and status["updates_sent"] >= updates and status["last_update"] is not None):
        return status
    return None


def _line_of(path: Path, key: str) -> int:
    """1-based line of the first `key:` in a YAML file."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip().startswith(f"{key}:"):
            return number
    raise AssertionError(f"{key} not in {path}")


def _break(path: Path, section: str, key: str, value: object) -> int:
    """Rewrite one setting of a YAML config to `value`; returns its line number."""
    content = yaml.safe_load(path.read_text())
    content[section][key] = value
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return _line_of(path, key)


# ------------------------------------------------ one notified run, stopped by SIGTERM


@dataclass
class NotifiedRun:
    agent_messages: list[str]
    hub_messages: list[str]
    agent_code: int
    hub_code: int
    agent_log: str
    hub_log: str
    agent_state: Path
    hub_state: Path
    running_status: dict[str, Any]
    final_status: dict[str, Any]


@pytest.fixture(scope="module")
def notified_run(module_broker, module_fedd, tmp_path_factory, agent_yaml, hub_yaml,
                 notify_listener, wait_for, status_of):
    """A hub and an agent under a fake systemd (NOTIFY_SOCKET), until they work; then SIGTERM."""
    root = tmp_path_factory.mktemp("notified")
    fleet = "notified"
    hub_notify, agent_notify = notify_listener(root, "hub"), notify_listener(root, "agent")
    try:
        hub_state, agent_state = root / "hub-state", root / "agent-state"
        hub = module_fedd.hub("notified-hub", hub_yaml(
            root / "hub.yaml", broker=module_broker, state_dir=hub_state, fleet=fleet),
            env={**hub_notify.env, **WATCHDOG_ENV})
        agent = module_fedd.agent("notified-agent", agent_yaml(
            root / "agent.yaml", broker=module_broker, device_id="notified", fleet=fleet,
            state_dir=agent_state), env={**agent_notify.env, **WATCHDOG_ENV})
        running = wait_for(lambda: _working(status_of(agent_state)), timeout=TIMEOUT_S,
                           what="the agent to work with the hub", watch=[hub, agent])
        agent_notify.wait(lambda ms: _notified(ms, status_contains="version"),
                          timeout=TIMEOUT_S, what="READY, watchdog pings and STATUS from the "
                          "agent", watch=[agent])
        hub_notify.wait(lambda ms: _notified(ms, status_contains="updates accepted"),
                        timeout=TIMEOUT_S, what="READY, watchdog pings and STATUS from the hub",
                        watch=[hub])
        agent_code = agent.terminate()
        hub_code = hub.terminate()
        yield NotifiedRun(
            agent_messages=list(agent_notify.poll()), hub_messages=list(hub_notify.poll()),
            agent_code=agent_code, hub_code=hub_code, agent_log=agent.log(),
            hub_log=hub.log(), agent_state=agent_state, hub_state=hub_state,
            running_status=running, final_status=status_of(agent_state))
    finally:
        hub_notify.close()
        agent_notify.close()


@pytest.mark.parametrize("who", ["agent", "hub"])
def test_systemd_hears_ready_watchdog_status_and_stopping(notified_run, who):
    messages = getattr(notified_run, f"{who}_messages")
    assert messages.count("READY=1") == 1
    later = _after_ready(messages)
    assert later.count("WATCHDOG=1") >= 3
    assert any(m.startswith("STATUS=") for m in later)
    assert "STOPPING=1" in later
    assert later.index("STOPPING=1") > later.index("WATCHDOG=1")


def test_sigterm_stops_both_cleanly(notified_run):
    assert notified_run.agent_code == 0, notified_run.agent_log
    assert notified_run.hub_code == 0, notified_run.hub_log
    assert "agent notified stopped cleanly" in notified_run.agent_log
    assert "hub stopped at version" in notified_run.hub_log
    for log in (notified_run.agent_log, notified_run.hub_log):
        assert "Traceback" not in log


def test_agent_store_is_checkpointed_and_intact_after_stop(notified_run):
    database = notified_run.agent_state / "agent.sqlite"
    wal = database.with_name("agent.sqlite-wal")
    assert not wal.exists() or wal.stat().st_size == 0, "the WAL was not checkpointed on stop"
    final = notified_run.final_status
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        windows = db.execute("SELECT COUNT(*) FROM windows").fetchone()[0]
        outbox = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        next_seq = db.execute("SELECT value FROM state WHERE key = 'next_seq'").fetchone()[0]
    assert windows > 0
    assert windows == final["windows"] >= notified_run.running_status["windows"]
    assert outbox == final["outbox"]
    assert json.loads(bytes(next_seq)[1:]) == final["last_update"]["seq"] + 1


def test_fedd_status_reports_a_stopped_agent_and_hub(notified_run, fedd_cli, tmp_path):
    final = notified_run.final_status
    shown = fedd_cli("status", "--state-dir", str(notified_run.agent_state))
    assert shown.returncode == 0, shown.stderr
    assert "device        notified" in shown.stdout
    assert f"model         version {final['model_version']}" in shown.stdout
    assert f"outbox {final['outbox']} queued" in shown.stdout
    assert f"scheduler     {final['decision']}" in shown.stdout
    assert f"last round    seq {final['last_update']['seq']}, version" in shown.stdout
    assert f"hub accepted {final['acked']}, rejected none" in shown.stdout
    assert re.search(r"^link +(connected|DISCONNECTED), \d+ reconnects", shown.stdout, re.M)

    as_json = fedd_cli("status", "--state-dir", str(notified_run.agent_state), "--json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout) == final

    hub = fedd_cli("status", "--state-dir", str(notified_run.hub_state))
    assert hub.returncode == 0, hub.stderr
    assert re.search(r"^hub +version \d+", hub.stdout, re.M)
    assert re.search(r"^robust +rule mean, median norm ", hub.stdout, re.M)
    assert re.search(r"^accepted +\d+   duplicates \d+   rejected ", hub.stdout, re.M)

    empty = fedd_cli("status", "--state-dir", str(tmp_path))
    assert empty.returncode == 3
    assert "no status" in empty.stderr


# ------------------------------------------------ restart and reload


def test_agent_resumes_its_state_after_a_restart(broker, fedd, agent_yaml, hub_yaml, tmp_path,
                                                 wait_for, status_of):
    fleet = "restart"
    hub_state, agent_state = tmp_path / "hub-state", tmp_path / "agent-state"
    hub = fedd.hub("hub", hub_yaml(tmp_path / "hub.yaml", broker=broker, state_dir=hub_state,
                                   fleet=fleet))
    config = agent_yaml(tmp_path / "agent.yaml", broker=broker, device_id="restarted",
                        fleet=fleet, state_dir=agent_state)
    first = fedd.agent("agent-1", config)
    wait_for(lambda: _working(status_of(agent_state), updates=2), timeout=TIMEOUT_S,
             what="two updates from the first run", watch=[hub, first])
    assert first.terminate() == 0, first.tail()
    before = status_of(agent_state)
    windows, seq = before["windows"], before["last_update"]["seq"]
    assert windows > 0 and seq >= 1

    second = fedd.agent("agent-2", config)
    log = second.wait_log("windows stored")
    stored = re.search(r"agent restarted up: model har-mlp, (\d+) windows stored", log)
    assert stored and int(stored.group(1)) == windows, "the window store did not survive"
    after = wait_for(
        lambda: (s := status_of(agent_state)) and s["pid"] == second.pid
        and s["last_update"]["seq"] > seq and s,
        timeout=TIMEOUT_S, what=f"an update with seq > {seq} from the second run",
        watch=[hub, second])
    assert after["windows"] >= windows
    assert after["updates_sent"] > before["updates_sent"]

    hub_status = wait_for(
        lambda: (s := status_of(hub_state)) and s["accepted"] >= after["updates_sent"] and s,
        timeout=TIMEOUT_S, what="the hub to accept every update", watch=[hub])
    assert "duplicate" not in hub_status["rejected"], "a sequence number was reused"
    assert second.terminate() == 0, second.tail()
    assert hub.terminate() == 0, hub.tail()


def test_sighup_applies_a_valid_config_and_refuses_a_broken_one(
        broker, fedd, agent_yaml, hub_yaml, tmp_path, wait_for, status_of):
    fleet = "reload"
    hub_state, agent_state = tmp_path / "hub-state", tmp_path / "agent-state"
    hub_config = hub_yaml(tmp_path / "hub.yaml", broker=broker, state_dir=hub_state,
                          fleet=fleet)
    agent_config = agent_yaml(tmp_path / "agent.yaml", broker=broker, device_id="reloaded",
                              fleet=fleet, state_dir=agent_state)
    hub = fedd.hub("hub", hub_config)
    agent = fedd.agent("agent", agent_config)
    wait_for(lambda: _working(status_of(agent_state)), timeout=TIMEOUT_S,
             what="the agent to work with the hub", watch=[hub, agent])

    # A valid edit is applied: the agent now wants more data than it can have.
    _break(agent_config, "training", "min_windows", 100000)
    mark = len(agent.log())
    agent.send(signal.SIGHUP)
    agent.wait_log("reloaded configuration", after=mark)
    waiting = wait_for(
        lambda: (s := status_of(agent_state)) and "/100000 labelled windows" in s["decision"]
        and s, timeout=TIMEOUT_S, what="the reloaded min_windows in the decision",
        watch=[agent])

    # A broken edit is refused; the running configuration stays.
    line = _break(agent_config, "training", "epochs", 0)
    mark = len(agent.log())
    agent.send(signal.SIGHUP)
    log = agent.wait_log("reload refused", after=mark)
    assert f"{agent_config}:{line}: training.epochs" in log[mark:]
    later = wait_for(
        lambda: (s := status_of(agent_state)) and s["time"] > waiting["time"] + 1.0 and s,
        timeout=TIMEOUT_S, what="heartbeats after the refused reload", watch=[agent])
    assert "/100000 labelled windows" in later["decision"]
    assert agent.alive()

    # The hub does the same.
    _break(hub_config, "aggregation", "buffer_size", 2)
    mark = len(hub.log())
    hub.send(signal.SIGHUP)
    hub.wait_log("reloaded configuration", after=mark)
    line = _break(hub_config, "aggregation", "quorum", 5)  # > buffer_size: invalid
    mark = len(hub.log())
    hub.send(signal.SIGHUP)
    log = hub.wait_log("reload refused", after=mark)
    assert str(hub_config) in log[mark:] and "quorum" in log[mark:]
    assert hub.alive()

    assert agent.terminate() == 0, agent.tail()
    assert hub.terminate() == 0, hub.tail()
    for process in (agent, hub):
        assert "Traceback" not in process.log()


# ------------------------------------------------ the command line


@pytest.fixture
def broker_free_settings(tmp_path):
    """Settings for a config file that is only checked, never run against a broker."""
    return {"broker": SimpleNamespace(host="127.0.0.1", port=1883), "device_id": "checked",
            "state_dir": tmp_path / "state"}


@pytest.fixture
def good_agent_config(agent_yaml, broker_free_settings, tmp_path):
    return agent_yaml(tmp_path / "good-agent.yaml", **broker_free_settings)


def test_check_config_accepts_valid_files(fedd_cli, good_agent_config, hub_yaml,
                                          broker_free_settings, tmp_path):
    hub_config = hub_yaml(tmp_path / "good-hub.yaml", broker=broker_free_settings["broker"],
                          state_dir=tmp_path / "hub-state")
    for path, role in ((good_agent_config, "agent"), (hub_config, "hub")):
        result = fedd_cli("check-config", str(path))
        assert result.returncode == 0, result.stderr
        assert f"valid {role} configuration" in result.stdout


def test_check_config_names_file_line_and_key_of_a_bad_value(fedd_cli, good_agent_config):
    line = _break(good_agent_config, "training", "epochs", 0)
    result = fedd_cli("check-config", str(good_agent_config))
    assert result.returncode == EXIT_CONFIG_INVALID == 78
    assert f"{good_agent_config}:{line}: training.epochs" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_of_a_missing_file_exits_66(fedd_cli, tmp_path):
    missing = tmp_path / "nowhere.yaml"
    result = fedd_cli("check-config", str(missing))
    assert result.returncode == EXIT_CONFIG_MISSING == 66
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("program", ["agent", "hub"])
def test_daemon_refuses_a_bad_config_with_78_and_no_traceback(fedd_cli, good_agent_config,
                                                              hub_yaml, broker_free_settings,
                                                              tmp_path, program):
    if program == "agent":
        path, line = good_agent_config, _break(good_agent_config, "heartbeat", "interval_s", 0)
        key = "heartbeat.interval_s"
    else:
        path = hub_yaml(tmp_path / "hub.yaml", broker=broker_free_settings["broker"],
                        state_dir=tmp_path / "hub-state")
        line, key = _break(path, "aggregation", "buffer_size", 0), "aggregation.buffer_size"
    result = fedd_cli(program, "-c", str(path))
    assert result.returncode == 78, result.stderr
    assert f"{path}:{line}: {key}" in result.stderr
    assert "Traceback" not in result.stderr
    missing = fedd_cli(program, "-c", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 66, missing.stderr


def test_version(fedd_cli):
    result = fedd_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"fedd {fedd.__version__}"


def test_an_unread_notify_socket_never_blocks_the_agent(broker, fedd, tmp_path, agent_yaml,
                                                        wait_for, status_of):
    """A manager that stops reading must cost notifications, not the daemon's loop."""
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = Path(tempfile.mkdtemp(prefix="fedd-deaf-")) / "notify.sock"
    deaf.bind(str(path))  # bound, never read: the kernel queue fills after a few datagrams
    try:
        state = tmp_path / "state"
        agent = fedd.agent("deaf", agent_yaml(tmp_path / "agent.yaml", broker=broker,
                                              device_id="deaf", state_dir=state),
                           env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000"})
        first = wait_for(lambda: status_of(state), timeout=TIMEOUT_S,
                         what="the agent's first status", watch=[agent])
        wait_for(lambda: (s := status_of(state)) and s["time"] > first["time"] + 2,
                 timeout=TIMEOUT_S, what="the agent to keep reporting", watch=[agent])
        assert agent.terminate() == 0
    finally:
        deaf.close()
        path.unlink()
        path.parent.rmdir()


def test_a_missing_delegate_falls_back_to_the_cpu_and_says_so(broker, fedd, tmp_path,
                                                              agent_yaml, wait_for, status_of):
    state = tmp_path / "state"
    agent = fedd.agent("delegated", agent_yaml(
        tmp_path / "agent.yaml", broker=broker, device_id="delegated", state_dir=state,
        inference={"delegates": ["libedgetpu.so.1", "/nonexistent/libvendor_npu.so"]}))
    status = wait_for(lambda: status_of(state), timeout=TIMEOUT_S,
                      what="the agent's first status", watch=[agent])
    assert status["delegate"] == "xnnpack"
    assert agent.terminate() == 0
    log = agent.log()
    assert "inference delegate unavailable: libedgetpu.so.1" in log
    assert "inference delegate unavailable: /nonexistent/libvendor_npu.so" in log
    assert "inference and training run on the CPU (xnnpack)" in log


def test_a_working_delegate_runs_inference_while_the_agent_trains_on_the_cpu(
        broker, probe, fedd, tmp_path, agent_yaml, hub_yaml, wait_for, status_of,
        noop_delegate):
    """The first delegate of the chain that loads is reported and used; training and
    updates go on as without one (the no-op delegate leaves every op to the CPU)."""
    fleet, device = "delegate", "delegated"
    hub_state, state, record = tmp_path / "hub-state", tmp_path / "state", tmp_path / "record"
    hub = fedd.hub("hub", hub_yaml(tmp_path / "hub.yaml", broker=broker, state_dir=hub_state,
                                   fleet=fleet))
    agent = fedd.agent(device, agent_yaml(
        tmp_path / "agent.yaml", broker=broker, device_id=device, fleet=fleet, state_dir=state,
        inference={"delegates": ["libedgetpu.so.1", f"{noop_delegate}?record={record}"]}))
    # An evaluation is holdout inference: it ran on the delegated interpreter.
    status = wait_for(lambda: (s := _working(status_of(state))) and s["evaluation"] and s,
                      timeout=TIMEOUT_S, what="an update and an evaluation from the agent",
                      watch=[hub, agent])
    assert status["delegate"] == str(noop_delegate)
    beat = probe.first(topics.heartbeat(fleet, device), timeout=TIMEOUT_S,
                       what=f"a heartbeat of {device}")
    assert Heartbeat.decode(beat.payload).delegate == str(noop_delegate)
    assert agent.terminate() == 0, agent.tail()
    assert hub.terminate() == 0, hub.tail()
    log = agent.log()
    assert "inference delegate unavailable: libedgetpu.so.1" in log
    assert f"inference runs on {noop_delegate}; training on the CPU" in log
    assert "run on the CPU (xnnpack)" not in log
    # The options reached the library through the config, and an interpreter applied it.
    lines = record.read_text().splitlines()
    assert lines[0] == f"record={record}" and "prepare" in lines


def test_switching_the_model_keeps_the_state_dir_usable(broker, fedd, tmp_path, agent_yaml,
                                                        wait_for, status_of):
    """Windows made for har-mlp's features cannot feed har-cnn: they are dropped, not fatal."""
    state = tmp_path / "state"
    config = tmp_path / "agent.yaml"
    agent = fedd.agent("mlp", agent_yaml(config, broker=broker, device_id="switch",
                                         state_dir=state))
    wait_for(lambda: (s := status_of(state)) and s["windows"] > 0, timeout=TIMEOUT_S,
             what="stored windows", watch=[agent])
    assert agent.terminate() == 0
    agent = fedd.agent("cnn", agent_yaml(config, broker=broker, device_id="switch",
                                         state_dir=state, model={"name": "har-cnn"}))
    wait_for(lambda: (s := status_of(state)) and s["pid"] == agent.popen.pid
             and s["windows"] > 0, timeout=TIMEOUT_S, what="har-cnn storing windows",
             watch=[agent])
    assert agent.terminate() == 0
    assert "model changed from har-mlp to har-cnn: dropped" in agent.log()


@pytest.mark.parametrize("program", ["agent", "hub"])
def test_unreadable_tls_files_are_a_config_error_not_a_crash(fedd_cli, manifest_path,
                                                             broker_free_settings, tmp_path,
                                                             program):
    """The default transport is TLS: a device without its certificate must say so."""
    tls = {"ca_file": str(tmp_path / "ca.crt"), "cert_file": str(tmp_path / "no.crt"),
           "key_file": str(tmp_path / "no.key")}
    where = broker_free_settings["broker"]
    if program == "agent":
        settings = agent_settings(broker=where, device_id="tls-less", manifest=manifest_path,
                                  state_dir=tmp_path / "state")
    else:
        settings = hub_settings(broker=where, state_dir=tmp_path / "hub-state",
                                manifest=manifest_path)
    settings["broker"] = {"host": where.host, "port": where.port, "tls": tls}
    path = write_yaml(tmp_path / f"{program}.yaml", settings)
    result = fedd_cli(program, "-c", str(path))
    assert result.returncode == 78, result.stderr
    assert f"{path}: broker.tls: cannot load the TLS files" in result.stderr
    assert "Traceback" not in result.stderr
