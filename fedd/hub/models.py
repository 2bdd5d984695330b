"""The hub's model store: every global version, durable and verifiable.

Each version is kept as exactly the CBOR payload that was published, written
atomically (temp file, fsync, rename), so a restart resumes from the last
version and republishes the same bytes. The payload carries the version's
provenance: parent, sha256 digest of the weights, contributors, staleness
and creation time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fedd.wire import GlobalModel

_NAME = re.compile(r"^v(\d{8})\.cbor$")
MAX_MODEL_BYTES = 256 * 1024 * 1024


class ModelStore:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, version: int) -> Path:
        return self.directory / f"v{version:08d}.cbor"

    def versions(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.directory.iterdir()
                      if (m := _NAME.match(p.name)))

    def load(self, version: int) -> GlobalModel:
        return GlobalModel.decode(self._path(version).read_bytes(), max_bytes=MAX_MODEL_BYTES)

    def latest(self) -> GlobalModel | None:
        versions = self.versions()
        return self.load(versions[-1]) if versions else None

    def save(self, model: GlobalModel) -> bytes:
        """Persist a version durably; returns the payload to publish."""
        payload = model.encode()
        path = self._path(model.version)
        if path.exists():
            raise FileExistsError(f"model version {model.version} already stored at {path}")
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return payload
