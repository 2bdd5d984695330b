"""The uplink budget: hourly window, allowance and level choice (pure, no daemon)."""

import numpy as np
import pytest

from fedd.agent.budget import HourlyWindow, allowance, choose_level, levels
from fedd.config import ConfigError, load_agent_config
from fedd.pipeline import Pipeline


def test_window_counts_the_last_hour_only():
    window = HourlyWindow()
    window.add(1000.0, 300)
    window.add(2000.0, 200)
    assert window.used(2000.0) == 500
    assert window.used(4599.0) == 500
    assert window.used(4600.0) == 200  # the first record is an hour old
    assert window.used(5600.0) == 0


def test_window_survives_a_restart_through_its_state():
    window = HourlyWindow()
    window.add(10.0, 123)
    again = HourlyWindow.from_state(window.to_state())
    assert again.used(20.0) == 123
    assert HourlyWindow.from_state(None).used(0.0) == 0
    assert HourlyWindow.from_state([["x", 1], [1]]).used(0.0) == 0


def test_allowance_is_the_tighter_limit_never_negative():
    assert allowance(max_update_bytes=None, bytes_per_hour=None, used=9, queued=9) is None
    assert allowance(max_update_bytes=500, bytes_per_hour=None, used=9, queued=9) == 500
    assert allowance(max_update_bytes=None, bytes_per_hour=2000, used=1500, queued=100) == 400
    assert allowance(max_update_bytes=300, bytes_per_hour=2000, used=1500, queued=100) == 300
    assert allowance(max_update_bytes=None, bytes_per_hour=2000, used=1912, queued=200) == 0


def test_levels_halve_k_and_keep_the_value_coding():
    specs = [p.spec for p in levels(Pipeline.from_spec("topk:0.5+q:4+zstd"), 16)]
    assert specs == ["topk:0.5+q:4:256+zstd:3", "topk:4+q:4:256+zstd:3",
                     "topk:2+q:4:256+zstd:3", "topk:1+q:4:256+zstd:3"]


def test_levels_put_a_topk_in_front_of_a_dense_codec():
    specs = [p.spec for p in levels(Pipeline.from_spec("f16"), 8)]
    assert specs == ["f16", "topk:4+f16", "topk:2+f16", "topk:1+f16"]


FLOAT32 = Pipeline.from_spec("float32")


def test_choose_level_takes_the_first_that_fits():
    delta = np.linspace(-1, 1, 1000).astype(np.float32)

    def size(pipeline):
        return len(pipeline.encode(delta, None).payload)

    unlimited = choose_level(FLOAT32, delta.size, size, None)
    assert unlimited is not None and unlimited[0].spec == "float32"
    chosen = choose_level(FLOAT32, delta.size, size, 200)
    assert chosen is not None
    pipeline, nbytes = chosen
    assert nbytes <= 200 and pipeline.sparse
    assert choose_level(FLOAT32, delta.size, size, 5) is None  # even k = 1 does not fit


def test_a_spent_budget_costs_two_encodes_not_one_per_level():
    delta = np.linspace(-1, 1, 1000).astype(np.float32)
    tried = []

    def size(pipeline):
        tried.append(pipeline.spec)
        return len(pipeline.encode(delta, None).payload)

    assert choose_level(FLOAT32, delta.size, size, 5) is None
    assert tried == ["float32", "topk:1+float32"]


def test_config_takes_null_or_at_least_64_bytes(tmp_path):
    path = tmp_path / "fedd.yaml"
    path.write_text("device_id: d1\nuplink:\n  bytes_per_hour: 2000\n  max_update_bytes: null\n")
    uplink = load_agent_config(path).uplink
    assert (uplink.bytes_per_hour, uplink.max_update_bytes) == (2000, None)
    path.write_text("device_id: d1\nuplink:\n  max_update_bytes: 63\n")
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    assert info.value.key == "uplink.max_update_bytes", str(info.value)
