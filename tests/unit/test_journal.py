"""Logging to journald: the native protocol, fields, priorities, and the stderr fallback.

A test-provided unix datagram socket stands in for journald's
/run/systemd/journal/socket (no journald runs here); the packaging test
(tests/integration/test_packaging.py) reads the same fields back from a real
journal under systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedd import service
from fedd.service import (
    JournalHandler,
    journal_field,
    log_fields,
    stderr_is_journal,
    syslog_priority,
)


def parse_entry(data: bytes) -> dict[str, str]:
    """journald's side of the native protocol: FIELD=value lines and binary-safe fields."""
    fields: dict[str, str] = {}
    while data:
        line, sep, rest = data.partition(b"\n")
        assert sep, f"unterminated field {line!r}"
        if b"=" in line:
            name, _, value = line.partition(b"=")
            data = rest
        else:  # binary-safe: NAME\n <u64 LE length> <data> \n
            name = line
            (size,) = struct.unpack("<Q", rest[:8])
            value, data = rest[8:8 + size], rest[8 + size:]
            assert data[:1] == b"\n"
            data = data[1:]
        assert name.decode().isupper() or name.decode().replace("_", "").isalnum()
        fields[name.decode()] = value.decode()
    return fields


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[socket.socket]:
    path = tmp_path / "journal.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("fedd.test.journal")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        yield log
    finally:
        for handler in list(log.handlers):
            log.removeHandler(handler)
            handler.close()


def attach(log: logging.Logger, journal: socket.socket, **fields: object) -> JournalHandler:
    handler = JournalHandler("fedd", fields, socket_path=journal.getsockname())
    log.addHandler(handler)
    return handler


def test_fields_use_the_plain_form_unless_the_value_has_a_newline():
    assert journal_field("MESSAGE", "hello") == b"MESSAGE=hello\n"
    assert journal_field("FEDD_UPDATE_SEQ", 17) == b"FEDD_UPDATE_SEQ=17\n"
    assert journal_field("MESSAGE", "a\nb") == b"MESSAGE\n" + struct.pack("<Q", 3) + b"a\nb\n"


@pytest.mark.parametrize(("level", "priority"), [
    (logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6),
    (logging.DEBUG, 7), (5, 7)])
def test_levels_map_to_syslog_priorities(level, priority):
    assert syslog_priority(level) == priority


def test_an_entry_carries_message_priority_identity_and_code_location(journal, logger):
    attach(logger, journal, FEDD_DEVICE="pi-001", FEDD_FLEET="farm", FEDD_ROLE="agent")
    logger.warning("hub rejected update %d: %s", 17, "too-stale")
    entry = parse_entry(journal.recv(65536))
    assert entry["MESSAGE"] == "fedd.test.journal: hub rejected update 17: too-stale"
    assert entry["PRIORITY"] == "4"
    assert entry["SYSLOG_IDENTIFIER"] == "fedd"
    assert entry["LOGGER"] == "fedd.test.journal"
    assert entry["FEDD_DEVICE"] == "pi-001"
    assert entry["FEDD_FLEET"] == "farm"
    assert entry["FEDD_ROLE"] == "agent"
    assert entry["CODE_FILE"] == __file__
    assert entry["CODE_FUNC"] == "test_an_entry_carries_message_priority_identity_and_code_location"
    assert int(entry["CODE_LINE"]) > 0
    assert entry["THREAD_NAME"] == "MainThread"


def test_fedd_extras_become_fields_and_others_do_not(journal, logger):
    attach(logger, journal)
    logger.info("applied version %d", 5,
                extra={**log_fields(model_version=5, update_seq=17, skipped=None), "other": "x"})
    entry = parse_entry(journal.recv(65536))
    assert entry["FEDD_MODEL_VERSION"] == "5"
    assert entry["FEDD_UPDATE_SEQ"] == "17"
    assert "FEDD_SKIPPED" not in entry
    assert "OTHER" not in entry and "FEDD_OTHER" not in entry
    assert entry["PRIORITY"] == "6"


def test_a_traceback_travels_in_one_binary_safe_message(journal, logger):
    attach(logger, journal)
    try:
        raise ValueError("bad update")
    except ValueError:
        logger.exception("decoding failed")
    entry = parse_entry(journal.recv(65536))
    assert entry["PRIORITY"] == "3"
    assert entry["MESSAGE"].startswith("fedd.test.journal: decoding failed\nTraceback")
    assert entry["MESSAGE"].rstrip().endswith("ValueError: bad update")


def test_bad_constant_field_names_are_refused():
    with pytest.raises(ValueError, match="not a journal field name"):
        JournalHandler("fedd", {"fedd_device": "x"})
    with pytest.raises(ValueError, match="not a journal field name"):
        JournalHandler("fedd", {"_SYSTEMD_UNIT": "forged"})


def test_without_journald_an_entry_falls_back_to_stderr_with_its_priority(tmp_path, logger,
                                                                            capsys):
    handler = JournalHandler("fedd", socket_path=str(tmp_path / "no-journal.sock"))
    logger.addHandler(handler)
    logger.error("broker refused update %d", 3)
    assert capsys.readouterr().err == "<3>fedd.test.journal: broker refused update 3\n"


def test_stderr_is_the_journal_only_when_journal_stream_names_it():
    stat = os.fstat(sys.stderr.fileno())
    assert stderr_is_journal({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"})
    assert not stderr_is_journal({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino + 1}"})
    assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"})
    assert not stderr_is_journal({})


def test_setup_logging_keeps_plain_lines_outside_systemd(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        service.setup_logging("warning", fields={"FEDD_DEVICE": "pi-001"})
        (handler,) = root.handlers
        assert type(handler) is logging.StreamHandler
        assert handler.formatter is not None
        assert handler.formatter._fmt == service.PLAIN_FORMAT
        assert root.level == logging.WARNING
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_setup_logging_uses_the_journal_under_systemd(monkeypatch, tmp_path, journal):
    stat = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
    monkeypatch.setattr(service, "JOURNAL_SOCKET", journal.getsockname())
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        service.setup_logging("info", identifier="fedd-hub", fields={"FEDD_FLEET": "farm"})
        (handler,) = root.handlers
        assert isinstance(handler, JournalHandler)
        assert handler.socket_path == journal.getsockname()
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
