"""fedd.link's byte count of a PUBLISH and its per-connection topic-alias table."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedd.link import TopicAliases, publish_wire_bytes

TOPIC = "fedd/v1/demo/update/person-01"


def paho_publish_bytes(topic: str, payload: bytes, qos: int, alias: int | None) -> int:
    """What paho's own packet builder makes of it (Client._send_publish's layout)."""
    properties = b"\x00"
    if alias is not None:
        props = Properties(PacketTypes.PUBLISH)
        props.TopicAlias = alias
        properties = props.pack()
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + len(properties) + len(payload)
    length = 1
    while remaining >= 128**length:
        length += 1
    return 1 + length + remaining


@pytest.mark.parametrize("size", [0, 70, 126, 127, 16_000, 34_000, 2_100_000])
@pytest.mark.parametrize(("topic", "alias"), [(TOPIC, None), (TOPIC, 1), ("", 1), ("", 65535)])
@pytest.mark.parametrize("qos", [0, 1])
def test_publish_wire_bytes_counts_the_properties(size: int, topic: str, alias: int | None,
                                                  qos: int) -> None:
    payload = bytes(size)
    assert publish_wire_bytes(topic, payload, qos, topic_alias=alias) == paho_publish_bytes(
        topic, payload, qos, alias)


def test_an_alias_alone_saves_the_topic_less_its_three_bytes() -> None:
    payload = bytes(70)
    full = publish_wire_bytes(TOPIC, payload, 1)
    assert full == 106
    assert publish_wire_bytes(TOPIC, payload, 1, topic_alias=1) == full + 3
    assert publish_wire_bytes("", payload, 1, topic_alias=1) == full - len(TOPIC) + 3


def test_an_alias_goes_alone_only_once_acknowledged() -> None:
    aliases = TopicAliases(maximum=2)
    assert aliases.plan(TOPIC, assign=False) == (TOPIC, 1)  # a look: nothing taken
    assert aliases.plan(TOPIC, assign=True) == (TOPIC, 1)
    assert aliases.plan(TOPIC, assign=True) == (TOPIC, 1)  # not acknowledged yet: topic again
    aliases.acknowledged(TOPIC)
    assert aliases.plan(TOPIC, assign=True) == ("", 1)
    assert aliases.plan("a/b", assign=True) == ("a/b", 2)
    assert aliases.plan("c/d", assign=True) == ("c/d", None)  # the broker's maximum: no alias
    aliases.acknowledged("c/d")  # an unaliased topic's acknowledgement changes nothing
    assert aliases.plan("c/d", assign=True) == ("c/d", None)


def test_no_alias_when_the_broker_takes_none() -> None:
    aliases = TopicAliases()  # no Topic Alias Maximum in the CONNACK
    assert aliases.plan(TOPIC, assign=True) == (TOPIC, None)
