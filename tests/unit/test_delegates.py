"""The delegate chain against the real LiteRT loader: missing libraries, a library that
is no delegate, and a real delegate built from source (`noop_delegate`) that claims no
nodes, so inference on it runs LiteRT's CPU kernels and must match the CPU model."""

from __future__ import annotations

import ctypes.util
from pathlib import Path

import numpy as np
import pytest

from fedd.agent.delegates import CPU, choose_delegate
from fedd.config import parse_delegate_spec
from fedd.model import ModelError, ModelSpec, TrainableModel

MANIFEST = Path(__file__).resolve().parents[2] / "models" / "manifest.json"


def recorded(path: Path) -> list[str]:
    """What the no-op delegate wrote: its options, then `prepare` per subgraph it was applied to."""
    return path.read_text().splitlines() if path.exists() else []


def test_parse_spec_splits_library_and_options() -> None:
    assert parse_delegate_spec("libedgetpu.so.1") == ("libedgetpu.so.1", {})
    armnn = "libarmnnDelegate.so?backends=GpuAcc,CpuAcc&logging-severity=info"
    assert parse_delegate_spec(armnn) == (
        "libarmnnDelegate.so", {"backends": "GpuAcc,CpuAcc", "logging-severity": "info"})
    assert parse_delegate_spec("libnpu.so?cache=/var/lib/npu+cache&sep=a%26b%3Dc&empty=") == (
        "libnpu.so", {"cache": "/var/lib/npu+cache", "sep": "a&b=c", "empty": ""})


@pytest.mark.parametrize("spec", ["", "?backends=x", "lib.so?novalue", "lib.so?a=1&&b=2",
                                  "lib.so?=x"])
def test_parse_spec_rejects_nonsense(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_delegate_spec(spec)


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


# ------------------------------------------------ a delegate that loads


def test_a_working_delegate_after_a_missing_one_is_chosen_with_its_options(
        noop_delegate: Path, tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    choice = choose_delegate(
        ["libedgetpu.so.1", f"{noop_delegate}?record={record}&backends=GpuAcc,CpuAcc"])
    assert choice.name == str(noop_delegate) and choice.delegate is not None
    assert len(choice.failures) == 1 and choice.failures[0].startswith("libedgetpu.so.1: ")
    assert recorded(record) == [f"record={record}", "backends=GpuAcc,CpuAcc"]


def test_the_chain_stops_at_the_first_delegate_that_loads(noop_delegate: Path,
                                                          tmp_path: Path) -> None:
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    choice = choose_delegate([f"{noop_delegate}?record={first}",
                              f"{noop_delegate}?record={second}"])
    assert (choice.name, choice.failures) == (str(noop_delegate), ())
    assert recorded(first) == [f"record={first}"]
    assert not second.exists(), "the second delegate was created too"


def test_a_delegate_that_refuses_to_start_is_skipped_with_its_reason_on_one_line(
        noop_delegate: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A NULL from tflite_plugin_create_delegate is LiteRT's ValueError: the next one is tried."""
    choice = choose_delegate([f"{noop_delegate}?fail=no NPU found", "libedgetpu.so.1"])
    assert choice.name == CPU and len(choice.failures) == 2
    failure = choice.failures[0]
    assert failure.startswith(f"{noop_delegate}: ") and failure.endswith("no NPU found")
    assert "\n" not in failure, "a reason must stay on its log line"
    assert "Delegate.__del__" not in capfd.readouterr().err


# ------------------------------------------------ inference on the delegate


@pytest.fixture(scope="module", params=["har-mlp", "har-cnn"])
def spec(request: pytest.FixtureRequest) -> ModelSpec:
    return ModelSpec.from_manifest(MANIFEST, request.param)


def assert_same_inference(delegated: TrainableModel, cpu: TrainableModel,
                          x: np.ndarray) -> np.ndarray:
    """The delegated model predicts the CPU model's classes and (to float rounding) logits."""
    want, got = cpu.predict(x), delegated.predict(x)
    np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    return want


def test_inference_on_a_delegate_matches_the_cpu_and_follows_every_weight_change(
        spec: ModelSpec, noop_delegate: Path, tmp_path: Path) -> None:
    """The delegated interpreter has weights of its own: after training or new parts from
    the hub it must predict with the new weights, not the ones it was built with."""
    record = tmp_path / "record.txt"
    # dynamic=1: har-cnn's graph has dynamic-sized tensors (see the next test).
    choice = choose_delegate([f"{noop_delegate}?record={record}&dynamic=1"])
    assert choice.delegate is not None, choice.failures
    delegated, cpu = TrainableModel(spec, delegate=choice.delegate), TrainableModel(spec)
    assert "prepare" in recorded(record), "no interpreter applied the delegate"
    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 1.0, (50, *spec.input_shape)).astype(np.float32)
    before = assert_same_inference(delegated, cpu, x)

    for model in (delegated, cpu):
        steps = np.random.default_rng(4)
        for _ in range(3):
            xb = steps.normal(0.0, 1.0, (spec.train_batch, *spec.input_shape))
            yb = steps.integers(0, spec.num_classes, spec.train_batch)
            model.train_step(xb, yb, lr=0.2)
        model.train_head_step(xb, yb, lr=0.2)
    trained = assert_same_inference(delegated, cpu, x)
    assert not np.allclose(trained, before, rtol=1e-3), "training changed nothing to check"

    parts = {name: rng.normal(0.0, 0.2, size).astype(np.float32)
             for name, size in spec.parts.items()}
    for model in (delegated, cpu):
        model.set_parts(parts)
    from_hub = assert_same_inference(delegated, cpu, x)
    assert not np.allclose(from_hub, trained, rtol=1e-3)

    head = rng.normal(0.0, 0.2, spec.parts["head"]).astype(np.float32)
    for model in (delegated, cpu):
        model.set_part("head", head)
    assert not np.allclose(assert_same_inference(delegated, cpu, x), from_hub, rtol=1e-3)


def test_a_static_shape_delegate_takes_har_mlp_and_refuses_har_cnn(
        noop_delegate: Path) -> None:
    """Like most accelerator delegates, the plugin without dynamic=1 handles static shapes
    only; har-cnn's infer graph has dynamic-sized tensors (slices sized at run time), so
    LiteRT will not apply it and the model says why, for the agent to fall back on the CPU."""
    choice = choose_delegate([str(noop_delegate)])
    TrainableModel(ModelSpec.from_manifest(MANIFEST, "har-mlp"), delegate=choice.delegate)
    with pytest.raises(ModelError, match=r"'har-cnn': the delegate refused it: \S"):
        TrainableModel(ModelSpec.from_manifest(MANIFEST, "har-cnn"), delegate=choice.delegate)


def test_a_delegate_that_refuses_the_model_hands_over_to_the_next_in_the_chain(
        noop_delegate: Path, tmp_path: Path) -> None:
    """A static-shape accelerator that cannot run har-cnn is not the end of the chain:
    the next delegate that takes the model is used, and the refusal is kept as a reason."""
    spec = ModelSpec.from_manifest(MANIFEST, "har-cnn")
    record = tmp_path / "dynamic.txt"
    choice = choose_delegate(
        [str(noop_delegate), f"{noop_delegate}?dynamic=1&record={record}"],
        accept=lambda delegate: TrainableModel(spec, delegate=delegate))
    assert isinstance(choice.accepted, TrainableModel)
    assert "prepare" in recorded(record)
    assert len(choice.failures) == 1
    assert "the delegate refused it" in choice.failures[0]
    assert choice.name == str(noop_delegate)

    alone = choose_delegate([str(noop_delegate)],
                            accept=lambda delegate: TrainableModel(spec, delegate=delegate))
    assert (alone.name, alone.delegate, alone.accepted) == (CPU, None, None)
    assert "the delegate refused it" in alone.failures[0]
