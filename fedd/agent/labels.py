"""`fedd label`: the device's user says what they were doing, and it trains.

A live source (`iio`, a `command` without a label column) stores its windows
unlabelled, and only labelled windows train. This labels the windows stored
in a span of time with one of the model's classes, in the agent's own store
and while the agent runs: its trainer counts labelled windows whenever a
window is stored, so the labels take part in its next round on their own.

A window is stored when its last sample has arrived, so its `stored_at` is
(within a chunk, ~0.1 s) the time it ended: a window belongs to a span if
it ended within it, and the first one may begin up to a window's length
(`window.size / rate_hz`, 2.56 s by default) before the span does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pwd
import re
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedd.agent.store import FILENAME, AgentStore, SpanLabels
from fedd.config import EXIT_CONFIG_MISSING, load_agent_config
from fedd.model import ModelError, ModelSpec

# Exit codes beside the CLI's (sysexits where one fits).
EXIT_NOTHING = 1  # no window was stored in the span
EXIT_USAGE = 2  # as argparse: a bad activity, duration, time or span
EXIT_DATA = 65  # EX_DATAERR: the store belongs to another model, or is not usable SQLite
EXIT_NOINPUT = EXIT_CONFIG_MISSING  # 66, EX_NOINPUT: no state directory or store yet
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: the agent held the store longer than the busy timeout
EXIT_NOPERM = 77  # EX_NOPERM: this user may not write the agent's state

UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhd])+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIX_TIME = re.compile(r"\d+(?:\.\d+)?")
_TIME_OF_DAY = re.compile(r"\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?")


class LabelError(Exception):
    """Why nothing was labelled, with the exit code that tells a script which case it is."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Span:
    """From `start` to `end`, Unix seconds, both inclusive."""

    start: float
    end: float

    def __str__(self) -> str:
        return f"{_local(self.start)} to {_local(self.end)} ({_duration(self.end - self.start)})"


def parse_duration(text: str) -> float:
    """`90s`, `5m`, `1.5h`, `1h30m`, `2d` → seconds (> 0)."""
    compact = text.strip().lower()
    if not _DURATION.fullmatch(compact):
        raise LabelError(f"bad duration {text!r}: give a number and a unit (s, m, h or d), "
                         "e.g. 90s, 5m, 1h30m", EXIT_USAGE)
    seconds = sum(float(n) * UNITS_S[unit] for n, unit in _DURATION_PART.findall(compact))
    if seconds <= 0:
        raise LabelError(f"bad duration {text!r}: it must be longer than 0 s", EXIT_USAGE)
    return seconds


def parse_time(text: str, *, now: float) -> float:
    """ISO 8601 (local time unless it says otherwise), `HH:MM[:SS]` today, or Unix seconds."""
    text = text.strip()
    try:
        if _UNIX_TIME.fullmatch(text):
            return float(text)
        if _TIME_OF_DAY.fullmatch(text):
            hour, rest = text.split(":", 1)
            of_day = dt.time.fromisoformat(f"{int(hour):02d}:{rest}")
            return dt.datetime.combine(dt.datetime.fromtimestamp(now).date(), of_day).timestamp()
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise LabelError(f"bad time {text!r}: give ISO 8601 (2025-03-01T14:30:00, local time "
                         "unless it has an offset), HH:MM[:SS] today, or Unix seconds",
                         EXIT_USAGE) from None


def parse_span(*, last: str | None, start: str | None, end: str | None, now: float) -> Span:
    """The span `--last` or `--from`/`--to` name; it must have passed already."""
    if last is not None:
        if start is not None or end is not None:
            raise LabelError("--last cannot be combined with --from or --to", EXIT_USAGE)
        return Span(now - parse_duration(last), now)
    if start is None:
        raise LabelError("give the span: --last DURATION, or --from TIME [--to TIME]",
                         EXIT_USAGE)
    span = Span(parse_time(start, now=now), now if end is None else parse_time(end, now=now))
    if span.start > now:
        raise LabelError(f"--from {start} ({_local(span.start)}) is in the future", EXIT_USAGE)
    if span.end > now:
        raise LabelError(f"--to {end} ({_local(span.end)}) is in the future: windows can be "
                         "labelled once they are stored", EXIT_USAGE)
    if span.end <= span.start:
        raise LabelError(f"empty span: {_local(span.end)} is not after {_local(span.start)}",
                         EXIT_USAGE)
    return span


def class_names(manifest: str | Path, spec: ModelSpec) -> tuple[str, ...] | None:
    """The model's class names from its manifest entry (`classes`), or None if it has none."""
    names = json.loads(Path(manifest).read_text())["models"][spec.name].get("classes")
    if names is None:
        return None
    if (not isinstance(names, list) or len(names) != spec.num_classes
            or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names)):
        raise ModelError(f"{manifest}: model {spec.name!r}: 'classes' must list "
                         f"{spec.num_classes} distinct names")
    return tuple(names)


def parse_activity(text: str, names: tuple[str, ...] | None, num_classes: int) -> int:
    """A class by name (any case; `_` or a space for `-`) or by index."""
    wanted = text.strip().lower().replace("_", "-").replace(" ", "-")
    if wanted.isdigit() and int(wanted) < num_classes:
        return int(wanted)
    if names is not None and wanted in (lowered := [n.lower() for n in names]):
        return lowered.index(wanted)
    known = (", ".join(f"{i} {n}" for i, n in enumerate(names)) if names is not None
             else f"0 to {num_classes - 1} (the manifest names no classes)")
    raise LabelError(f"unknown activity {text!r}: the model's classes are {known}", EXIT_USAGE)


def open_store(state_dir: Path, spec: ModelSpec) -> AgentStore:
    """The agent's store, if it exists, this user may write it, and it is this model's."""
    path = state_dir / FILENAME
    try:
        if not state_dir.is_dir():
            raise LabelError(f"no state directory {state_dir}: has the agent run with this "
                             "configuration?", EXIT_NOINPUT)
        # SQLite in WAL mode writes the store, its -wal and -shm, and may create those two.
        _writable(state_dir, os.R_OK | os.W_OK | os.X_OK)
        if not path.is_file():
            raise LabelError(f"no window store {path}: has the agent run with this "
                             "configuration?", EXIT_NOINPUT)
        for part in (path, path.with_name(FILENAME + "-wal"), path.with_name(FILENAME + "-shm")):
            if part.exists():
                _writable(part, os.R_OK | os.W_OK)
    except PermissionError as exc:  # a folder on the way this user may not enter
        raise _denied(Path(exc.filename or state_dir)) from None
    try:
        store = AgentStore(path, input_shape=spec.input_shape)
        made_for = store.get("model")
    except sqlite3.DatabaseError as exc:
        raise LabelError(f"{path}: not a usable window store: {exc}", EXIT_DATA) from exc
    if made_for != spec.name:
        store.close()
        raise LabelError(f"{path} holds windows made for model {made_for}, the configuration "
                         f"names {spec.name} (the agent drops them when it starts with "
                         f"{spec.name}): nothing labelled", EXIT_DATA)
    return store


def _writable(path: Path, mode: int) -> None:
    # Effective ids: the ones SQLite will open the files with.
    if not os.access(path, mode, effective_ids=os.access in os.supports_effective_ids):
        raise _denied(path)


def _denied(path: Path) -> LabelError:
    """Permission denied, and whom to run as instead."""
    try:
        info = path.stat()
    except OSError:
        return LabelError(f"{path}: permission denied for user {_user(os.geteuid())}: run "
                          "fedd label as root or as the agent's user", EXIT_NOPERM)
    owner = _user(info.st_uid)
    who = "root" if owner == "root" else f"root or as {owner} (sudo -u {owner} fedd label …)"
    return LabelError(f"{path}: permission denied for user {_user(os.geteuid())} (owner "
                      f"{owner}, mode {info.st_mode & 0o7777:04o}): run fedd label as {who}",
                      EXIT_NOPERM)


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _local(t: float) -> str:
    return dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s"))
                   if n) or "0s"


def _windows(count: int) -> str:
    return f"{count} window" + ("" if count == 1 else "s")


def report(result: SpanLabels, *, activity: str, label: int, span: Span,
           relabel: bool) -> str:
    """What `fedd label` prints: the counts and the span, one fact per line."""
    lines = [f"labelled {_windows(result.labelled)} as {activity} (class {label}), "
             f"stored from {span}"]
    if result.relabelled:
        lines.append(f"relabelled {_windows(result.relabelled)} that had another class")
    if result.kept:
        lines.append(f"kept {_windows(result.kept)} already labelled"
                     + (f" {activity}" if relabel else " (--relabel overwrites another class)"))
    return "\n".join(lines)


def label_command(args: argparse.Namespace) -> int:
    """`fedd label -c FILE ACTIVITY (--last D | --from T [--to T]) [--relabel]`."""
    now = time.time()
    config = load_agent_config(args.config)
    spec = ModelSpec.from_manifest(config.model.manifest, config.model.name)
    try:
        names = class_names(config.model.manifest, spec)
        label = parse_activity(args.activity, names, spec.num_classes)
        span = parse_span(last=args.last, start=args.start, end=args.end, now=now)
        store = open_store(Path(config.state_dir), spec)
        try:
            result = store.label_span(label, start=span.start, end=span.end,
                                      relabel=args.relabel)
        except sqlite3.DatabaseError as exc:  # locked past the busy timeout, or worse
            code = EXIT_TEMPFAIL if "locked" in str(exc) else EXIT_DATA
            raise LabelError(f"{store.path}: {exc}"
                             + ("; the agent is busy with it, try again"
                                if code == EXIT_TEMPFAIL else ""), code) from exc
        finally:
            store.close()
    except LabelError as exc:
        print(f"fedd label: {exc}", file=sys.stderr)
        return exc.exit_code
    activity = names[label] if names is not None else str(label)
    if not (result.labelled or result.relabelled or result.kept):
        print(f"fedd label: no windows were stored from {span}: was the agent sampling?",
              file=sys.stderr)
        return EXIT_NOTHING
    print(report(result, activity=activity, label=label, span=span, relabel=args.relabel))
    return 0
