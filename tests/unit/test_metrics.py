"""The node_exporter textfile (fedd/agent/metrics.py), parsed back with prometheus-client."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fedd.agent.metrics import write_textfile
from fedd.wire import Drift, Heartbeat


def test_the_textfile_holds_the_heartbeats_numbers(tmp_path: Path) -> None:
    beat = Heartbeat(device="dev-7", time=1_700_000_000.0, uptime_s=5.0, activity="sampling",
                     decision="up to date", model_version=3, windows=40, outbox=2,
                     updates_sent=9, uplink_bytes=1234, last_update_seq=8, delegate="xnnpack",
                     rss_bytes=70_000_000, goodput_bps=None, connected=True, acked=7,
                     drift=Drift(prediction_kl=0.25, feature_shift=1.5, windows=64))
    path = tmp_path / "fedd.prom"
    write_textfile(str(path), beat)
    samples = {s.name: s for family in text_string_to_metric_families(path.read_text())
               for s in family.samples}
    assert samples["fedd_outbox"].value == 2
    assert samples["fedd_outbox"].labels == {"device": "dev-7"}
    assert samples["fedd_model_version"].value == 3
    assert samples["fedd_connected"].value == 1
    assert samples["fedd_drift_prediction_kl"].value == 0.25
    assert samples["fedd_heartbeat_time_seconds"].value == beat.time
    assert "fedd_goodput_bps" not in samples  # null: left out, not faked as 0
    assert "fedd_evaluation_global_accuracy" not in samples
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically
