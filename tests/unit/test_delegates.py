"""The delegate chain against the real LiteRT loader (no accelerator here)."""

from __future__ import annotations

import ctypes.util

import pytest

from fedd.agent.delegates import CPU, choose_delegate, parse_spec


def test_parse_spec_splits_library_and_options() -> None:
    assert parse_spec("libedgetpu.so.1") == ("libedgetpu.so.1", {})
    assert parse_spec("libarmnnDelegate.so?backends=GpuAcc,CpuAcc&logging-severity=info") == (
        "libarmnnDelegate.so", {"backends": "GpuAcc,CpuAcc", "logging-severity": "info"})


@pytest.mark.parametrize("spec", ["", "?backends=x", "lib.so?novalue"])
def test_parse_spec_rejects_nonsense(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_spec(spec)


def test_an_empty_chain_runs_on_the_cpu() -> None:
    choice = choose_delegate([])
    assert (choice.name, choice.delegate, choice.failures) == (CPU, None, ())


def test_missing_and_non_delegate_libraries_fall_back_with_reasons(
        capfd: pytest.CaptureFixture[str]) -> None:
    libc = ctypes.util.find_library("c")
    assert libc, "libc must be findable on Linux"
    choice = choose_delegate(["libedgetpu.so.1", libc, "/nonexistent/libnpu.so"])
    assert choice.name == CPU and choice.delegate is None
    assert len(choice.failures) == 3
    assert "libedgetpu.so.1" in choice.failures[0]
    assert "tflite_plugin_create_delegate" in choice.failures[1]  # a library, not a delegate
    assert "Delegate.__del__" not in capfd.readouterr().err
