"""Personalization strategies on the real LiteRT model: what leaves the device, what stays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedd.agent.learner import (
    BODY,
    HEAD,
    STRATEGIES,
    Ditto,
    Diverged,
    Learner,
    make_strategy,
)
from fedd.config import TrainingConfig
from fedd.fleet.simulate import DeviceData, load_fleet
from fedd.hub.aggregate import apply_delta
from fedd.model import ModelSpec, TrainableModel
from fedd.wire import GlobalModel

MANIFEST = Path(__file__).resolve().parents[2] / "models" / "manifest.json"
TRAINING = TrainingConfig(epochs=2, learning_rate=0.1, head_epochs=2)

SENDS = {"fedavg": {BODY, HEAD}, "local": set(), "fedper": {BODY},
         "finetune": {BODY, HEAD}, "fedrep": {BODY}, "ditto": {BODY, HEAD}}
KEEPS = {"fedavg": set(), "local": {BODY, HEAD}, "fedper": {HEAD},
         "finetune": {HEAD}, "fedrep": {HEAD}, "ditto": {BODY, HEAD}}


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.from_manifest(MANIFEST, "har-mlp")


@pytest.fixture(scope="module")
def data() -> DeviceData:
    return load_fleet([7])[0]


def version(spec: ModelSpec, number: int, parts: dict[str, np.ndarray]) -> GlobalModel:
    return GlobalModel(version=number, parent=number - 1 if number else None, model=spec.name,
                       model_sha256=spec.sha256, created=0.0, contributors=1,
                       mean_staleness=0.0, parts=parts)


@pytest.fixture(scope="module")
def initial(spec: ModelSpec) -> GlobalModel:
    return version(spec, 0, TrainableModel(spec).get_parts())


def ready(spec: ModelSpec, strategy: str | Ditto, initial: GlobalModel, data: DeviceData,
          seed: int = 0) -> Learner:
    learner = Learner(TrainableModel(spec), TRAINING, strategy=strategy, seed=seed)
    learner.apply_global(initial)
    learner.fit_scaler(data.x)
    return learner


def test_the_table_of_strategies_is_complete() -> None:
    assert set(STRATEGIES) == set(SENDS)
    for name, cls in STRATEGIES.items():
        assert cls.name == name
        assert set(cls.shared) == SENDS[name] and set(cls.personal) == KEEPS[name]


@pytest.mark.parametrize("name", sorted(SENDS))
def test_an_update_carries_exactly_the_shared_parts(
        name: str, spec: ModelSpec, initial: GlobalModel, data: DeviceData) -> None:
    learner = ready(spec, name, initial, data)
    learner.personalize(data.x, data.y)
    result = learner.local_round(data.x, data.y)
    learner.personalize(data.x, data.y)
    assert set(result.delta) == SENDS[name]
    for part, delta in result.delta.items():
        assert delta.shape == (spec.parts[part],) and delta.dtype == np.float32
        assert np.isfinite(delta).all() and np.abs(delta).max() > 0
    assert result.loss_after < result.loss_before
    assert set(learner.personal) == KEEPS[name]
    state = learner.personal_state()
    assert set(state) == {f"personal_{p}" for p in KEEPS[name]} | {"feature_mean",
                                                                     "feature_scale"}
    assert set(state) <= set(learner.state_keys())
    # The global version the round started from is never modified in place.
    assert all(np.array_equal(initial.parts[p], TrainableModel(spec).get_part(p))
               for p in spec.parts)


@pytest.mark.parametrize("name", ["fedavg", "finetune", "ditto"])
def test_the_update_does_not_depend_on_personal_state(
        name: str, spec: ModelSpec, initial: GlobalModel, data: DeviceData) -> None:
    """Strategies that share the head send the global head's delta, not the personal one."""
    plain = ready(spec, name, initial, data, seed=3)
    marked = ready(spec, name, initial, data, seed=3)
    rng = np.random.default_rng(0)
    marked.personal = {p: rng.normal(size=spec.parts[p]).astype(np.float32)
                       for p in marked.strategy.personal}
    first, second = plain.local_round(data.x, data.y), marked.local_round(data.x, data.y)
    for part in SENDS[name]:
        np.testing.assert_array_equal(first.delta[part], second.delta[part])
    if HEAD in marked.personal:
        sent_head = initial.parts[HEAD] + second.delta[HEAD]
        assert not np.allclose(sent_head, marked.personal[HEAD], atol=1e-3)


@pytest.mark.parametrize("name", ["fedper", "fedrep", "finetune", "ditto"])
def test_the_personal_head_never_leaves_the_device(
        name: str, spec: ModelSpec, initial: GlobalModel, data: DeviceData) -> None:
    learner = ready(spec, name, initial, data)
    model = initial
    for number in range(1, 4):
        result = learner.local_round(data.x, data.y)
        learner.personalize(data.x, data.y)
        head = learner.personal[HEAD]
        for part, delta in result.delta.items():
            sent = model.parts[part] + delta
            if part == HEAD:
                assert not np.allclose(sent, head, atol=1e-3)
            assert not any(np.array_equal(window, head) for window in
                           np.lib.stride_tricks.sliding_window_view(sent, head.size))
        shared = {p: model.parts[p] for p in result.delta}
        model = version(spec, number, {**model.parts, **apply_delta(shared, result.delta, 1.0)})
        learner.apply_global(model)
    if HEAD not in SENDS[name]:
        np.testing.assert_array_equal(model.parts[HEAD], initial.parts[HEAD])


def test_fedper_trains_its_head_with_the_body(
        spec: ModelSpec, initial: GlobalModel, data: DeviceData) -> None:
    learner = ready(spec, "fedper", initial, data)
    learner.personalize(data.x, data.y)  # FedPer proper: nothing outside the round
    np.testing.assert_array_equal(learner.personal[HEAD], initial.parts[HEAD])
    result = learner.local_round(data.x, data.y)
    trained = learner.model.get_parts()
    np.testing.assert_array_equal(trained[HEAD], learner.personal[HEAD])
    np.testing.assert_allclose(initial.parts[BODY] + result.delta[BODY], trained[BODY],
                               atol=1e-6)
    assert not np.array_equal(learner.personal[HEAD], initial.parts[HEAD])


def test_fedrep_trains_the_body_with_the_head_frozen(
        spec: ModelSpec, initial: GlobalModel, data: DeviceData) -> None:
    learner = ready(spec, "fedrep", initial, data)
    learner.personalize(data.x, data.y)  # head first, on the global body
    head = learner.personal[HEAD].copy()
    assert not np.array_equal(head, initial.parts[HEAD])
    result = learner.local_round(data.x, data.y)
    # The round trained the head again on the global body, then only the body:
    # the head the body was trained under is exactly the personal one.
    assert not np.array_equal(learner.personal[HEAD], head)
    np.testing.assert_array_equal(learner.model.get_part(HEAD), learner.personal[HEAD])
    assert set(result.delta) == {BODY} and np.abs(result.delta[BODY]).max() > 0


def test_local_sends_nothing_and_keeps_its_own_model(
        spec: ModelSpec, initial: GlobalModel, data: DeviceData) -> None:
    learner = ready(spec, "local", initial, data)
    for p in (BODY, HEAD):
        np.testing.assert_array_equal(learner.personal[p], initial.parts[p])
    first = learner.evaluate(data.hx, data.hy)
    for _ in range(3):
        assert learner.local_round(data.x, data.y).delta == {}
    trained = learner.model.get_parts()
    for p in (BODY, HEAD):
        np.testing.assert_array_equal(learner.personal[p], trained[p])
    # A new global version changes nothing in the local model.
    learner.apply_global(version(spec, 1, {p: v + 1.0 for p, v in initial.parts.items()}))
    scores = learner.evaluate(data.hx, data.hy)
    assert scores.personal_accuracy > max(0.6, first.personal_accuracy)
    np.testing.assert_array_equal(learner.predict(data.hx),
                                  _predict(spec, trained, learner, data.hx))


def _predict(spec: ModelSpec, parts: dict[str, np.ndarray], learner: Learner,
             features: np.ndarray) -> np.ndarray:
    model = TrainableModel(spec)
    model.set_parts(parts)
    return model.predict(learner.standardize(features)).argmax(axis=1)


def test_fedavg_runs_the_global_model(spec: ModelSpec, initial: GlobalModel,
                                      data: DeviceData) -> None:
    learner = ready(spec, "fedavg", initial, data)
    learner.local_round(data.x, data.y)
    learner.personalize(data.x, data.y)
    scores = learner.evaluate(data.hx, data.hy)
    assert scores.personal_accuracy == scores.global_accuracy
    assert learner.personal == {} and learner.personal_head is None


def test_dittos_lambda_pulls_the_personal_model_to_the_global_one(
        spec: ModelSpec, initial: GlobalModel, data: DeviceData) -> None:
    distance = {}
    for lam in (0.0, 1.0, 100.0):
        learner = ready(spec, Ditto(lam=lam, personal_epochs=2), initial, data)
        learner.personalize(data.x, data.y)
        distance[lam] = sum(np.linalg.norm(learner.personal[p] - initial.parts[p])
                            for p in (BODY, HEAD))
    assert distance[0.0] > distance[1.0] > distance[100.0] > 0
    assert distance[100.0] < 0.2 * distance[0.0]


def test_personal_state_round_trip(spec: ModelSpec, initial: GlobalModel,
                                   data: DeviceData) -> None:
    first = ready(spec, "ditto", initial, data, seed=1)
    first.personalize(data.x, data.y)
    state = first.personal_state()
    second = Learner(TrainableModel(spec), TRAINING, strategy="ditto", seed=2)
    second.restore_state(state)
    second.apply_global(initial)
    np.testing.assert_array_equal(second.predict(data.hx), first.predict(data.hx))
    for p in (BODY, HEAD):
        np.testing.assert_array_equal(second.personal[p], first.personal[p])


def test_restore_drops_what_does_not_fit(spec: ModelSpec, initial: GlobalModel,
                                         caplog: pytest.LogCaptureFixture) -> None:
    learner = Learner(TrainableModel(spec), TRAINING, strategy="finetune")
    learner.restore_state({"personal_head": np.zeros(5, np.float32),
                           "personal_body": np.zeros(spec.parts[BODY], np.float32),
                           "feature_mean": np.zeros(3), "feature_scale": np.ones(3)})
    assert "personal head" in caplog.text
    assert learner.personal == {} and learner.mean is None
    learner.apply_global(initial)  # a strategy switch or another model: start afresh
    np.testing.assert_array_equal(learner.personal[HEAD], initial.parts[HEAD])


def test_a_raw_window_models_scaler_is_per_channel_and_survives_the_store() -> None:
    """har-cnn standardizes each channel over all its time steps (not per time step)."""
    spec = ModelSpec.from_manifest(MANIFEST, "har-cnn")
    learner = Learner(TrainableModel(spec), TRAINING, strategy="finetune")
    windows = np.random.default_rng(0).normal(3.0, 2.0, size=(40, *spec.input_shape))
    learner.fit_scaler(windows.astype(np.float32))
    assert learner.mean is not None and learner.mean.shape == (spec.input_shape[-1],)
    stored = {k: v.reshape(-1) for k, v in learner.personal_state().items()}
    again = Learner(TrainableModel(spec), TRAINING, strategy="finetune")
    again.restore_state(stored)
    np.testing.assert_array_equal(again.mean, learner.mean)
    np.testing.assert_array_equal(again.scale, learner.scale)
    again.restore_state({"feature_mean": np.zeros(768, np.float32),
                         "feature_scale": np.ones(768, np.float32)})  # an old per-step scaler
    assert again.mean is None and again.scale is None


def test_a_stop_check_ends_training_between_batches(spec: ModelSpec) -> None:
    learner = Learner(TrainableModel(spec), TRAINING, strategy="fedavg")
    x = np.random.default_rng(1).normal(size=(320, *spec.input_shape)).astype(np.float32)
    y = np.arange(320) % spec.num_classes
    calls = []

    def stop_after_three() -> str | None:
        calls.append(1)
        return "deferred: 71.0 °C > 70.0 °C limit" if len(calls) > 3 else None

    learner.stop_check = stop_after_three
    steps = []
    learner.fit(lambda xb, yb, lr: steps.append(1) or 1.0, x, y, epochs=2)
    assert len(steps) == 3  # 20 batches were planned


@pytest.mark.parametrize("strategy", ["finetune", "fedper", "ditto"])
def test_a_round_that_goes_non_finite_is_discarded_and_changes_nothing_personal(
        spec: ModelSpec, initial: GlobalModel, data: DeviceData, strategy: str) -> None:
    """A wrecked global model (finite, huge weights) makes SGD overflow: no update, and
    the personal parts stay as they were (the agent then waits for the next version)."""
    learner = ready(spec, strategy, initial, data)
    learner.personalize(data.x, data.y)
    personal = {name: values.copy() for name, values in learner.personal.items()}
    wrecked = {name: np.full_like(values, 1e15) for name, values in initial.parts.items()}
    learner.apply_global(version(spec, 1, wrecked))
    with pytest.raises(Diverged, match="non-finite"):
        learner.local_round(data.x, data.y)
    assert learner.personal.keys() == personal.keys()
    for name, values in personal.items():
        np.testing.assert_array_equal(learner.personal[name], values)
    learner.personalize(data.x, data.y)  # diverges too: kept as it was, with a log line
    assert all(np.isfinite(values).all() for values in learner.personal.values())


def test_unknown_strategy_and_bad_params_are_refused(spec: ModelSpec) -> None:
    with pytest.raises(ValueError, match=r"unknown strategy 'fedprox'.*fedavg"):
        Learner(TrainableModel(spec), TRAINING, strategy="fedprox")
    with pytest.raises(ValueError, match="does not take"):
        make_strategy("finetune", lam=0.1)
    with pytest.raises(ValueError, match="lam must be"):
        make_strategy("ditto", lam=-1.0)
    assert make_strategy("ditto", lam=0.5).params() == {"lam": 0.5}


@pytest.mark.parametrize("name", ["har-mlp", "har-cnn"])
def test_training_steps_at_the_models_learning_rate_unless_the_config_sets_one(
        name: str) -> None:
    model_spec = ModelSpec.from_manifest(MANIFEST, name)
    x = np.zeros((5, *model_spec.input_shape), np.float32)
    y = np.zeros(5, np.int32)
    for training, expected in ((TrainingConfig(), model_spec.learning_rate),
                               (TrainingConfig(learning_rate=0.03), 0.03)):
        rates: list[float] = []

        def step(_x: np.ndarray, _y: np.ndarray, lr: float, rates: list[float] = rates) -> float:
            rates.append(lr)
            return 0.0

        Learner(TrainableModel(model_spec), training).fit(step, x, y, epochs=2)
        assert rates and set(rates) == {expected}
