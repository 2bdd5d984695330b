"""MQTT topic names, v1. The one place topic strings are built (docs/topics.md)."""

from __future__ import annotations

ROOT = "fedd/v1"


def update(fleet: str, device: str) -> str:
    """Device → hub: one model update (CBOR, QoS 1)."""
    return f"{ROOT}/{fleet}/update/{device}"


def update_shared(fleet: str, group: str) -> str:
    """The hub workers' MQTT v5 shared subscription to every device's updates."""
    return f"$share/{group}/{ROOT}/{fleet}/update/+"


def ack(fleet: str, device: str) -> str:
    """Hub → device: the end-to-end acknowledgement of one update (JSON, QoS 1)."""
    return f"{ROOT}/{fleet}/ack/{device}"


def model_current(fleet: str) -> str:
    """Hub → devices: the current global model (CBOR, retained, QoS 1)."""
    return f"{ROOT}/{fleet}/model/current"


def heartbeat(fleet: str, device: str) -> str:
    """Device → anyone watching: health and progress (JSON, QoS 0)."""
    return f"{ROOT}/{fleet}/heartbeat/{device}"


def heartbeats(fleet: str) -> str:
    return f"{ROOT}/{fleet}/heartbeat/+"


def status(fleet: str, device: str) -> str:
    """Retained online/offline state; the offline one is the MQTT last will."""
    return f"{ROOT}/{fleet}/status/{device}"


def statuses(fleet: str) -> str:
    return f"{ROOT}/{fleet}/status/+"


def attest(fleet: str, device: str) -> str:
    """Device → hub: a request for a challenge, or a TPM quote answering one."""
    return f"{ROOT}/{fleet}/attest/{device}"


def attests(fleet: str) -> str:
    return f"{ROOT}/{fleet}/attest/+"


def attest_nonce(fleet: str, device: str) -> str:
    """Hub → device: a fresh nonce to quote over, or the verdict on the last quote."""
    return f"{ROOT}/{fleet}/attest/{device}/nonce"


def device_of(topic: str) -> str:
    """The device id that ends a per-device topic."""
    return topic.rsplit("/", 1)[-1]
