"""The shipped models (har-mlp, har-cnn) under the real LiteRT runtime (no TensorFlow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedd.model import ModelError, ModelSpec, TrainableModel

MANIFEST = Path(__file__).resolve().parents[2] / "models" / "manifest.json"
NAME = "har-mlp"
# The architectures scripts/build-model documents: dense layers (inputs, outputs) and
# valid 1-D convolutions (taps, stride, inputs, outputs), body then head.
MLP_BODY = [(96, 64), (64, 32)]
CNN_CONVS = [(5, 2, 6, 16), (5, 2, 16, 32), (5, 2, 32, 64)]
ARCH = {
    "har-mlp": {
        "input_shape": (96,),
        "features": "hapt-stats-v1",
        "parts": {"body": sum(i * o + o for i, o in MLP_BODY), "head": 32 * 6 + 6},
        "lr": 0.05,
        "device_lr": 0.2,
    },
    "har-cnn": {
        "input_shape": (128, 6),
        "features": "raw-128x6-v1",
        "parts": {"body": sum(k * i * o + o for k, _, i, o in CNN_CONVS), "head": 64 * 6 + 6},
        "lr": 0.2,
        "device_lr": 0.1,
    },
}
MODELS = sorted(ARCH)


@pytest.fixture(scope="module", params=MODELS)
def spec(request: pytest.FixtureRequest) -> ModelSpec:
    return ModelSpec.from_manifest(MANIFEST, request.param)


@pytest.fixture
def model(spec: ModelSpec) -> TrainableModel:
    return TrainableModel(spec)


def blobs(spec: ModelSpec, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A learnable synthetic task in the model's input form (classes fixed, samples by seed).

    Feature vectors: six Gaussian blobs. Raw windows (steps, channels): class c is a sine
    of 2 + 3c cycles per window, random phase and amplitude, on channel c, in noise on
    every channel, so only the waveform over time tells the classes apart.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, spec.num_classes, n).astype(np.int32)
    if len(spec.input_shape) == 1:
        centers = np.random.default_rng(7).normal(0.0, 1.0, (spec.num_classes, *spec.input_shape))
        x = centers[y] + 0.7 * rng.normal(0.0, 1.0, (n, *spec.input_shape))
        return x.astype(np.float32), y
    steps, channels = spec.input_shape
    t = np.arange(steps) / steps
    cycles = 2 + 3 * y
    phase = rng.uniform(0, 2 * np.pi, n)
    amplitude = rng.uniform(0.7, 1.3, n)
    x = 0.5 * rng.normal(0.0, 1.0, (n, steps, channels))
    wave = amplitude[:, None] * np.sin(2 * np.pi * cycles[:, None] * t + phase[:, None])
    x[np.arange(n), :, y % channels] += wave
    return x.astype(np.float32), y


def reference_logits(name: str, parts: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Numpy forward pass from the flat parts, in the layout scripts/build-model documents
    (per layer kernel row-major then bias; a conv kernel is (taps, inputs, outputs))."""
    flat = np.concatenate([parts["body"], parts["head"]]).astype(np.float64)
    offset = 0

    def take(*shape: int) -> np.ndarray:
        nonlocal offset
        size = int(np.prod(shape))
        values = flat[offset : offset + size].reshape(shape)
        offset += size
        return values

    h = x.astype(np.float64)
    if name == "har-mlp":
        for fan_in, fan_out in MLP_BODY:
            h = np.maximum(h @ take(fan_in, fan_out) + take(fan_out), 0.0)
    else:
        for taps, stride, fan_in, fan_out in CNN_CONVS:
            kernel, bias = take(taps, fan_in, fan_out), take(fan_out)
            out = (h.shape[1] - taps) // stride + 1
            patches = np.stack([h[:, j : j + stride * (out - 1) + 1 : stride] for j in range(taps)],
                               axis=2)  # (rows, out, taps, inputs)
            h = np.maximum(np.einsum("rotc,tcf->rof", patches, kernel) + bias, 0.0)
        h = h.mean(axis=1)
    h = h @ take(h.shape[1], 6) + take(6)
    assert offset == flat.size
    return h


def test_spec_matches_manifest(spec: ModelSpec, model: TrainableModel) -> None:
    arch = ARCH[spec.name]
    assert spec.input_shape == arch["input_shape"]
    assert spec.features == arch["features"]
    assert spec.num_classes == 6
    assert spec.train_batch == 32
    assert spec.path.is_file()
    assert model.parts == arch["parts"]
    assert spec.learning_rate == arch["device_lr"]  # the devices' default, measured per model


def test_manifest_lists_every_shipped_model() -> None:
    manifest = json.loads(MANIFEST.read_text())
    assert sorted(manifest["models"]) == MODELS
    for entry in manifest["models"].values():
        assert (MANIFEST.parent / entry["file"]).stat().st_size == entry["size_bytes"]


def test_forward_matches_documented_layout(spec: ModelSpec, model: TrainableModel) -> None:
    rng = np.random.default_rng(3)
    parts = {k: rng.normal(0.0, 0.3, v).astype(np.float32) for k, v in model.parts.items()}
    model.set_parts(parts)
    x, _ = blobs(spec, 5)
    np.testing.assert_allclose(model.predict(x), reference_logits(spec.name, parts, x),
                               rtol=1e-4, atol=1e-4)


def test_training_lowers_loss_and_learns(spec: ModelSpec, model: TrainableModel) -> None:
    x, y = blobs(spec, 960)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(100):
        idx = rng.choice(len(x), spec.train_batch, replace=False)
        losses.append(model.train_step(x[idx], y[idx], ARCH[spec.name]["lr"]))
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert last < 0.25 * first, (first, last)
    x_test, y_test = blobs(spec, 600, seed=2)  # fresh samples from the same classes
    accuracy = np.mean(model.predict(x_test).argmax(axis=1) == y_test)
    assert accuracy > 0.8, accuracy  # chance is 1/6


def test_train_head_step_freezes_body(spec: ModelSpec, model: TrainableModel) -> None:
    x, y = blobs(spec, spec.train_batch)
    body, head = model.get_part("body"), model.get_part("head")
    losses = [model.train_head_step(x, y, 0.1) for _ in range(5)]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0], losses
    np.testing.assert_array_equal(model.get_part("body"), body)
    assert not np.array_equal(model.get_part("head"), head)


def test_train_step_needs_exact_batch(spec: ModelSpec, model: TrainableModel) -> None:
    x, y = blobs(spec, spec.train_batch + 1)
    with pytest.raises(ValueError, match="train batch"):
        model.train_step(x, y, 0.1)
    with pytest.raises(ValueError):
        model.train_head_step(x[:-1], y, 0.1)
    with pytest.raises(ValueError, match="labels"):
        model.train_step(x[:-1], np.full(spec.train_batch, spec.num_classes), 0.1)
    if len(spec.input_shape) > 1:  # raw windows: the right number of values, wrong shape
        with pytest.raises(ValueError, match="train batch"):
            model.train_step(x[:-1].transpose(0, 2, 1), y[:-1], 0.1)


def test_part_round_trip(spec: ModelSpec, model: TrainableModel) -> None:
    parts = model.get_parts()
    assert {k: v.size for k, v in parts.items()} == model.parts
    assert all(v.dtype == np.float32 for v in parts.values())
    rng = np.random.default_rng(1)
    new = {k: rng.normal(0, 0.1, v.size).astype(np.float32) for k, v in parts.items()}
    model.set_parts(new)
    for name, values in new.items():
        np.testing.assert_array_equal(model.get_part(name), values)
    model.set_part("head", parts["head"])
    np.testing.assert_array_equal(model.get_part("head"), parts["head"])
    np.testing.assert_array_equal(model.get_part("body"), new["body"])
    # get_part hands out a copy: changing it does not touch the model.
    copy = model.get_part("body")
    copy[:] = 0.0
    np.testing.assert_array_equal(model.get_part("body"), new["body"])


def test_set_part_rejects_bad_values(model: TrainableModel) -> None:
    head = model.get_part("head")
    with pytest.raises(ValueError, match="needs"):
        model.set_part("head", head[:-1])
    bad = head.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        model.set_part("head", bad)
    with pytest.raises(ValueError):
        model.set_parts({"body": model.get_part("body") + 1.0, "head": bad})
    with pytest.raises(KeyError):
        model.get_part("tail")
    np.testing.assert_array_equal(model.get_part("head"), head)


@pytest.mark.parametrize("rows", [1, 32, 33, 0])
def test_predict_any_rows(spec: ModelSpec, model: TrainableModel, rows: int) -> None:
    x, _ = blobs(spec, 40)
    logits = model.predict(x[:rows])
    assert logits.shape == (rows, spec.num_classes)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()
    if rows:  # a row's logits do not depend on the rest of the batch
        np.testing.assert_allclose(logits[0], model.predict(x[:1])[0], rtol=1e-5, atol=1e-5)


def test_predict_rejects_wrong_shape(spec: ModelSpec, model: TrainableModel) -> None:
    x, _ = blobs(spec, 3)
    with pytest.raises(ValueError, match="x must have shape"):
        model.predict(x.reshape(3, -1)[:, :-1])


def test_tampered_file_is_refused(tmp_path: Path, spec: ModelSpec) -> None:
    shutil.copy(MANIFEST, tmp_path / MANIFEST.name)
    data = bytearray(spec.path.read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / spec.path.name).write_bytes(bytes(data))
    copied = ModelSpec.from_manifest(tmp_path / MANIFEST.name, spec.name)
    assert copied.path == tmp_path / spec.path.name
    with pytest.raises(ModelError, match="sha256"):
        TrainableModel(copied)


def test_manifest_errors_name_manifest_and_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no model 'cnn'"):
        ModelSpec.from_manifest(MANIFEST, "cnn")
    missing = tmp_path / "manifest.json"
    with pytest.raises(ModelError, match=r"manifest\.json"):
        ModelSpec.from_manifest(missing, NAME)
    manifest = json.loads(MANIFEST.read_text())
    del manifest["models"][NAME]["sha256"]
    missing.write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=NAME):
        ModelSpec.from_manifest(missing, NAME)
    manifest["models"][NAME]["sha256"] = "0" * 64
    for bad in (0, -0.1, "fast", float("nan")):
        manifest["models"][NAME]["learning_rate"] = bad
        missing.write_text(json.dumps(manifest))
        with pytest.raises(ModelError, match="learning_rate"):
            ModelSpec.from_manifest(missing, NAME)
    del manifest["models"][NAME]["learning_rate"]  # an older manifest: the former default
    missing.write_text(json.dumps(manifest))
    assert ModelSpec.from_manifest(missing, NAME).learning_rate == 0.2
    manifest["models"][NAME]["file"] = "absent.tflite"
    missing.write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"absent\.tflite"):
        TrainableModel(ModelSpec.from_manifest(missing, NAME))


def test_predict_in_bounded_chunks(spec: ModelSpec, model: TrainableModel) -> None:
    x, _ = blobs(spec, 45)
    small = TrainableModel(spec, max_infer_rows=7)  # same file, same initial weights
    np.testing.assert_allclose(small.predict(x), model.predict(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_infer_rows"):
        TrainableModel(spec, max_infer_rows=0)
