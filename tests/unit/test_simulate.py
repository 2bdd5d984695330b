"""The in-process federated simulation: real Learner, LiteRT and FedBuff on HAPT people."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedd.config import RobustConfig
from fedd.fleet.simulate import (
    MANIFEST,
    Attack,
    SimOptions,
    SimResult,
    load_fleet,
    pooled,
    simulate,
    skewed_classes,
)
from fedd.model import ModelSpec

PEOPLE = (1, 2, 3, 4)
SHORT = SimOptions(people=PEOPLE, rounds=12, per_round=2, epochs=2, learning_rate=0.1,
                   head_epochs=2)
BODY_SIZE = ModelSpec.from_manifest(MANIFEST, SHORT.model).parts["body"]


@pytest.fixture(scope="module")
def finetune() -> SimResult:
    return simulate(SHORT)


def test_a_short_simulation_beats_chance_by_far(finetune: SimResult) -> None:
    assert [p.person for p in finetune.people] == list(PEOPLE)
    assert finetune.versions == 12 and finetune.local_rounds == 24
    assert finetune.updates_folded == 24 and finetune.updates_dropped == 0
    assert finetune.personal_accuracy.mean() > 0.8  # chance is 1/6
    assert finetune.global_accuracy.mean() > 0.6
    for person in finetune.people:
        assert person.classes == list(range(6))
        assert person.train_windows > 150 and person.holdout_windows > 50


def test_each_persons_confusion_matrix_counts_their_holdout(finetune: SimResult) -> None:
    for person in finetune.people:
        confusion = np.array(person.confusion)
        assert confusion.shape == (6, 6)
        assert confusion.sum() == person.holdout_windows
        assert np.trace(confusion) == round(person.personal_accuracy * person.holdout_windows)


def test_json_round_trip(finetune: SimResult) -> None:
    again = SimResult.from_json(finetune.to_json())
    assert again == finetune
    assert again.options.people == PEOPLE


def test_uplink_counts_exactly_the_shared_parts() -> None:
    fedper = simulate(dataclasses.replace(SHORT, strategy="fedper", rounds=3))
    assert fedper.uplink_values == fedper.updates_folded * BODY_SIZE
    local = simulate(dataclasses.replace(SHORT, strategy="local", rounds=6))
    assert local.uplink_values == 0 and local.versions == 0 and local.local_rounds == 12
    assert local.personal_accuracy.mean() > 0.6


def test_updates_cross_as_the_agent_sends_them_and_the_curve_counts_their_bytes(
        finetune: SimResult) -> None:
    """Format-2 PUBLISH bytes, decoded by the hub's checks; the curve adds them up."""
    sparse = simulate(dataclasses.replace(SHORT, codec="topk:0.01+q:4+zstd", eval_every=4))
    assert sparse.updates_sent == sparse.updates_folded == 24 and sparse.updates_invalid == 0
    assert [p.version for p in sparse.curve] == [4, 8, 12]
    assert [p.local_rounds for p in sparse.curve] == [8, 16, 24]
    assert sparse.curve[-1].uplink_bytes == sparse.uplink_bytes
    sent = [p.uplink_bytes for p in sparse.curve]
    assert sent == sorted(set(sent))
    # The float32 update is the model's values, 4 bytes each, and a little framing.
    values = sum(ModelSpec.from_manifest(MANIFEST, SHORT.model).parts.values())
    assert 4 * values < finetune.update_bytes_median < 4 * values + 200
    assert finetune.uplink_bytes > 100 * sparse.uplink_bytes
    # An Ed25519 signature (64 bytes) and its envelope on every update.
    extra = (sparse.uplink_signed_bytes - sparse.uplink_bytes) / sparse.updates_sent
    assert 64 < extra < 75
    assert sparse.personal_accuracy.mean() > 0.8
    assert finetune.curve == []  # eval_every 0: scored at the end only


def test_an_unknown_codec_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="codec"):
        dataclasses.replace(SHORT, codec="topk+nope")


def test_async_fedbuff_with_slow_devices() -> None:
    result = simulate(dataclasses.replace(SHORT, mode="async", rounds=8, slow_share=0.5,
                                          slow_factor=4.0, max_staleness=1))
    assert result.versions == 8
    assert result.updates_folded == 8 * 2
    assert result.updates_dropped > 0  # the slow devices' rounds came back too stale
    assert result.personal_accuracy.mean() > 0.6


def test_label_skew_keeps_two_to_four_classes_in_train_and_holdout() -> None:
    fleet = load_fleet(range(1, 31), label_skew=True, seed=5)
    full = load_fleet(range(1, 31))
    for data, whole in zip(fleet, full, strict=True):
        kept = set(data.y.tolist())
        assert 2 <= len(kept) <= 4
        assert set(data.hy.tolist()) == kept
        assert data.classes == sorted(kept)
        # Every window of a kept activity stays; nothing else does.
        assert len(data.y) == np.isin(whole.y, list(kept)).sum()
        assert len(data.hx) == len(data.hy) == np.isin(whole.hy, list(kept)).sum()
    assert {len(d.classes) for d in fleet} == {2, 3, 4}


def test_label_skew_is_reproducible_by_seed() -> None:
    def kept(seed: int) -> list[list[int]]:
        return [d.classes for d in load_fleet(range(1, 31), label_skew=True, seed=seed)]

    assert kept(3) == kept(3)
    assert kept(3) != kept(4)
    assert skewed_classes(9, range(6), 1) == skewed_classes(9, range(6), 1)


def test_a_skewed_short_run_reports_each_persons_classes() -> None:
    result = simulate(dataclasses.replace(SHORT, label_skew=True, seed=2, rounds=4))
    for person, data in zip(result.people, load_fleet(PEOPLE, label_skew=True, seed=2),
                            strict=True):
        assert person.classes == data.classes and 2 <= len(person.classes) <= 4


def test_a_screen_without_bounds_changes_nothing(finetune: SimResult) -> None:
    measured = simulate(dataclasses.replace(
        SHORT, robust=RobustConfig(clip_multiple=None, reject_multiple=None)))
    assert measured.people == finetune.people
    assert (measured.updates_rejected, measured.updates_clipped) == (0, 0)


def test_attackers_scale_their_updates_and_the_screen_refuses_them(
        finetune: SimResult) -> None:
    attack = Attack(factor=100.0, devices=1)
    undefended = simulate(dataclasses.replace(SHORT, attack=attack))
    assert len(undefended.attackers) == 1 and undefended.attackers[0] in PEOPLE
    assert undefended.global_accuracy.mean() < finetune.global_accuracy.mean() - 0.2
    defended = simulate(dataclasses.replace(SHORT, attack=attack,
                                            robust=RobustConfig(warmup=1)))
    assert defended.attackers == undefended.attackers  # drawn from the seed
    assert defended.updates_rejected >= 4  # most of the attacker's ~6 updates
    assert defended.global_accuracy.mean() > finetune.global_accuracy.mean() - 0.05
    again = SimResult.from_json(defended.to_json())
    assert again == defended and again.options.attack == attack
    assert again.options.robust == RobustConfig(warmup=1)


def test_an_async_fleet_that_stops_making_versions_ends() -> None:
    """A x1e12 update wrecks the plain mean; every later update is non-finite."""
    result = simulate(dataclasses.replace(SHORT, mode="async",
                                          attack=Attack(factor=1e12, devices=1)))
    assert result.versions < SHORT.rounds
    assert result.local_rounds == 3 * SHORT.rounds * SHORT.per_round
    assert result.updates_invalid > result.updates_folded


def test_a_robust_rule_runs_in_the_simulation() -> None:
    result = simulate(dataclasses.replace(SHORT, rounds=4, per_round=3,
                                          robust=RobustConfig(rule="median")))
    assert result.versions == 4 and result.personal_accuracy.mean() > 0.6


@pytest.mark.parametrize(("change", "message"), [
    ({"strategy": "fedprox"}, "unknown strategy"),
    ({"strategy_params": {"lam": 0.1}}, "does not take"),
    ({"per_round": 5}, "per_round must be 1-4"),
    ({"people": (1, 1)}, "distinct"),
    ({"mode": "later"}, "mode must be"),
    ({"rounds": 0}, "rounds must be"),
    ({"learning_rate": 0.0}, "learning_rate must be"),
    ({"learning_rate": float("nan")}, "learning_rate must be"),
    ({"attack": Attack(factor=100.0, devices=5)}, "needs as many people"),
])
def test_bad_options_are_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SHORT, **change)


@pytest.mark.parametrize("attack", [{"factor": float("nan")}, {"factor": 2.0, "devices": 0}])
def test_bad_attacks_are_refused(attack: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="attack"):
        Attack(**attack)  # type: ignore[arg-type]


def test_the_pooled_reference_trains_one_model_on_everyones_windows() -> None:
    """One model for all (so each person's global score is that model's on their holdout),
    then each person's own head: scored as the simulation scores its devices."""
    people = pooled(SHORT, epochs=3, head_epochs=3)
    fleet = load_fleet(PEOPLE)
    assert [p.person for p in people] == list(PEOPLE)
    assert [p.holdout_windows for p in people] == [len(d.hy) for d in fleet]
    assert np.mean([p.global_accuracy for p in people]) > 0.8  # chance is 1/6
    assert np.mean([p.personal_accuracy for p in people]) > 0.8
