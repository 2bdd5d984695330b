"""End to end: the real fleet runner, a broker, a hub and three HAPT agents."""

from __future__ import annotations

import json

import pytest

from fedd.fleet.runner import FleetOptions, run_fleet

pytestmark = pytest.mark.e2e

CHANCE = 1 / 6  # six HAPT activities
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_a_small_fleet_learns_har_on_real_data(tmp_path, capsys):
    out = tmp_path / "fleet"
    # run_fleet starts `sys.executable -m fedd.cli` children: the venv's python.
    code = run_fleet(FleetOptions(devices=3, versions=15, buffer_size=2, speed=100,
                                  timeout_s=120, out=out))
    printed = capsys.readouterr().out
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}"
                     for p in sorted((out / "logs").glob("*.log")))
    assert code == 0, f"{printed}\n{logs}"

    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert summary["ended"] == "reached version 15"
    assert summary["versions"] >= 15
    assert summary["agent_exit_codes"] == [0, 0, 0]
    assert summary["hub_exit_code"] == 0
    assert summary["final_personal_accuracy"] > 0.5
    assert summary["final_global_accuracy"] > 0.5
    assert summary["final_worst_personal_accuracy"] > CHANCE
    assert summary["updates_sent"] >= 15  # at least one update per version
    assert summary["uplink_bytes"] > 0

    rows = report["versions"]
    assert [r["version"] for r in rows] == sorted(r["version"] for r in rows)
    assert rows[0]["version"] == 0 and rows[-1]["version"] >= 15
    assert all(r["contributors"] >= 1 for r in rows[1:])

    png = out / "accuracy.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert "summary" in printed and "reached version 15" in printed
    for log in (out / "logs").glob("*.log"):
        assert "Traceback" not in log.read_text(), log.name


def test_a_small_fleet_learns_har_through_a_compressed_uplink(tmp_path, capsys):
    """`fedd fleet --codec topk:0.01+q:4+zstd`: top-k 1 %, 4-bit values, error feedback."""
    out = tmp_path / "fleet"
    code = run_fleet(FleetOptions(devices=3, versions=15, buffer_size=2, speed=100,
                                  timeout_s=120, out=out, codec="topk:0.01+q:4+zstd"))
    printed = capsys.readouterr().out
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}"
                     for p in sorted((out / "logs").glob("*.log")))
    assert code == 0, f"{printed}\n{logs}"
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["ended"] == "reached version 15"
    assert summary["codec"] == "topk:0.01+q:4:256+zstd:3"
    assert summary["final_personal_accuracy"] > 0.5
    assert summary["final_global_accuracy"] > 0.5
    # har-mlp's float32 update is ~34 KB; this one, MQTT framing included, well under 1 KB.
    assert 0 < summary["uplink_bytes_per_update"] < 1000
    assert "topk:0.01+q:4:256+zstd:3" in printed
    for log in (out / "logs").glob("*.log"):
        assert "Traceback" not in log.read_text(), log.name
