"""IIO source: sysfs trees with the kernel's layout in a tmp folder, buffered and polled.

`/dev/iio:device0` is a regular file or a FIFO the test writes records
into. The record packer here is written independently of the source (plain
`int.to_bytes`, the kernel's alignment rule spelled out), so the tests
check the layout and decoding against the ABI, not against the code.
The last test feeds the same numbers through the IIO and the command
sources and compares the windows and features they give.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from sensor_streams import collect, joined

from fedd.agent.features import window_features
from fedd.agent.sensors import (
    Chunk,
    CommandSource,
    IioBufferUnavailable,
    IioChannelNotFound,
    IioDeviceNotFound,
    IioError,
    IioSource,
    IioTypeError,
    SensorSource,
    iio,
)
from fedd.agent.sensors.iio import ScanElement, ScanType, pick_frequency, record_dtype
from fedd.agent.windowing import Windower

G = 9.80665
SIX = ("accel_x", "accel_y", "accel_z", "anglvel_x", "anglvel_y", "anglvel_z")
SCALES = {"accel": 0.000598205, "anglvel": 0.000133090}  # an MPU-6050 at ±2 g, ±250 °/s


def parse_type(text: str) -> tuple[str, str, int, int, int]:
    endian, rest = text.split(":")
    kind, rest = rest[0], rest[1:]
    bits, rest = rest.split("/")
    storage, _, shift = rest.partition(">>")
    return endian, kind, int(bits), int(storage), int(shift or 0)


def pack_value(value: int | float, type_text: str, junk: bool = True) -> bytes:
    """One element as the kernel stores it; `junk` sets the bits outside the value."""
    endian, kind, bits, storage, shift = parse_type(type_text)
    order = "big" if endian == "be" else "little"
    if kind == "f":
        return struct.pack((">" if order == "big" else "<") + {32: "f", 64: "d"}[storage], value)
    word = (int(value) & ((1 << bits) - 1)) << shift
    if junk:
        word |= ((1 << storage) - 1) & ~(((1 << bits) - 1) << shift)
    return word.to_bytes(storage // 8, order)


def pack_records(elements: Sequence[tuple[str, int, str]],
                 rows: Sequence[Mapping[str, int | float]]) -> bytes:
    """Records of (name, index, type) elements: each aligned to its size, padded to the largest."""
    ordered = sorted(elements, key=lambda e: e[1])
    out = bytearray()
    for row in rows:
        record = bytearray()
        largest = 1
        for name, _, type_text in ordered:
            size = parse_type(type_text)[3] // 8
            largest = max(largest, size)
            record += bytes(-len(record) % size)
            record += pack_value(row[name], type_text, junk=name != "timestamp")
        record += bytes(-len(record) % largest)
        out += record
    return bytes(out)


def make_device(root: Path, *, number: int = 0, name: str = "mpu6050",
                channels: Sequence[str] = SIX, types: Mapping[str, str] | str = "le:s16/16>>0",
                raw: Mapping[str, int] | None = None, scales: Mapping[str, float] = SCALES,
                offsets: Mapping[str, float] | None = None, frequency: str | None = "50",
                available: str | None = "12.5 25 50 100 200", buffer: str | None = "legacy",
                timestamp: bool = True, extra_scan: Sequence[str] = ("temp",),
                char: str | None = "file") -> Path:
    """An `iio:deviceN` folder with the kernel's layout (and `dev/iio:deviceN` as asked)."""
    dev = root / "sys/bus/iio/devices" / f"iio:device{number}"
    dev.mkdir(parents=True)
    (dev / "name").write_text(name + "\n")
    raw = raw or {}
    for channel in channels:
        (dev / f"in_{channel}_raw").write_text(f"{raw.get(channel, 0)}\n")
    for kind, scale in scales.items():
        (dev / f"in_{kind}_scale").write_text(f"{scale:.9f}\n")
    for channel, offset in (offsets or {}).items():
        (dev / f"in_{channel}_offset").write_text(f"{offset}\n")
    if frequency is not None:
        (dev / "sampling_frequency").write_text(frequency + "\n")
    if available is not None:
        (dev / "sampling_frequency_available").write_text(available + "\n")
    if buffer is not None:
        buffer_dir = dev / ("buffer" if buffer == "legacy" else "buffer0")
        scan_dir = dev / "scan_elements" if buffer == "legacy" else buffer_dir
        buffer_dir.mkdir()
        scan_dir.mkdir(exist_ok=True)
        (buffer_dir / "enable").write_text("0\n")
        (buffer_dir / "length").write_text("2\n")
        scanned = [*channels, *extra_scan, *(["timestamp"] if timestamp else [])]
        for index, channel in enumerate(scanned):
            if channel == "timestamp":
                type_text = "le:s64/64>>0"
            elif isinstance(types, str):
                type_text = types
            else:
                type_text = types.get(channel, "le:s16/16>>0")
            (scan_dir / f"in_{channel}_en").write_text("1\n" if channel in extra_scan else "0\n")
            (scan_dir / f"in_{channel}_index").write_text(f"{index}\n")
            (scan_dir / f"in_{channel}_type").write_text(type_text + "\n")
    (root / "dev").mkdir(exist_ok=True)
    if char == "file":
        (root / "dev" / dev.name).write_bytes(b"")
    return dev


def elements_of(dev: Path, channels: Sequence[str] = SIX,
                timestamp: bool = True) -> list[tuple[str, int, str]]:
    """(name, index, type) of the elements the source will enable, read from the tree."""
    scan = dev / "scan_elements" if (dev / "scan_elements").is_dir() else dev / "buffer0"
    names = [*channels, *(["timestamp"] if timestamp else [])]
    return [(n, int((scan / f"in_{n}_index").read_text()),
             (scan / f"in_{n}_type").read_text().strip()) for n in names]


def expected_values(raw: np.ndarray, channels: Sequence[str] = SIX,
                    offsets: Mapping[str, float] | None = None) -> np.ndarray:
    """(raw + offset) * scale, accel in g: the documented formula, in float64 then float32."""
    cols = []
    for i, channel in enumerate(channels):
        kind = channel.split("_")[0]
        value = (raw[:, i].astype(np.float64) + (offsets or {}).get(channel, 0.0)) \
            * float(f"{SCALES[kind]:.9f}")
        cols.append(value / G if kind == "accel" else value)
    return np.stack(cols, axis=1).astype(np.float32)


def records_for(dev: Path, raw: np.ndarray, timestamps_ns: Sequence[int] | None = None,
                channels: Sequence[str] = SIX) -> bytes:
    timestamps = timestamps_ns if timestamps_ns is not None else \
        [1_000_000_000 + i * 20_000_000 for i in range(len(raw))]
    rows = [{**dict(zip(channels, map(int, r), strict=True)), "timestamp": t}
            for r, t in zip(raw, timestamps, strict=True)]
    return pack_records(elements_of(dev, channels), rows)


def random_raw(n: int, seed: int = 0, low: int = -32768, high: int = 32767) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high + 1, size=(n, 6))


# ------------------------------------------------------------------ type strings and layout


@pytest.mark.parametrize(("text", "expected"), [
    ("le:s16/16>>0", ScanType(False, "s", 16, 16, 1, 0)),
    ("be:u12/16>>4", ScanType(True, "u", 12, 16, 1, 4)),
    ("le:s24/32>>8", ScanType(False, "s", 24, 32, 1, 8)),
    ("le:s16/16", ScanType(False, "s", 16, 16, 1, 0)),
    ("be:s16/16X3>>0", ScanType(True, "s", 16, 16, 3, 0)),
    ("le:f32/32>>0", ScanType(False, "f", 32, 32, 1, 0)),
    ("le:s64/64>>0\n", ScanType(False, "s", 64, 64, 1, 0)),
])
def test_scan_type_parses_the_abi_forms(text: str, expected: ScanType) -> None:
    assert ScanType.parse(text) == expected


@pytest.mark.parametrize("text", ["", "le:s16", "xx:s16/16>>0", "le:q16/16>>0", "le:s16/12>>0",
                                  "le:s12/16>>8", "le:s0/16>>0", "le:s16/24>>0", "le:f16/32>>0",
                                  "le:s16/16>>", "LE:s16/16>>0"])
def test_scan_type_rejects_what_it_cannot_decode(text: str) -> None:
    with pytest.raises(IioTypeError, match="scan element type"):
        ScanType.parse(text, "in_accel_x_type")


@pytest.mark.parametrize("type_text", ["le:s16/16>>0", "be:s16/16>>0", "le:u16/16>>0",
                                       "be:u16/16>>0", "le:s12/16>>4", "be:s12/16>>4",
                                       "le:u12/16>>4", "le:s10/16>>0", "be:s24/32>>8",
                                       "le:s32/32>>0", "le:s8/8>>0", "be:u8/8>>0",
                                       "le:s14/16>>2"])
def test_decoding_masks_shifts_and_sign_extends(type_text: str) -> None:
    _, kind, bits, _, _ = parse_type(type_text)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if kind == "s" else (0, (1 << bits) - 1)
    values = [low, high, 0, 1, low + 1, high - 1, *np.random.default_rng(bits).integers(
        low, high + 1, 50).tolist()]
    scan = ScanType.parse(type_text)
    stored = np.frombuffer(b"".join(pack_value(v, type_text) for v in values),
                           scan.numpy_format())
    assert scan.decode(stored).tolist() == values


def test_decoding_floats_and_64_bit_timestamps() -> None:
    floats = ScanType.parse("be:f32/32>>0")
    stored = np.frombuffer(struct.pack(">3f", 1.5, -2.25, 3e-3), floats.numpy_format())
    np.testing.assert_allclose(floats.decode(stored), [1.5, -2.25, 3e-3], rtol=1e-7)
    stamp = ScanType.parse("le:s64/64>>0")
    values = [1_700_000_000_123_456_789, -5, 0]
    stored = np.frombuffer(struct.pack("<3q", *values), stamp.numpy_format())
    assert stamp.decode(stored).tolist() == values


@pytest.mark.parametrize(("types", "offsets", "itemsize"), [
    # three 16-bit axes, then the timestamp aligned to 8 bytes: the usual accelerometer record
    (["le:s16/16>>0"] * 3 + ["le:s64/64>>0"], [0, 2, 4, 8], 16),
    (["le:s16/16>>0"] * 6 + ["le:s64/64>>0"], [0, 2, 4, 6, 8, 10, 16], 24),
    (["le:s8/8>>0", "le:s32/32>>0", "be:s16/16>>0"], [0, 4, 8], 12),
    (["le:s16/16>>0", "le:s8/8>>0", "le:s16/16>>0"], [0, 2, 4], 6),
    (["le:s64/64>>0", "le:s16/16>>0"], [0, 8], 16),
])
def test_record_layout_follows_the_kernel_alignment(types: list[str], offsets: list[int],
                                                    itemsize: int) -> None:
    elements = [ScanElement(f"c{i}", i * 2, ScanType.parse(t)) for i, t in enumerate(types)]
    dtype = record_dtype(list(reversed(elements)))  # order comes from the index, not the list
    assert [dtype.fields[f"c{i}"][1] for i in range(len(types))] == offsets
    assert dtype.itemsize == itemsize
    named = [(f"c{i}", i * 2, t) for i, t in enumerate(types)]
    assert len(pack_records(named, [dict.fromkeys(dtype.names, 1)])) == itemsize


# ------------------------------------------------------------------ buffered


@pytest.mark.parametrize("layout", ["legacy", "buffer0"])
def test_buffered_reads_records_and_manages_the_buffer(tmp_path: Path, layout: str) -> None:
    dev = make_device(tmp_path, buffer=layout, offsets={"accel_x": 12})
    raw = random_raw(300)
    (tmp_path / "dev/iio:device0").write_bytes(records_for(dev, raw))
    source = IioSource(root=tmp_path, rate_hz=50)
    assert (source.mode, source.rate_hz, source.holdout()) == ("buffered", 50.0, None)
    chunks = collect(source, start_at=1000)
    samples, labels = joined(chunks)
    np.testing.assert_array_equal(samples, expected_values(raw, offsets={"accel_x": 12}))
    assert samples.dtype == np.float32 and labels.dtype == np.int16
    assert (labels == -1).all()
    assert chunks[0].gap_before and not any(c.gap_before for c in chunks[1:])
    assert chunks[-1].cursor == 1300
    buffer_dir = dev / ("buffer" if layout == "legacy" else "buffer0")
    scan = dev / ("scan_elements" if layout == "legacy" else "buffer0")
    assert (buffer_dir / "enable").read_text() == "0"  # disabled again at the end
    assert (buffer_dir / "length").read_text() == "200"  # 4 s at 50 Hz
    assert {p.name: p.read_text().strip() for p in scan.glob("*_en")} == {
        **{f"in_{c}_en": "1" for c in SIX}, "in_timestamp_en": "1", "in_temp_en": "0"}


@pytest.mark.parametrize("types", [
    "be:s16/16>>0", "le:u16/16>>0", "le:s12/16>>4", "be:u12/16>>4",
    {"accel_x": "le:s16/16>>0", "accel_y": "be:s16/16>>0", "accel_z": "le:s32/32>>0",
     "anglvel_x": "le:s8/8>>0", "anglvel_y": "be:s24/32>>8", "anglvel_z": "le:u16/16>>0"},
])
def test_buffered_decodes_every_storage_form(tmp_path: Path, types: str | dict[str, str]) -> None:
    dev = make_device(tmp_path, types=types)
    limits = []
    for channel in SIX:
        _, kind, bits, _, _ = parse_type(types if isinstance(types, str) else types[channel])
        limits.append((-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if kind == "s"
                      else (0, (1 << bits) - 1))
    rng = np.random.default_rng(7)
    raw = np.stack([rng.integers(lo, hi + 1, 200) for lo, hi in limits], axis=1)
    (tmp_path / "dev/iio:device0").write_bytes(records_for(dev, raw))
    samples, _ = joined(collect(IioSource(root=tmp_path, rate_hz=50)))
    np.testing.assert_array_equal(samples, expected_values(raw))


def test_timestamps_mark_lost_samples_as_gaps(tmp_path: Path) -> None:
    dev = make_device(tmp_path)
    raw = random_raw(200, seed=3)
    stamps = [i * 20_000_000 for i in range(200)]
    for i in range(120, 200):
        stamps[i] += 100_000_000  # five samples lost before sample 120: an overrun
    stamps[60] += 5_000_000  # a quarter period of jitter is no gap
    (tmp_path / "dev/iio:device0").write_bytes(records_for(dev, raw, stamps))
    source = IioSource(root=tmp_path, rate_hz=50)
    chunks = collect(source)
    starts = np.cumsum([0] + [len(c.samples) for c in chunks])[:-1]
    assert [int(s) for s, c in zip(starts, chunks, strict=True) if c.gap_before] == [0, 120]
    assert source.gaps_detected == 1
    np.testing.assert_array_equal(joined(chunks)[0], expected_values(raw))


def test_buffered_through_a_fifo_with_partial_records(tmp_path: Path) -> None:
    dev = make_device(tmp_path, char=None, types="be:s12/16>>4")
    fifo = tmp_path / "dev/iio:device0"
    os.mkfifo(fifo)
    raw = random_raw(150, seed=5, low=-2048, high=2047)
    data = records_for(dev, raw)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a writer exists before the source reads
    source = IioSource(root=tmp_path, rate_hz=50)

    async def run() -> list[Chunk]:
        async def feed() -> None:
            try:
                for lo in range(0, len(data), 1000):  # 1000 is not a multiple of 24 bytes
                    os.write(writer, data[lo : lo + 1000])
                    await asyncio.sleep(0.02)
            finally:
                os.close(writer)  # the last writer gone: the reader sees the end of the stream

        task = asyncio.create_task(feed())
        out = [chunk async for chunk in source.chunks()]
        await task
        return out

    chunks = asyncio.run(asyncio.wait_for(run(), 5.0))
    np.testing.assert_array_equal(joined(chunks)[0], expected_values(raw))
    assert (dev / "buffer/enable").read_text() == "0"


def test_a_cancelled_reader_disables_the_buffer(tmp_path: Path) -> None:
    dev = make_device(tmp_path, char=None)
    fifo = tmp_path / "dev/iio:device0"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(writer, records_for(dev, random_raw(10)))
        source = IioSource(root=tmp_path, rate_hz=50)

        async def run() -> None:
            task = asyncio.create_task(collect_async(source))
            await asyncio.sleep(0.3)
            assert (dev / "buffer/enable").read_text() == "1"
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        asyncio.run(asyncio.wait_for(run(), 5.0))
    finally:
        os.close(writer)
    assert (dev / "buffer/enable").read_text() == "0"


async def collect_async(source: SensorSource) -> list[Chunk]:
    return [chunk async for chunk in source.chunks()]


def test_channels_by_name_order_and_sign(tmp_path: Path) -> None:
    dev = make_device(tmp_path)
    raw = random_raw(50, seed=9)
    (tmp_path / "dev/iio:device0").write_bytes(records_for(dev, raw))
    order = ["anglvel_z", "-accel_y", "in_accel_x", "accel_z", "anglvel_x", "anglvel_y"]
    samples, _ = joined(collect(IioSource(root=tmp_path, channels=order, rate_hz=50)))
    full = expected_values(raw)
    np.testing.assert_array_equal(samples, np.stack(
        [full[:, 5], -full[:, 1], full[:, 0], full[:, 2], full[:, 3], full[:, 4]], axis=1))


def test_a_left_enabled_buffer_is_restarted_and_a_trigger_set(tmp_path: Path) -> None:
    dev = make_device(tmp_path, frequency=None, available=None)
    (dev / "trigger").mkdir()
    (dev / "trigger/current_trigger").write_text("\n")
    trigger = tmp_path / "sys/bus/iio/devices/trigger0"
    trigger.mkdir()
    (trigger / "name").write_text("hrtimer0\n")
    (trigger / "sampling_frequency").write_text("100\n")
    (dev / "buffer/enable").write_text("1\n")
    raw = random_raw(20)
    (tmp_path / "dev/iio:device0").write_bytes(records_for(dev, raw))
    source = IioSource(root=tmp_path, rate_hz=50, trigger="hrtimer0")
    assert source.rate_hz == 50.0 and (trigger / "sampling_frequency").read_text() == "50"
    np.testing.assert_array_equal(joined(collect(source))[0], expected_values(raw))
    assert (dev / "trigger/current_trigger").read_text() == "hrtimer0"
    with pytest.raises(IioDeviceNotFound, match="no IIO trigger named 'nope'"):
        IioSource(root=tmp_path, rate_hz=50, trigger="nope")


def test_without_timestamps_the_record_is_only_the_channels(tmp_path: Path) -> None:
    dev = make_device(tmp_path, timestamp=False)
    raw = random_raw(40)
    (tmp_path / "dev/iio:device0").write_bytes(
        pack_records(elements_of(dev, timestamp=False),
                     [dict(zip(SIX, map(int, r), strict=True)) for r in raw]))
    assert len((tmp_path / "dev/iio:device0").read_bytes()) == 40 * 12
    np.testing.assert_array_equal(joined(collect(IioSource(root=tmp_path)))[0],
                                  expected_values(raw))


# ------------------------------------------------------------------ modes and polling


def test_auto_polls_without_a_buffer_and_buffered_mode_then_refuses(tmp_path: Path) -> None:
    make_device(tmp_path, buffer=None)
    assert IioSource(root=tmp_path).mode == "polled"
    with pytest.raises(IioBufferUnavailable, match="has no buffer"):
        IioSource(root=tmp_path, mode="buffered")


@pytest.mark.parametrize(("refused", "why", "hint"), [
    ("enable", "Invalid argument", "need a trigger"),  # a driver without a default trigger
    ("length", "Read-only file system", "length"),  # systemd's ProtectKernelTunables=yes
])
def test_auto_falls_back_to_polling_when_the_buffer_cannot_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: str, why: str,
        hint: str) -> None:
    dev = make_device(tmp_path, raw=dict(zip(SIX, range(100, 106), strict=True)))
    real_write = iio._write

    def refuse(path: Path, value: str) -> None:
        if path.name == refused and value != "0":
            raise IioError(f"cannot write {value!r} to {path}: {why}", path)
        real_write(path, value)

    monkeypatch.setattr(iio, "_write", refuse)
    source = IioSource(root=tmp_path, rate_hz=100)
    assert source.mode == "buffered"
    samples, _ = joined(collect(source, samples=5))
    assert source.mode == "polled"
    np.testing.assert_array_equal(samples[:5], expected_values(np.tile(np.arange(100, 106),
                                                                       (5, 1))))
    assert (dev / "buffer/enable").read_text().strip() == "0"
    with pytest.raises(IioBufferUnavailable, match=hint):
        collect(IioSource(root=tmp_path, rate_hz=100, mode="buffered"))


def test_polled_reads_the_raw_files_at_the_rate(tmp_path: Path) -> None:
    raw = dict(zip(SIX, [100, -200, 16384, 7, -7, 0], strict=True))
    dev = make_device(tmp_path, buffer=None, raw=raw, offsets={"anglvel_x": -7})
    source = IioSource(root=tmp_path, rate_hz=100, mode="polled")
    assert (source.mode, source.rate_hz) == ("polled", 100.0)
    assert (dev / "sampling_frequency").read_text() == "100"  # the device refreshes as fast

    async def run() -> list[Chunk]:
        out: list[Chunk] = []
        async with contextlib.aclosing(source.chunks(5)) as chunks:
            async for chunk in chunks:
                out.append(chunk)
                if sum(len(c.samples) for c in out) >= 20:  # the sensor moved; no truncation,
                    with (dev / "in_accel_x_raw").open("r+b") as raw_file:  # so no empty read
                        os.pwrite(raw_file.fileno(), b"-100\n", 0)
                if sum(len(c.samples) for c in out) >= 60:
                    return out
        return out

    started = time.monotonic()
    chunks = asyncio.run(asyncio.wait_for(run(), 5.0))
    elapsed = time.monotonic() - started
    samples, labels = joined(chunks)
    first = expected_values(np.array([list(raw.values())]), offsets={"anglvel_x": -7})[0]
    np.testing.assert_array_equal(samples[0], first)
    assert samples[-1, 0] == np.float32(-100 * float(f"{SCALES['accel']:.9f}") / G)
    np.testing.assert_array_equal(samples[:, 1:], np.tile(first[1:], (len(samples), 1)))
    assert (labels == -1).all() and chunks[0].gap_before
    assert chunks[-1].cursor == 5 + len(samples)
    assert 0.3 < elapsed < 3.0  # ~100 Hz; a bound on a hang, not a timing benchmark


def test_a_late_poll_is_a_gap(tmp_path: Path) -> None:
    make_device(tmp_path, buffer=None)
    source = IioSource(root=tmp_path, rate_hz=100, mode="polled")
    real_read = source.read_raw
    calls = 0

    def stalls_once(fds: Sequence[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 10:
            time.sleep(0.15)  # 15 periods late: samples were missed
        return real_read(fds)

    source.read_raw = stalls_once  # type: ignore[method-assign]
    chunks = collect(source, samples=40)
    starts = np.cumsum([0] + [len(c.samples) for c in chunks])[:-1]
    gaps = [int(s) for s, c in zip(starts, chunks, strict=True) if c.gap_before]
    # the 10th read returns 150 ms late, so the 11th sample is the first after the gap
    assert gaps[0] == 0 and 10 in gaps and source.gaps_detected >= 1


def test_a_polled_read_error_ends_the_stream_with_an_iio_error(tmp_path: Path) -> None:
    dev = make_device(tmp_path, buffer=None)
    source = IioSource(root=tmp_path, rate_hz=100, mode="polled")
    (dev / "in_accel_y_raw").write_text("garbage\n")
    with pytest.raises(IioError, match="in_accel_y_raw of iio:device0 holds"):
        collect(source)


# ------------------------------------------------------------------ frequency, errors


@pytest.mark.parametrize(("available", "want", "at_least", "chosen"), [
    ("12.5 26 52 104 208", 50, False, "52"),
    ("12.5 26 52 104 208", 60, False, "52"),
    ("12.5 26 52 104 208", 78, False, "104"),  # a tie goes up
    ("12.5 26 52 104 208", 50, True, "52"),
    ("12.5 26 52 104 208", 60, True, "104"),
    ("12.5 26 52 104 208", 500, True, "208"),
    ("12.5 26 52 104 208", 5, False, "12.5"),
    ("[1 1 1000]", 50.4, False, "50"),
    ("[1 1 1000]", 50.4, True, "51"),
    ("[0.5 0.5 8]", 50, False, "8"),
    ("100", 50, False, "100"),
])
def test_frequency_choice(available: str, want: float, at_least: bool, chosen: str) -> None:
    assert pick_frequency(available, want, at_least=at_least) == chosen


def test_the_device_frequency_is_set_and_reported(tmp_path: Path) -> None:
    dev = make_device(tmp_path, frequency="208", available="12.5 26 52 104 208")
    source = IioSource(root=tmp_path, rate_hz=50)
    assert source.rate_hz == 52.0 and (dev / "sampling_frequency").read_text() == "52"
    polled = IioSource(root=tmp_path, rate_hz=60, mode="polled")
    assert polled.rate_hz == 60.0 and (dev / "sampling_frequency").read_text() == "104"


def test_per_type_frequencies_and_none_at_all(tmp_path: Path) -> None:
    dev = make_device(tmp_path, frequency=None, available=None)
    for kind in ("accel", "anglvel"):
        (dev / f"in_{kind}_sampling_frequency").write_text("0\n")
        (dev / f"in_{kind}_sampling_frequency_available").write_text("[1 1 400]\n")
    assert IioSource(root=tmp_path, rate_hz=50).rate_hz == 50.0
    assert (dev / "in_accel_sampling_frequency").read_text() == "50"
    assert (dev / "in_anglvel_sampling_frequency").read_text() == "50"
    for kind in ("accel", "anglvel"):
        (dev / f"in_{kind}_sampling_frequency").unlink()
    assert IioSource(root=tmp_path, rate_hz=40).rate_hz == 40.0  # nothing to set: as asked


def test_device_by_number_or_name_and_a_clear_error_for_a_missing_one(tmp_path: Path) -> None:
    make_device(tmp_path, number=0, name="bmp280", channels=(), buffer=None, char=None)
    make_device(tmp_path, number=3, name="mpu6050")
    assert IioSource(root=tmp_path, device="mpu6050").path.name == "iio:device3"
    assert IioSource(root=tmp_path, device="iio:device3").name == "mpu6050"
    with pytest.raises(IioDeviceNotFound,
                       match=r"no IIO device 'iio:device7'.*iio:device0 \(bmp280\), "
                             r"iio:device3 \(mpu6050\)"):
        IioSource(root=tmp_path, device="iio:device7")
    with pytest.raises(IioDeviceNotFound, match="no IIO device 'lsm6dsl'"):
        IioSource(root=tmp_path, device="lsm6dsl")
    with pytest.raises(IioDeviceNotFound, match="found: none"):
        IioSource(root=tmp_path / "elsewhere")


def test_a_missing_channel_names_the_ones_there_are(tmp_path: Path) -> None:
    make_device(tmp_path, channels=SIX[:3])
    with pytest.raises(IioChannelNotFound, match="no channel anglvel_x") as caught:
        IioSource(root=tmp_path)
    assert caught.value.available == ("accel_x", "accel_y", "accel_z", "temp")
    with pytest.raises(ValueError, match="configured twice"):
        IioSource(root=tmp_path, channels=["accel_x", "-accel_x"])
    with pytest.raises(ValueError, match="not an IIO channel name"):
        IioSource(root=tmp_path, channels=["accel x"])


def test_an_unparseable_type_string_is_an_error(tmp_path: Path) -> None:
    make_device(tmp_path, types={"accel_y": "le:s16/12>>0"})
    with pytest.raises(IioTypeError, match=r"in_accel_y_type"):
        IioSource(root=tmp_path)


def test_buffered_without_polled_files_needs_no_raw_files(tmp_path: Path) -> None:
    dev = make_device(tmp_path)
    for path in dev.glob("in_*_raw"):
        path.unlink()
    raw = random_raw(30)
    (tmp_path / "dev/iio:device0").write_bytes(records_for(dev, raw))
    np.testing.assert_array_equal(joined(collect(IioSource(root=tmp_path)))[0],
                                  expected_values(raw))
    with pytest.raises(IioChannelNotFound, match="cannot be polled"):
        IioSource(root=tmp_path, mode="polled")


# ------------------------------------------------------------------ every source, one windowing


def test_iio_and_command_sources_give_the_same_windows(tmp_path: Path) -> None:
    dev = make_device(tmp_path, types="be:s16/16>>0", offsets={"accel_z": -3})
    raw = random_raw(1000, seed=11, low=-4000, high=4000)
    (tmp_path / "dev/iio:device0").write_bytes(records_for(dev, raw))
    values = expected_values(raw, offsets={"accel_z": -3}).astype(np.float64)
    lines = tmp_path / "samples.csv"
    lines.write_text("".join(",".join(repr(float(v)) for v in row) + "\n" for row in values))
    iio_source = IioSource(root=tmp_path, rate_hz=50)
    command = CommandSource(command=[sys.executable, "-c",
                                     "import sys; sys.stdout.write(open(sys.argv[1]).read())",
                                     str(lines)], rate_hz=50)

    def windows(source: SensorSource) -> tuple[np.ndarray, np.ndarray]:
        windower = Windower(128, 64)
        pieces = [windower.push(c.samples, c.labels, c.gap_before) for c in collect(source)]
        return (np.concatenate([w for w, _ in pieces]), np.concatenate([lab for _, lab in pieces]))

    iio_windows, iio_labels = windows(iio_source)
    command_windows, command_labels = windows(command)
    assert iio_windows.shape == (14, 128, 6)
    np.testing.assert_array_equal(iio_windows, command_windows)
    np.testing.assert_array_equal(iio_labels, command_labels)
    np.testing.assert_array_equal(window_features(iio_windows, iio_source.rate_hz),
                                  window_features(command_windows, command.rate_hz))
