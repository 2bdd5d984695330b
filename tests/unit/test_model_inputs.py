"""Each shipped model's feature set turns windows into exactly its input shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedd.agent.features import model_inputs
from fedd.model import ModelSpec

MANIFEST = Path(__file__).resolve().parents[2] / "models" / "manifest.json"


@pytest.mark.parametrize("name", ["har-mlp", "har-cnn"])
def test_inputs_match_the_model(name: str) -> None:
    spec = ModelSpec.from_manifest(MANIFEST, name)
    windows = np.random.default_rng(0).normal(size=(5, 128, 6)).astype(np.float32)
    inputs = model_inputs(spec.features)(windows, 50.0)
    assert inputs.shape == (5, *spec.input_shape) and inputs.dtype == np.float32


def test_unknown_feature_set_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown feature set 'fft-v9'"):
        model_inputs("fft-v9")
