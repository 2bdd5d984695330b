"""Allowed PCR values per device class: the hub's policy file (YAML) and the check.

Format (``format: 1``)::

    # Allowed SHA-256 PCR values per device class.
    format: 1
    classes:
      rpi4:                       # a device class, as in the enrollment record
        pcrs:
          0: ["3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969"]
          7: ["65caf8dd1e0ea7a6347b635d2b379c93b9a1351edc2afc3ecda700e534eb3068",
              "124daf47b4d67179a77dc3c1bcca198ae1ee1d094a2a879974842e44ab98bb06"]
          23: ["…"]               # the agent's measurement, see below

- ``classes`` maps a class name (1-64 of A-Z a-z 0-9 _ . -) to ``pcrs``:
  a PCR index 0-23 (an unquoted integer) to a non-empty list of allowed
  values, each a quoted 64-digit hex SHA-256 (case does not matter).
- Every PCR listed is required: a quote that does not cover it is refused
  (``pcr-missing``), one whose value is not in the list too
  (``pcr-not-allowed``). PCRs a quote covers beyond the list are not checked.
- A device whose class is not in the file is refused (``no-policy``).

Where the values come from: PCRs 0-7 from a reference device of the class
(its enrollment record carries the PCR values quoted at enrollment, and
``tpm2_pcrread sha256:0,1,2,3,4,5,6,7`` prints them); PCR 23 is
``fedd.trust.measure.pcr_after_measure(measurement_digest(...))`` of the
release the class runs, one entry per release allowed at the same time.

Errors name the file, the line and the key (`fedd.config.ConfigError`).
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from fedd.config import EXIT_CONFIG_MISSING, ConfigError
from fedd.trust.quote import MAX_PCR_INDEX
from fedd.trust.reasons import Reason

__all__ = ["POLICY_FORMAT", "PcrPolicy"]

POLICY_FORMAT = 1
MAX_POLICY_BYTES = 1 << 20
MAX_CLASSES = 1000
MAX_VALUES_PER_PCR = 256
CLASS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HEX_DIGEST = re.compile(r"[0-9A-Fa-f]{64}")


def _tag(node: Node) -> str:
    return node.tag.rsplit(":", 1)[-1]


def _pairs(node: Node, path: str, key: str | None, what: str) -> list[tuple[Node, Node]]:
    if not isinstance(node, MappingNode):
        raise ConfigError(path, node.start_mark.line + 1, key, f"expected {what} (a mapping)")
    seen: dict[str, int] = {}
    for knode, _ in node.value:
        name = knode.value if isinstance(knode, ScalarNode) else "?"
        line = knode.start_mark.line + 1
        if name in seen:
            raise ConfigError(path, line, _join(key, name),
                              f"duplicate key (first on line {seen[name]})")
        seen[name] = line
    return list(node.value)


def _join(prefix: str | None, name: object) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


@dataclass(frozen=True)
class PcrPolicy:
    """Per device class, per PCR, the set of allowed SHA-256 values."""

    classes: Mapping[str, Mapping[int, frozenset[bytes]]]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        checked: dict[str, Mapping[int, frozenset[bytes]]] = {}
        if len(self.classes) > MAX_CLASSES:
            raise ValueError(f"more than {MAX_CLASSES} device classes")
        for name, pcrs in self.classes.items():
            if not isinstance(name, str) or not CLASS_NAME.fullmatch(name):
                raise ValueError(f"bad device class name {name!r}")
            if not pcrs:
                raise ValueError(f"class {name!r} lists no PCR")
            entry: dict[int, frozenset[bytes]] = {}
            for index, values in pcrs.items():
                if type(index) is not int or not 0 <= index <= MAX_PCR_INDEX:
                    raise ValueError(f"class {name!r}: PCR index {index!r} is not 0-23")
                allowed = frozenset(values)
                if not allowed or len(allowed) > MAX_VALUES_PER_PCR:
                    raise ValueError(f"class {name!r} PCR {index}: 1-{MAX_VALUES_PER_PCR} values")
                if any(not isinstance(v, bytes) or len(v) != 32 for v in allowed):
                    raise ValueError(f"class {name!r} PCR {index}: values are 32-byte SHA-256")
                entry[index] = allowed
            checked[name] = types.MappingProxyType(dict(sorted(entry.items())))
        object.__setattr__(self, "classes", types.MappingProxyType(checked))

    @classmethod
    def from_values(cls, classes: Mapping[str, Mapping[int, Iterable[bytes]]],
                    source: str = "<memory>") -> PcrPolicy:
        return cls({name: {i: frozenset(v) for i, v in pcrs.items()}
                    for name, pcrs in classes.items()}, source)

    def required(self, device_class: str) -> tuple[int, ...] | None:
        """The PCRs a quote from this class must cover (ascending), None for an unknown class."""
        pcrs = self.classes.get(device_class)
        return None if pcrs is None else tuple(pcrs)

    def check(self, device_class: str, pcrs: Mapping[int, bytes]) -> tuple[Reason | None, str]:
        """(None, "") when every listed PCR is covered and allowed, else (reason, sentence)."""
        allowed = self.classes.get(device_class)
        if allowed is None:
            return Reason.NO_POLICY, f"{self.source} has no entry for class {device_class!r}"
        missing = [i for i in allowed if i not in pcrs]
        if missing:
            return Reason.PCR_MISSING, f"the quote does not cover PCRs {missing}"
        for index, values in allowed.items():
            if pcrs[index] not in values:
                return (Reason.PCR_NOT_ALLOWED, f"PCR {index} = {pcrs[index].hex()} is not "
                        f"allowed for class {device_class!r} ({self.source})")
        return None, ""

    # ------------------------------------------------------------ the file

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PcrPolicy:
        """Read and check a policy file; `ConfigError` (file, line, key) if it is wrong."""
        where = os.fspath(path)
        try:
            with open(path, "rb") as stream:
                data = stream.read(MAX_POLICY_BYTES + 1)
        except OSError as error:
            raise ConfigError(where, None, None, f"cannot read the PCR policy: "
                              f"{error.strerror or error}", exit_code=EXIT_CONFIG_MISSING) from None
        if len(data) > MAX_POLICY_BYTES:
            raise ConfigError(where, None, None, f"larger than {MAX_POLICY_BYTES} bytes")
        try:
            root = yaml.compose(data, Loader=yaml.SafeLoader)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            raise ConfigError(where, mark.line + 1 if mark else None, None,
                              f"YAML syntax error: {getattr(error, 'problem', None) or error}"
                              ) from None
        if root is None:
            raise ConfigError(where, None, None, "the PCR policy is empty")
        top = {k.value: (k, v) for k, v in _pairs(root, where, None, "the policy")}
        for name, (knode, _) in top.items():
            if name not in ("format", "classes"):
                raise ConfigError(where, knode.start_mark.line + 1, name,
                                  "unknown key; allowed keys: format, classes")
        for name in ("format", "classes"):
            if name not in top:
                raise ConfigError(where, 1, name, "required key is missing")
        fnode = top["format"][1]
        if not (isinstance(fnode, ScalarNode) and _tag(fnode) == "int"
                and fnode.value == str(POLICY_FORMAT)):
            raise ConfigError(where, fnode.start_mark.line + 1, "format",
                              f"this fedd reads PCR policy format {POLICY_FORMAT}, "
                              f"got {fnode.value!r}")
        classes = {}
        class_pairs = _pairs(top["classes"][1], where, "classes", "device classes")
        if not class_pairs:
            raise ConfigError(where, top["classes"][0].start_mark.line + 1, "classes",
                              "no device class listed")
        if len(class_pairs) > MAX_CLASSES:
            raise ConfigError(where, None, "classes", f"more than {MAX_CLASSES} classes")
        for knode, vnode in class_pairs:
            name = knode.value
            key = f"classes.{name}"
            if not (isinstance(knode, ScalarNode) and _tag(knode) == "str"
                    and CLASS_NAME.fullmatch(name)):
                raise ConfigError(where, knode.start_mark.line + 1, key,
                                  "a class name must be 1-64 of A-Z a-z 0-9 _ . - starting "
                                  "with a letter or digit")
            classes[name] = _load_class(vnode, where, key)
        return cls(classes, where)


def _load_class(node: Node, path: str, key: str) -> dict[int, frozenset[bytes]]:
    pairs = _pairs(node, path, key, "a class entry")
    names = [k.value for k, _ in pairs]
    if names != ["pcrs"]:
        bad = next((k for k, _ in pairs if k.value != "pcrs"), None)
        line = (bad or node).start_mark.line + 1
        raise ConfigError(path, line, key if bad is None else _join(key, bad.value),
                          "a class entry has exactly one key: pcrs")
    pcrs_node = pairs[0][1]
    key = f"{key}.pcrs"
    entries = _pairs(pcrs_node, path, key, "PCR index -> allowed values")
    if not entries:
        raise ConfigError(path, pcrs_node.start_mark.line + 1, key, "no PCR listed")
    pcrs: dict[int, frozenset[bytes]] = {}
    for knode, vnode in entries:
        pkey = _join(key, knode.value)
        line = knode.start_mark.line + 1
        if not (isinstance(knode, ScalarNode) and _tag(knode) == "int"
                and knode.value.isdigit() and 0 <= int(knode.value) <= MAX_PCR_INDEX):
            raise ConfigError(path, line, pkey, f"a PCR index is an integer 0-{MAX_PCR_INDEX}")
        index = int(knode.value)
        if index in pcrs:
            raise ConfigError(path, line, pkey, "PCR listed twice")
        if not isinstance(vnode, SequenceNode) or not vnode.value:
            raise ConfigError(path, vnode.start_mark.line + 1, pkey,
                              "expected a non-empty list of allowed values")
        if len(vnode.value) > MAX_VALUES_PER_PCR:
            raise ConfigError(path, vnode.start_mark.line + 1, pkey,
                              f"more than {MAX_VALUES_PER_PCR} allowed values")
        values = set()
        for i, item in enumerate(vnode.value):
            if not (isinstance(item, ScalarNode) and _tag(item) == "str"
                    and HEX_DIGEST.fullmatch(item.value)):
                raise ConfigError(path, item.start_mark.line + 1, f"{pkey}[{i}]",
                                  "an allowed value is a quoted 64-digit hex SHA-256")
            values.add(bytes.fromhex(item.value))
        pcrs[index] = frozenset(values)
    return pcrs

