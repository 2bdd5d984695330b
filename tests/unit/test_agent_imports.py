"""The agent's import path leaves out what only other roles or other settings need.

Each module is memory the agent would hold for its whole life on a device
with a few hundred MB (docs/operations.md, "bench-footprint"): the hub and
the fleet tools, cryptography (a device that signs imports it when its key
is loaded), the TPM bindings (only with trust.tcti), zstandard (only for a
codec with a zstd stage) and statistics (with fractions and decimal).
"""

from __future__ import annotations

import subprocess
import sys

NOT_ON_THE_AGENT_PATH = ("fedd.hub", "fedd.fleet", "fedd.pki", "fedd.trust.signing",
                         "fedd.trust.tpm", "cryptography", "tpm2_pytss", "zstandard",
                         "statistics", "matplotlib", "prometheus_client")


def test_starting_an_agent_imports_none_of_the_heavy_modules_it_does_not_use() -> None:
    code = ("import sys, fedd.cli, fedd.agent.daemon; "
            f"print(' '.join(m for m in {NOT_ON_THE_AGENT_PATH!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    assert loaded == []
