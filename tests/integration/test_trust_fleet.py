"""Fleet trust end to end: a real swtpm, scripts/enroll, a hub in `require` mode.

An enrolled device that measures itself, answers the hub's challenge with a
TPM quote and signs its updates shapes the model; an unenrolled device's
unsigned updates and a forged update in the enrolled device's name are
refused before their bodies are read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedd import topics
from fedd.model import ModelSpec
from fedd.trust.messages import seal
from fedd.trust.signing import sign_update
from fedd.wire import ModelUpdate
from tests.tpm_fixtures import Swtpm, skip_without_swtpm

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FLEET = "trusted"
TIMEOUT_S = 60.0


def enroll(swtpm: Swtpm, device: str, key: Path, model: Path, store: Path, out: Path) -> dict:
    """What an operator does: scripts/enroll on the device, then register on the hub."""
    made = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "enroll"), "device", "--tcti", swtpm.tcti,
         "--class", "lab", "--device-id", device, "--key", str(key), "--measure",
         "--model", str(model), "--out", str(out)],
        capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr + made.stdout
    registered = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "enroll"), "register", "--store", str(store),
         str(out)], capture_output=True, text=True, timeout=60, check=False)
    assert registered.returncode == 0, registered.stderr + registered.stdout
    return json.loads(out.read_text())


def test_only_an_attested_signing_device_shapes_the_model(
        broker, probe, fedd, agent_yaml, hub_yaml, manifest_path, tmp_path, wait_for,
        status_of):
    skip_without_swtpm()
    spec = ModelSpec.from_manifest(manifest_path, "har-mlp")
    store, hub_state = tmp_path / "enrollments", tmp_path / "hub-state"
    with Swtpm(tmp_path / "swtpm") as swtpm:
        key = tmp_path / "device" / "update.key"
        record = enroll(swtpm, "dev-good", key, spec.path, store, tmp_path / "dev-good.json")
        # The class's policy: the PCR values the device had at enrollment, measurement included.
        policy = tmp_path / "pcr-policy.yaml"
        pcrs = record["tpm"]["binding"]["pcrs"]
        policy.write_text(yaml.safe_dump({"format": 1, "classes": {"lab": {"pcrs": {
            int(index): [value] for index, value in pcrs.items()}}}}))

        hub = fedd.hub("hub", hub_yaml(
            tmp_path / "hub.yaml", broker=broker, state_dir=hub_state, fleet=FLEET,
            trust={"mode": "require", "require_signatures": True, "enrollments": str(store),
                   "pcr_policy": str(policy)}))
        good_state = tmp_path / "good-state"
        good = fedd.agent("dev-good", agent_yaml(
            tmp_path / "good.yaml", broker=broker, device_id="dev-good", fleet=FLEET,
            state_dir=good_state, person=1,
            trust={"tcti": swtpm.tcti, "signing_key": str(key)}))
        rogue_state = tmp_path / "rogue-state"
        rogue = fedd.agent("dev-rogue", agent_yaml(
            tmp_path / "rogue.yaml", broker=broker, device_id="dev-rogue", fleet=FLEET,
            state_dir=rogue_state, person=2))

        status = wait_for(lambda: (s := status_of(good_state)) and s["trusted"]
                          and s["acked"] >= 2 and s, timeout=TIMEOUT_S,
                          what="the enrolled device to be trusted and its updates folded",
                          watch=[hub, good])
        assert status["trust_reason"] is None and status["trusted_until"] > status["time"]
        assert "measured the agent into PCR 23" in good.log()
        hub_status = wait_for(lambda: (s := status_of(hub_state)) and s["rejected"].get(
            "unsigned", 0) >= 1 and s, timeout=TIMEOUT_S,
            what="the unenrolled device's unsigned updates to be refused", watch=[hub, rogue])
        assert hub_status["trust"]["verdicts"].get("trusted", 0) >= 1
        rogue_status = status_of(rogue_state)
        assert rogue_status["trusted"] is False
        assert rogue_status["trust_reason"] == "not-enrolled"
        assert rogue_status["acked"] == 0  # nothing of it was folded

        # A forged update in dev-good's name: signed, but with another key.
        forged = ModelUpdate.from_deltas(
            {name: np.full(length, 0.5, np.float32) for name, length in spec.parts.items()},
            device="dev-good", seq=10_000, base_version=0, model=spec.name, num_samples=1,
            created=0.0).encode()
        probe.publish((topics.update(FLEET, "dev-good"),
                       seal(forged, sign_update(Ed25519PrivateKey.generate(), "dev-good",
                                                forged))))
        hub_status = wait_for(lambda: (s := status_of(hub_state)) and s["rejected"].get(
            "bad-signature", 0) >= 1 and s, timeout=TIMEOUT_S,
            what="the forged update to be refused", watch=[hub])
        assert hub.alive()
        for process in (good, rogue, hub):
            assert process.terminate() == 0, process.tail()


@pytest.mark.parametrize(("mode", "folded"), [("require", False), ("prefer", True)])
def test_a_device_without_a_tpm_is_judged_by_the_fleet_mode(
        broker, fedd, agent_yaml, hub_yaml, tmp_path, wait_for, status_of, mode, folded):
    """No TPM, not enrolled, unsigned updates allowed: require rejects its updates with the
    trust reason (acknowledged, so the device drops them); prefer folds them, flagged."""
    policy = tmp_path / "pcr-policy.yaml"
    policy.write_text(f"format: 1\nclasses:\n  lab:\n    pcrs:\n      23: ['{'0' * 64}']\n")
    hub_state, state = tmp_path / "hub-state", tmp_path / "state"
    hub = fedd.hub("hub", hub_yaml(
        tmp_path / "hub.yaml", broker=broker, state_dir=hub_state, fleet=FLEET,
        trust={"mode": mode, "enrollments": str(tmp_path / "none"),
               "pcr_policy": str(policy)}))
    agent = fedd.agent("plain", agent_yaml(tmp_path / "plain.yaml", broker=broker,
                                           device_id="plain", fleet=FLEET, state_dir=state))
    if folded:
        status = wait_for(lambda: (s := status_of(state)) and s["acked"] >= 1
                          and s["trusted"] is not None and s, timeout=TIMEOUT_S,
                          what="a flagged update folded", watch=[hub, agent])
        assert status_of(hub_state)["trust"]["flagged_updates"] >= 1
    else:
        status = wait_for(lambda: (s := status_of(state)) and s["rejected"] >= 1
                          and s["trusted"] is not None and s, timeout=TIMEOUT_S,
                          what="an update rejected as untrusted", watch=[hub, agent])
        # Before its challenge is answered it was never attested; after, not enrolled.
        assert set(status["rejected_updates"]) <= {"untrusted-never-attested",
                                                   "untrusted-not-enrolled"}
        assert status["acked"] == 0
    assert status["trusted"] is False and status["trust_reason"] == "not-enrolled"
    for process in (agent, hub):
        assert process.terminate() == 0, process.tail()
