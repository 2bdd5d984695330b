"""Mosquitto's configuration and ACL for one fleet, rendered from `config/mosquitto/*.in`.

The templates are the operator's documentation as much as the broker's input,
so they stay plain files with `@NAME@` placeholders (the autoconf `.in`
convention) rather than strings in code. Every value is checked before it is
written: a path with a space or a relative path would be misread by Mosquitto
without a word, and a fleet name is spliced into ACL topics.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedd import pki

__all__ = [
    "ACL_FILE",
    "ACL_TEMPLATE",
    "CONF_FILE",
    "CONF_TEMPLATE",
    "BrokerSettings",
    "TemplateError",
    "find_templates",
    "render",
    "render_acl",
    "render_broker_conf",
    "write_broker_files",
]

CONF_TEMPLATE, ACL_TEMPLATE = "fedd-broker.conf.in", "fedd-acl.in"
CONF_FILE, ACL_FILE = "fedd-broker.conf", "fedd-acl"
INSTALL_DIR = Path("/etc/mosquitto/fedd")
# The source tree's templates (an editable install or a checkout), then where
# a package installs them.
TEMPLATE_DIRS = (Path(__file__).resolve().parents[1] / "config" / "mosquitto",
                 Path("/usr/share/fedd/mosquitto"))
PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


class TemplateError(pki.PkiError):
    """A template that cannot be found or filled, or a value it cannot take."""


def find_templates(folder: str | Path | None = None) -> Path:
    """The folder holding both templates: `folder` if given, else the first that has them."""
    candidates = [Path(folder)] if folder is not None else list(TEMPLATE_DIRS)
    for candidate in candidates:
        if (candidate / CONF_TEMPLATE).is_file() and (candidate / ACL_TEMPLATE).is_file():
            return candidate
    raise TemplateError(f"no {CONF_TEMPLATE} and {ACL_TEMPLATE} in "
                        f"{', '.join(str(c) for c in candidates)}")


def render(template: str, values: Mapping[str, str], *, name: str = "template") -> str:
    """Fill every `@NAME@`; a placeholder without a value is an error, not a blank."""
    missing = sorted({m for m in PLACEHOLDER.findall(template) if m not in values})
    if missing:
        raise TemplateError(f"{name}: no value for {', '.join(missing)}")
    text = PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def _conf_path(value: Path, what: str) -> str:
    """A path as Mosquitto reads it: absolute (no cwd surprises), one word, one line."""
    text = str(value)
    if not value.is_absolute():
        raise TemplateError(f"{what} must be an absolute path, not {text!r}")
    if any(ch.isspace() for ch in text):
        raise TemplateError(f"{what} must not contain white space (Mosquitto splits on it): "
                            f"{text!r}")
    return text


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    """What the broker template needs. `installed()` gives the paths of a Debian broker."""

    fleet: str
    port: int = 8883
    bind_address: str | None = None  # None: every interface
    cafile: Path
    certfile: Path
    keyfile: Path
    acl_file: Path
    persistence_dir: Path = Path("/var/lib/mosquitto")
    log_file: Path | None = Path("/var/log/mosquitto/mosquitto.log")  # None: syslog
    user: str = "mosquitto"

    def __post_init__(self) -> None:
        pki.check_fleet(self.fleet)
        if isinstance(self.port, bool) or not isinstance(self.port, int) \
                or not 1 <= self.port <= 65535:
            raise TemplateError(f"port must be 1-65535, not {self.port!r}")
        if self.bind_address is not None:
            try:
                ipaddress.ip_address(self.bind_address)
            except ValueError:
                if not pki.HOSTNAME.fullmatch(self.bind_address):
                    raise TemplateError(f"bind address {self.bind_address!r} is not an IP "
                                        "address or host name") from None
        if not USER.fullmatch(self.user):
            raise TemplateError(f"user {self.user!r} is not a system user name")
        for what in ("cafile", "certfile", "keyfile", "acl_file", "persistence_dir"):
            _conf_path(getattr(self, what), what)
        if self.log_file is not None:
            _conf_path(self.log_file, "log_file")

    @classmethod
    def installed(cls, *, fleet: str, folder: Path = INSTALL_DIR, port: int = 8883,
                  bind_address: str | None = None,
                  persistence_dir: Path = Path("/var/lib/mosquitto"),
                  log_file: Path | None = Path("/var/log/mosquitto/mosquitto.log"),
                  user: str = "mosquitto") -> BrokerSettings:
        """The files of `<pki>/broker/` as they lie once copied to `folder` on the broker."""
        return cls(fleet=fleet, port=port, bind_address=bind_address,
                   cafile=folder / pki.CA_CERT, certfile=folder / pki.BROKER_CERT,
                   keyfile=folder / pki.BROKER_KEY, acl_file=folder / ACL_FILE,
                   persistence_dir=persistence_dir, log_file=log_file, user=user)

    def values(self) -> dict[str, str]:
        return {
            "FLEET": self.fleet,
            "PORT": str(self.port),
            "BIND_ADDRESS": self.bind_address or "",
            "CAFILE": str(self.cafile),
            "CERTFILE": str(self.certfile),
            "KEYFILE": str(self.keyfile),
            "ACL_FILE": str(self.acl_file),
            "PERSISTENCE_DIR": str(self.persistence_dir).rstrip("/") or "/",
            "LOG_DEST": f"file {self.log_file}" if self.log_file else "syslog",
            "USER": self.user,
        }


def render_broker_conf(settings: BrokerSettings, templates: str | Path | None = None) -> str:
    path = find_templates(templates) / CONF_TEMPLATE
    return render(path.read_text(), settings.values(), name=str(path))


def render_acl(fleet: str, templates: str | Path | None = None) -> str:
    path = find_templates(templates) / ACL_TEMPLATE
    return render(path.read_text(), {"FLEET": pki.check_fleet(fleet)}, name=str(path))


def write_broker_files(settings: BrokerSettings, folder: str | Path, *,
                       templates: str | Path | None = None,
                       force: bool = False) -> tuple[Path, Path]:
    """Render both files into `folder` (never over an existing one unless forced)."""
    folder = Path(folder)
    conf_text = render_broker_conf(settings, templates)
    acl_text = render_acl(settings.fleet, templates)
    conf_path, acl_path = folder / CONF_FILE, folder / ACL_FILE
    if not force:
        for path in (conf_path, acl_path):
            if path.exists():
                raise pki.AlreadyExists(path)
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in ((conf_path, conf_text), (acl_path, acl_text)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(path)
    return conf_path, acl_path
