"""`fedd label`: parsing the span and the activity, and labelling the agent's store.

The store is a real SQLite file in WAL mode, written while a second
connection (the running agent's) holds it; `fedd label` runs as a child
process where its exit code or its user matters.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedd.agent import store as store_module
from fedd.agent.labels import (
    EXIT_DATA,
    EXIT_NOINPUT,
    EXIT_NOPERM,
    EXIT_NOTHING,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    LabelError,
    class_names,
    open_store,
    parse_activity,
    parse_duration,
    parse_span,
    parse_time,
)
from fedd.agent.store import FILENAME, AgentStore
from fedd.datasets.hapt import ACTIVITIES
from fedd.model import ModelError, ModelSpec
from tests.conftest import agent_settings, fedd_env, write_yaml

MANIFEST = Path(__file__).resolve().parents[2] / "models" / "manifest.json"
NOW = 1_750_000_000.0
SHAPE = (96,)  # har-mlp's input
WALKING, SITTING = 0, 3
NOBODY = 65534


def usage_error(call, *args, **kwargs) -> str:
    with pytest.raises(LabelError) as caught:
        call(*args, **kwargs)
    assert caught.value.exit_code == EXIT_USAGE
    return str(caught.value)


# ------------------------------------------------------------ durations and times


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90.0), ("5m", 300.0), ("1h", 3600.0), ("1h30m", 5400.0), ("1.5h", 5400.0),
    ("2d", 172800.0), (" 5M ", 300.0), ("0.5s", 0.5)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5", "5x", "", "m", "-5m", "5 m", "1h-30m", "PT5M"])
def test_bad_durations_say_what_a_duration_looks_like(text: str) -> None:
    assert "e.g. 90s, 5m, 1h30m" in usage_error(parse_duration, text)


def test_a_zero_duration_is_refused() -> None:
    assert "longer than 0 s" in usage_error(parse_duration, "0m")


def test_times_as_unix_seconds_iso_8601_and_time_of_day() -> None:
    assert parse_time("1700000000", now=NOW) == 1_700_000_000.0
    assert parse_time("1700000000.25", now=NOW) == 1_700_000_000.25
    assert parse_time("2025-03-01T14:30:00+00:00", now=NOW) == 1_740_839_400.0
    assert parse_time("2025-03-01T14:30:00Z", now=NOW) == 1_740_839_400.0
    local = dt.datetime(2025, 3, 1, 14, 30).timestamp()  # no offset: the device's local time
    assert parse_time("2025-03-01 14:30", now=NOW) == local
    today = dt.datetime.fromtimestamp(NOW).date()
    assert parse_time("9:05", now=NOW) == dt.datetime.combine(today, dt.time(9, 5)).timestamp()
    assert parse_time("09:05:30", now=NOW) == dt.datetime.combine(
        today, dt.time(9, 5, 30)).timestamp()


@pytest.mark.parametrize("text", ["yesterday", "25:00", "2025-13-01", "14h30", ""])
def test_bad_times_name_the_accepted_forms(text: str) -> None:
    assert "ISO 8601" in usage_error(parse_time, text, now=NOW)


# ------------------------------------------------------------ spans


def test_last_ends_now() -> None:
    span = parse_span(last="5m", start=None, end=None, now=NOW)
    assert (span.start, span.end) == (NOW - 300, NOW)
    assert "(5m)" in str(span)


def test_from_ends_now_unless_to_says_otherwise() -> None:
    assert parse_span(last=None, start=str(NOW - 60), end=None, now=NOW).end == NOW
    span = parse_span(last=None, start=str(NOW - 60), end=str(NOW - 30), now=NOW)
    assert (span.start, span.end) == (NOW - 60, NOW - 30)


@pytest.mark.parametrize(("last", "start", "end", "says"), [
    (None, None, None, "give the span"),
    (None, None, str(NOW - 5), "give the span"),  # --to alone
    ("5m", None, str(NOW - 5), "cannot be combined"),
    (None, str(NOW + 60), None, "in the future"),
    (None, str(NOW - 60), str(NOW + 60), "in the future"),
    (None, str(NOW - 60), str(NOW - 60), "empty span"),
    (None, str(NOW - 60), str(NOW - 120), "empty span"),
])
def test_spans_that_cannot_be_labelled(last, start, end, says) -> None:
    assert says in usage_error(parse_span, last=last, start=start, end=end, now=NOW)


# ------------------------------------------------------------ activities


def test_the_shipped_models_name_hapts_activities_in_class_order() -> None:
    for name in ("har-mlp", "har-cnn"):
        assert class_names(MANIFEST, ModelSpec.from_manifest(MANIFEST, name)) == ACTIVITIES


def test_activities_by_name_any_case_or_by_index() -> None:
    assert parse_activity("walking", ACTIVITIES, 6) == WALKING
    assert parse_activity("Walking_Upstairs", ACTIVITIES, 6) == 1
    assert parse_activity("walking downstairs", ACTIVITIES, 6) == 2
    assert parse_activity("5", ACTIVITIES, 6) == 5
    assert parse_activity("3", None, 6) == SITTING


@pytest.mark.parametrize(("text", "names", "says"), [
    ("running", ACTIVITIES, "0 walking, 1 walking-upstairs"),
    ("6", ACTIVITIES, "5 lying"),
    ("-1", ACTIVITIES, "0 walking"),
    ("walk", ACTIVITIES, "unknown activity 'walk'"),
    ("walking", None, "0 to 5 (the manifest names no classes)"),
])
def test_unknown_activities_list_the_classes(text, names, says) -> None:
    assert says in usage_error(parse_activity, text, names, 6)


def test_a_manifest_without_classes_has_indices_only_and_a_bad_list_is_a_model_error(
        tmp_path: Path) -> None:
    manifest = json.loads(MANIFEST.read_text())
    del manifest["models"]["har-mlp"]["classes"]
    manifest["models"]["har-cnn"]["classes"] = ["a", "a", "b", "c", "d", "e"]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    assert class_names(path, ModelSpec.from_manifest(path, "har-mlp")) is None
    with pytest.raises(ModelError, match="6 distinct names"):
        class_names(path, ModelSpec.from_manifest(path, "har-cnn"))


# ------------------------------------------------------------ the store


def add_at(store: AgentStore, when: float, labels: list[int],
           monkeypatch: pytest.MonkeyPatch) -> None:
    """Store windows as if at `when` (the store stamps them with its clock)."""
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "time", SimpleNamespace(time=lambda: when))
        store.add_windows(np.full((len(labels), *SHAPE), when, np.float32), np.array(labels))


def rows(path: Path) -> list[tuple[int, float, int]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT id, stored_at, label FROM windows ORDER BY id").fetchall()


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AgentStore]:
    """Windows at NOW-300 (unlabelled), NOW-200 (2 unlabelled, 1 sitting, 1 walking) and
    NOW-100 (unlabelled), and one queued update."""
    store = AgentStore(tmp_path / FILENAME, input_shape=SHAPE)
    add_at(store, NOW - 300, [-1], monkeypatch)
    add_at(store, NOW - 200, [-1, -1, SITTING, WALKING], monkeypatch)
    add_at(store, NOW - 100, [-1], monkeypatch)
    store.enqueue("fedd/test/update/d", b"update", seq=7)
    yield store
    store.close()


def test_only_the_unlabelled_windows_of_the_span_get_the_label(store: AgentStore) -> None:
    before = rows(store.path)
    result = store.label_span(WALKING, start=NOW - 250, end=NOW - 150)
    assert (result.labelled, result.relabelled, result.kept) == (2, 0, 2)
    after = rows(store.path)
    assert [r[2] for r in after] == [-1, WALKING, WALKING, SITTING, WALKING, -1]
    # Ids and times (what retention goes by) stay; the outbox is not touched.
    assert [r[:2] for r in after] == [r[:2] for r in before]
    assert store.outgoing()[0].payload == b"update" and store.outbox_size() == 1
    assert store.count_windows(labelled_only=True) == 4


def test_relabel_overwrites_other_classes_too(store: AgentStore) -> None:
    result = store.label_span(WALKING, start=NOW - 250, end=NOW - 150, relabel=True)
    assert (result.labelled, result.relabelled, result.kept) == (2, 1, 1)  # kept: was walking
    assert [r[2] for r in rows(store.path)] == [-1, WALKING, WALKING, WALKING, WALKING, -1]


def test_the_span_includes_both_ends_and_nothing_beyond(store: AgentStore) -> None:
    result = store.label_span(SITTING, start=NOW - 300, end=NOW - 100)
    assert (result.labelled, result.kept) == (4, 2)
    nothing = store.label_span(SITTING, start=NOW - 99, end=NOW)
    assert (nothing.labelled, nothing.relabelled, nothing.kept) == (0, 0, 0)


def test_a_negative_label_is_refused(store: AgentStore) -> None:
    with pytest.raises(ValueError, match="0 or more"):
        store.label_span(-1, start=0, end=NOW)


def test_labelling_waits_for_the_agents_write_and_the_agent_sees_it(store: AgentStore) -> None:
    agent = AgentStore(store.path, input_shape=SHAPE)  # the running agent's connection
    try:
        assert agent.count_windows(labelled_only=True) == 2
        holding, released = threading.Event(), threading.Event()

        def write() -> None:
            with agent._transaction() as db:  # the agent mid-commit, as in add_windows
                db.execute("INSERT INTO windows (stored_at, label, features) VALUES (?, -1, ?)",
                           (NOW - 200, np.zeros(SHAPE, "<f4").tobytes()))
                holding.set()
                time.sleep(0.5)
            released.set()

        writer = threading.Thread(target=write)
        writer.start()
        assert holding.wait(5)
        result = store.label_span(WALKING, start=NOW - 250, end=NOW - 150)
        assert released.is_set()  # it waited for the commit (the busy timeout), no error
        writer.join()
        assert result.labelled == 3  # the agent's new window too
        assert agent.count_windows(labelled_only=True) == 5
        features, labels = agent.labelled_windows()
        assert len(features) == 5 and list(labels).count(WALKING) == 4
    finally:
        agent.close()


# ------------------------------------------------------------ the command


def label(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedd.cli", "label", "-c", str(config), *args],
                          capture_output=True, text=True, timeout=60, env=fedd_env(),
                          stdin=subprocess.DEVNULL, check=False)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    nowhere = SimpleNamespace(host="127.0.0.1", port=1)
    return write_yaml(tmp_path / "fedd.yaml", agent_settings(
        broker=nowhere, device_id="labelled", state_dir=tmp_path / "state", manifest=MANIFEST,
        sensor={"kind": "iio"}))


def agent_store(config: Path, model: str = "har-mlp") -> AgentStore:
    store = AgentStore(config.parent / "state" / FILENAME, input_shape=SHAPE)
    store.put(model=model)  # as the agent does when it starts
    return store


def test_the_command_labels_the_last_minutes_and_says_how_many(config: Path) -> None:
    store = agent_store(config)
    store.add_windows(np.zeros((3, *SHAPE)), np.array([-1, -1, SITTING]))
    store.close()
    done = label(config, "walking", "--last", "5m")
    assert done.returncode == 0, done.stderr
    assert "labelled 2 windows as walking (class 0), stored from " in done.stdout
    assert "kept 1 window already labelled (--relabel overwrites another class)" in done.stdout
    again = label(config, "Walking", "--last", "5m", "--relabel")
    assert again.returncode == 0, again.stderr
    assert "labelled 0 windows" in again.stdout
    assert "relabelled 1 window that had another class" in again.stdout
    assert "kept 2 windows already labelled walking" in again.stdout


def test_nothing_stored_in_the_span_exits_1(config: Path) -> None:
    agent_store(config).close()
    done = label(config, "0", "--from", str(time.time() - 60))
    assert done.returncode == EXIT_NOTHING
    assert "no windows were stored from" in done.stderr


def test_a_store_the_agent_keeps_busy_past_the_timeout_exits_75(config: Path) -> None:
    store = agent_store(config)
    store.add_windows(np.zeros((1, *SHAPE)), np.array([-1]))
    try:
        with store._transaction():  # the agent holding its write lock for longer than 5 s
            done = label(config, "walking", "--last", "5m")
    finally:
        store.close()
    assert done.returncode == EXIT_TEMPFAIL
    assert "database is locked; the agent is busy with it, try again" in done.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["running", "--last", "5m"], "unknown activity 'running'"),
    (["walking", "--last", "5 minutes"], "bad duration"),
    (["walking", "--from", "2999-01-01T00:00"], "in the future"),
    (["walking", "--last", "5m", "--to", "12:00"], "cannot be combined"),
])
def test_bad_input_exits_2_with_the_reason(config: Path, args: list[str], says: str) -> None:
    agent_store(config).close()
    done = label(config, *args)
    assert done.returncode == EXIT_USAGE
    assert done.stderr.startswith("fedd label: ") and says in done.stderr


def test_no_state_yet_exits_66_and_creates_nothing(config: Path) -> None:
    done = label(config, "walking", "--last", "5m")
    assert done.returncode == EXIT_NOINPUT
    assert "no state directory" in done.stderr and "has the agent run" in done.stderr
    (config.parent / "state").mkdir()
    done = label(config, "walking", "--last", "5m")
    assert done.returncode == EXIT_NOINPUT and "no window store" in done.stderr
    assert not (config.parent / "state" / FILENAME).exists()


def test_a_store_of_another_model_exits_65_untouched(config: Path) -> None:
    store = agent_store(config, model="har-cnn")
    store.add_windows(np.zeros((2, *SHAPE)), np.array([-1, -1]))
    store.close()
    done = label(config, "walking", "--last", "5m")
    assert done.returncode == EXIT_DATA
    assert "made for model har-cnn" in done.stderr and "names har-mlp" in done.stderr
    assert [r[2] for r in rows(config.parent / "state" / FILENAME)] == [-1, -1]


@pytest.fixture
def as_nobody() -> Iterator[Callable[[], contextlib.AbstractContextManager[None]]]:
    """`with as_nobody():` runs the block with the effective user nobody (root only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")

    @contextlib.contextmanager
    def switch() -> Iterator[None]:
        os.seteuid(NOBODY)
        try:
            yield
        finally:
            os.seteuid(0)

    return switch


def test_a_user_who_may_not_write_the_state_is_told_whom_to_run_as(as_nobody) -> None:
    spec = ModelSpec.from_manifest(MANIFEST, "har-mlp")
    folder = Path(tempfile.mkdtemp(prefix="fedd-label-"))  # tmp_path is 0700: unreachable
    try:
        folder.chmod(0o755)
        state = folder / "state"
        AgentStore(state / FILENAME, input_shape=SHAPE).close()
        state.chmod(0o750)  # as systemd's StateDirectoryMode: the service user's alone
        with as_nobody(), pytest.raises(LabelError) as caught:
            open_store(state, spec)
        assert caught.value.exit_code == EXIT_NOPERM
        assert str(caught.value) == (f"{state}: permission denied for user nobody (owner root, "
                                     "mode 0750): run fedd label as root")
        folder.chmod(0o700)  # now even the folder above cannot be entered
        with as_nobody(), pytest.raises(LabelError) as caught:
            open_store(state, spec)
        assert caught.value.exit_code == EXIT_NOPERM
        assert "run fedd label as root or as the agent's user" in str(caught.value)
    finally:
        shutil.rmtree(folder)
