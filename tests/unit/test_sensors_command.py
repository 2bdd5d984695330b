"""Command/stdin source: real child processes and real pipes, bad lines, exits, resampling."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sensor_streams import collect, joined

from fedd.agent.sensors import Chunk, CommandError, CommandFailed, CommandSource
from fedd.agent.sensors import command as command_module
from fedd.agent.sensors.command import LineSplitter
from fedd.agent.sensors.resample import Resampler


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


GOOD = [
    "0.5,-1,2.25,1e-3,-.5,3.,1",
    "  0.5 -1\t2.25 1e-3 -.5 3. 2  ",  # whitespace separated, padded
    "0.5, -1, 2.25, 1e-3, -.5, 3., -1",  # comma and spaces
]
BAD = {
    "1,2,3": "wrong number of columns",
    "1,2,3,4,5,6,7,8": "wrong number of columns",
    "a,b,c,d,e,f,1": "not a number",
    "1,2,3,4,5,nan,1": "not a number",
    "1,2,3,4,5,inf,1": "not a number",
    "1,2,3,4,5,1_000,1": "not a number",
    "1,2,3,4,5,1e999,1": "not finite",
    "1,2,3,4,5,6,1.5": "label not an integer from -1 to 32767",
    "1,2,3,4,5,6,-2": "label not an integer from -1 to 32767",
    "1,2,3,4,5,6,40000": "label not an integer from -1 to 32767",
    "1,,3,4,5,6,1": "empty field",
    "1,2,3,4,5,6,1,": "wrong number of columns",
    "1,2,3,4,5,é,1": "not ASCII text",
    "9," * 600: "too long",
}


def test_a_command_s_lines_become_samples_and_bad_lines_are_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    lines = [*GOOD, "# a comment", "", *BAD, *GOOD]
    code = f"""
        import sys
        for line in {lines!r}:
            sys.stdout.buffer.write(line.encode() + b"\\n")
        sys.stdout.buffer.write(b"\\xff\\xfe,1,2,3,4,5,1\\n")
        sys.stdout.buffer.write(b"7,7,7,7,7,7,6")  # the last line has no newline
    """
    source = CommandSource(command=python(code), rate_hz=50, label_column=6)
    with caplog.at_level(logging.INFO, logger="fedd.agent.sensors"):
        chunks = collect(source)
    samples, labels = joined(chunks)
    row = np.array([0.5, -1, 2.25, 1e-3, -0.5, 3.0], np.float32)
    np.testing.assert_array_equal(samples, np.vstack([np.tile(row, (6, 1)), np.full((1, 6), 7)]))
    assert labels.tolist() == [1, 2, -1, 1, 2, -1, 6]
    expected: dict[str, int] = {}
    for reason in [*BAD.values(), "not ASCII text"]:
        expected[reason] = expected.get(reason, 0) + 1
    assert source.bad_lines == expected
    assert source.stats == {"lines": 9 + len(BAD) + 1, "samples": 7, "bad_lines": expected,
                            "exit_code": 0}
    assert chunks[0].gap_before and chunks[-1].cursor == 7
    assert "line 6 dropped, wrong number of columns (1 such lines so far): b'1,2,3'" in caplog.text
    assert "ended with code 0 after 24 lines" in caplog.text


def test_a_failing_command_reports_its_code_and_error_output(
        caplog: pytest.LogCaptureFixture) -> None:
    code = """
        import sys
        print("1,2,3,4,5,6", flush=True)
        sys.stderr.write("i2c read failed\\nsensor gone\\n")
        sys.exit(3)
    """
    source = CommandSource(command=python(code), rate_hz=50)
    received: list[Chunk] = []

    async def run() -> None:
        async for chunk in source.chunks():
            received.append(chunk)

    with caplog.at_level(logging.WARNING), pytest.raises(CommandFailed) as caught:
        asyncio.run(asyncio.wait_for(run(), 5.0))
    assert caught.value.returncode == 3 and source.exit_code == 3
    assert caught.value.stderr_tail == ("i2c read failed", "sensor gone")
    assert "exited with code 3; its last error output: i2c read failed | sensor gone" \
        in str(caught.value)
    assert len(received) == 1 and received[0].samples.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert "sensor gone" in caplog.text


def test_a_command_that_cannot_start_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match=r"cannot start sensor command .*no-such-sensor-tool"):
        collect(CommandSource(command=[str(tmp_path / "no-such-sensor-tool")], rate_hz=50))


def test_a_command_that_closes_its_output_but_lingers_is_stopped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(command_module, "EXIT_WAIT_S", 0.2)
    code = """
        import os, time
        os.write(1, b"1 2 3 4 5 6\\n")
        os.close(1)
        time.sleep(30)
    """
    with pytest.raises(CommandFailed, match="was killed by SIGTERM"):
        collect(CommandSource(command=python(code), rate_hz=50))


def test_closing_the_stream_stops_an_endless_command(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    code = f"""
        import os, time
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        i = 0
        while True:
            print(i, i, i, i, i, i, flush=True)
            i += 1
            time.sleep(0.005)
    """
    source = CommandSource(command=python(code), rate_hz=200)
    started = time.monotonic()
    samples, _ = joined(collect(source, samples=30))
    assert time.monotonic() - started < 3.0
    np.testing.assert_array_equal(samples[:, 0], np.arange(len(samples)))
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # terminated and reaped
        os.kill(pid, 0)


def test_stdin_through_a_pipe() -> None:
    read_end, write_end = os.pipe()

    def writer() -> None:
        with os.fdopen(write_end, "wb") as pipe:
            for i in range(100):
                pipe.write(f"{i},{-i},0,0,0,0\n".encode())
                if i % 25 == 0:
                    pipe.flush()
                    time.sleep(0.03)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        source = CommandSource(command=None, rate_hz=50, stdin=read_end)
        samples, labels = joined(collect(source))
    finally:
        thread.join()
        os.close(read_end)
    np.testing.assert_array_equal(samples[:, 0], np.arange(100))
    np.testing.assert_array_equal(samples[:, 1], -np.arange(100))
    assert (labels == -1).all() and source.exit_code is None


def test_stdin_from_a_regular_file_and_scaled_columns(tmp_path: Path) -> None:
    data = tmp_path / "in.txt"
    data.write_text("".join(f"{i} 9.80665 {2 * i} x 1 2 3 4\n" for i in range(10)))
    with data.open("rb") as stdin:
        source = CommandSource(command=None, rate_hz=50, stdin=stdin, columns=8,
                               channels=[1, 0, 2, 4, 5, 6],
                               scale=[1 / 9.80665, 1, 0.5, 1, 1, 1])
        samples, _ = joined(collect(source))
    np.testing.assert_allclose(samples[:, 0], 1.0)
    np.testing.assert_array_equal(samples[:, 1], np.arange(10))
    np.testing.assert_array_equal(samples[:, 2], np.arange(10))


def test_a_timestamp_column_puts_samples_on_the_rate_s_grid() -> None:
    rng = np.random.default_rng(0)
    times_ms = np.cumsum(rng.uniform(15, 25, 200))  # ~50 Hz with jitter
    times_ms[120:] += 1000  # the sensor stalled for a second
    lines = [f"{t:.3f},{2 * t / 1000:.9f},1,1,1,1,1,{3 if i < 100 else 4}"
             for i, t in enumerate(times_ms)]
    lines.insert(50, f"{times_ms[48]:.3f},0,0,0,0,0,0,1")  # a step back: a bad line
    code = f"""
        import sys
        sys.stdout.write("\\n".join({lines!r}) + "\\n")
    """
    source = CommandSource(command=python(code), rate_hz=50, channels=range(1, 7),
                           timestamp_column=0, timestamp_unit_s=1e-3, label_column=7)
    chunks = collect(source)
    assert source.bad_lines == {"timestamp not after the previous one": 1}
    assert [c.gap_before for c in chunks].count(True) == 2
    split = next(i for i, c in enumerate(chunks) if i and c.gap_before)
    for part, start_ms in ((chunks[:split], times_ms[0]), (chunks[split:], times_ms[120])):
        samples, labels = joined(part)
        grid = start_ms / 1000 + np.arange(len(samples)) * 0.02
        np.testing.assert_allclose(samples[:, 0], 2 * grid, atol=1e-5)  # a line, interpolated
        assert set(labels.tolist()) <= {3, 4}
    assert len(joined(chunks[:split])[0]) == int((times_ms[119] - times_ms[0]) // 20) + 1


def test_resampler_output_does_not_depend_on_how_input_is_cut() -> None:
    rng = np.random.default_rng(1)
    times = np.cumsum(rng.uniform(0.005, 0.03, 500))
    times[300:] += 0.5
    times[400:] -= 5.0  # a clock reset
    values = rng.normal(size=(500, 2))
    labels = rng.integers(-1, 6, 500).astype(np.int16)
    whole = Resampler(50, 0.04).push(times, values, labels)
    pieces, cuts = [], sorted(rng.choice(np.arange(1, 500), 40, replace=False).tolist())
    cut_resampler = Resampler(50, 0.04)
    for lo, hi in zip([0, *cuts], [*cuts, 500], strict=True):
        pieces += cut_resampler.push(times[lo:hi], values[lo:hi], labels[lo:hi])

    def flat(segments: list) -> tuple[np.ndarray, np.ndarray, list[int]]:
        samples = np.concatenate([s for s, _, _ in segments])
        gaps = np.cumsum([0] + [len(s) for s, _, _ in segments])[:-1]
        return samples, np.concatenate([lab for _, lab, _ in segments]), \
            [int(g) for g, (_, _, gap) in zip(gaps, segments, strict=True) if gap]

    a, b = flat(whole), flat(pieces)
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2] and len(a[2]) == 3 and cut_resampler.gaps == 2


def test_line_splitter_bounds_lines_across_reads() -> None:
    splitter = LineSplitter(10)
    out = splitter.feed(b"short\n0123456") + splitter.feed(b"789abcdef") \
        + splitter.feed(b"ghij\nok\nexactly10c") + splitter.feed(b"\ntail")
    assert out == [b"short", None, b"ok", b"exactly10c"]
    assert splitter.end() == [b"tail"]
    assert splitter.feed(b"x" * 30) == [] and splitter.end() == [None]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"command": "sensor --json"}, "non-empty list"),
    ({"command": []}, "non-empty list"),
    ({"command": None, "rate_hz": 0}, "rate_hz must be positive"),
    ({"command": None, "channels": [0, 0, 1]}, "used twice"),
    ({"command": None, "label_column": 3}, "used twice"),
    ({"command": None, "columns": 5}, "must exceed the highest column"),
    ({"command": None, "scale": [1.0]}, "1 factors for 6 channels"),
    ({"command": None, "max_line_bytes": 4}, "max_line_bytes"),
    ({"command": None, "gap_tolerance": 1.0}, "gap_tolerance"),
])
def test_settings_are_checked_at_once(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CommandSource(**{"rate_hz": 50, **kwargs})
