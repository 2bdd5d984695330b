"""The Debian packages from source to purge, on a clean Debian 12 and under a real systemd.

In order: build `fedd` and `fedd-hub` with `dpkg-buildpackage -us -uc -b`
from a copy of the checkout; lint them (no lintian error or warning that
debian/*.lintian-overrides does not justify); install them with `apt
install ./fedd_*.deb` into a fresh `debootstrap` tree of Debian 12 (Debian's
packages come from its mirror); check the user, the conffiles, the state
directory, the enabled units, `fedd --version` and `fedd check-config`;
provision a fleet with `fedd-provision` and Mosquitto, configure it as an
operator would, boot the tree with `systemd-nspawn -b` and let a driver unit
(packaging/boot-check.sh) run broker, hub and agent under systemd with the
shipped hardened units: the agent must train on a HAPT replay and exchange
versions with the hub over mutual TLS, log structured entries to journald,
be killed and restarted by the watchdog when frozen, be restarted by a
package upgrade with the operator's config kept, and stop cleanly; then
remove (config and state stay) and purge (nothing is left but what was
there before).

Slow (about five minutes), needs root, PyPI and a Debian mirror: run it with
scripts/test-packaging, which installs the tools and sets
FEDD_TEST_PACKAGING=1. Without that variable the module is skipped, so the
normal suite (scripts/test, CI) never runs it. Figures (build time, sizes,
lintian output, exposure scores) go to <out>/report.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedd import __version__

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "packaging"
OUT = Path(os.environ.get("FEDD_PACKAGING_OUT", REPO / "runs" / "packaging"))
CACHE = Path(os.environ.get("FEDD_PACKAGING_CACHE", "/var/cache/fedd-pkgtest"))
MIRROR = os.environ.get("FEDD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
UPGRADE_VERSION = f"{__version__}+pkgtest1"
BOOT_TIMEOUT_S = 480

pytestmark = [
    pytest.mark.packaging,
    pytest.mark.skipif(os.environ.get("FEDD_TEST_PACKAGING") != "1",
                       reason="slow: run scripts/test-packaging (FEDD_TEST_PACKAGING=1)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (debootstrap, chroot, nspawn)"),
]

REPORT: dict[str, object] = {}


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 1800, check: bool = True, log: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run a command; with `log`, its output goes there and into the failure message."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout, check=False)
    if log is not None:
        log.write_text(result.stdout + result.stderr)
    if check and result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        pytest.fail(f"{' '.join(cmd)} exited {result.returncode}\n{tail}")
    return result


def system_env(**extra: str) -> dict[str, str]:
    """Our environment with the system Python first on PATH and no virtualenv or pyenv."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYENV", "VIRTUAL_ENV", "PYTHON", "CONDA"))}
    env.update(PATH=SYSTEM_PATH, LC_ALL="C.UTF-8", **extra)
    return env


class Tree:
    """A Debian root file system, worked on with chroot (and /proc mounted) or booted."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def mount_proc(self) -> None:
        if not os.path.ismount(self.path("/proc")):
            run(["mount", "-t", "proc", "proc", str(self.path("/proc"))])

    def umount_proc(self) -> None:
        if os.path.ismount(self.path("/proc")):
            run(["umount", str(self.path("/proc"))])

    def sh(self, script: str, *, check: bool = True, timeout: float = 900,
           log: Path | None = None) -> subprocess.CompletedProcess[str]:
        self.mount_proc()
        env = {"PATH": SYSTEM_PATH, "LC_ALL": "C.UTF-8", "HOME": "/root",
               "DEBIAN_FRONTEND": "noninteractive"}
        return run(["chroot", str(self.root), "/bin/sh", "-c", script], env=env,
                   timeout=timeout, check=check, log=log)

    def apt(self, args: str, log: Path) -> subprocess.CompletedProcess[str]:
        return self.sh(f"apt-get -y -q -o Dpkg::Options::=--force-confold {args}", log=log)

    def snapshot(self) -> set[str]:
        """Every path in the tree but the API file systems, caches, logs and package state."""
        skip = {"proc", "sys", "dev", "run", "tmp", "var/tmp", "var/cache", "var/log",
                "var/lib/apt", "var/lib/dpkg", "var/lib/systemd/catalog",
                "var/lib/systemd/timers", "var/lib/systemd/random-seed",
                "var/lib/ucf", "var/backups", "root/pki", "srv/fedd-pkgtest"}
        found = set()
        for folder, dirs, files in os.walk(self.root):
            rel = os.path.relpath(folder, self.root)
            dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(rel, d)) not in skip]
            for name in dirs + files:
                found.add("/" + os.path.normpath(os.path.join(rel, name)))
        return found


def users(tree: Tree) -> set[str]:
    names = set()
    for line in tree.path("/etc/passwd").read_text().splitlines():
        names.add(line.split(":")[0])
    return names


def groups(tree: Tree) -> dict[str, list[str]]:
    out = {}
    for line in tree.path("/etc/group").read_text().splitlines():
        name, _, _, members = line.split(":")
        out[name] = [m for m in members.split(",") if m]
    return out


# ---------------------------------------------------------------- build and lint


@pytest.fixture(scope="module")
def out() -> Iterator[Path]:
    for stale in ("src", "root", "upgrade"):
        if (OUT / stale).exists():
            for mount in (OUT / stale / "proc",):
                if os.path.ismount(mount):
                    run(["umount", str(mount)])
            shutil.rmtree(OUT / stale)
    for deb in OUT.glob("*.deb"):
        deb.unlink()
    OUT.mkdir(parents=True, exist_ok=True)
    yield OUT
    (OUT / "report.json").write_text(json.dumps(REPORT, indent=1) + "\n")


@pytest.fixture(scope="module")
def debs(out: Path) -> dict[str, Path]:
    """Build both packages from a copy of the checkout (tracked and new files)."""
    src = out / "src"
    files = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                cwd=REPO).stdout.split("\0")
    for name in filter(None, files):
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        origin = REPO / name
        if origin.is_symlink():
            target.symlink_to(os.readlink(origin))
        elif origin.is_file():
            shutil.copy2(origin, target)
    started = time.monotonic()
    run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, env=system_env(),
        log=out / "build.log")
    REPORT["build_seconds"] = round(time.monotonic() - started, 1)
    found = {"fedd": next(out.glob(f"fedd_{__version__}_*.deb")),
             "fedd-hub": next(out.glob(f"fedd-hub_{__version__}_all.deb"))}
    REPORT["packages"] = {
        name: {"file": deb.name, "bytes": deb.stat().st_size,
               "installed_kib": int(run(["dpkg-deb", "-f", str(deb), "Installed-Size"]).stdout),
               "depends": run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout.strip()}
        for name, deb in found.items()}
    return found


def test_build_makes_both_packages(debs):
    for name, deb in debs.items():
        control = run(["dpkg-deb", "-f", str(deb), "Package", "Version"]).stdout
        assert f"Package: {name}" in control
        assert f"Version: {__version__}" in control
    fedd = run(["dpkg-deb", "-f", str(debs["fedd"]), "Depends"]).stdout
    assert "python3.11" in fedd or re.search(r"python3\.\d+", fedd)
    assert "adduser" in fedd
    assert "libtss2-esys" in fedd  # tpm2-pytss links Debian's TSS (which brings tpm-udev)
    hub = run(["dpkg-deb", "-f", str(debs["fedd-hub"]), "Depends"]).stdout
    assert f"fedd (>= {__version__})" in hub


def test_the_agent_package_carries_what_debian_12_lacks(debs):
    listing = run(["dpkg-deb", "-c", str(debs["fedd"])]).stdout
    site = "./usr/lib/fedd/lib/python3"
    for module in ("ai_edge_litert/", "paho/mqtt/", "numpy/", "cryptography/", "cbor2/",
                   "zstandard/", "prometheus_client/", "sdnotify/", "yaml/", "psutil/",
                   "tpm2_pytss/", "fedd/agent/", "fedd/trust/"):
        assert re.search(rf"{re.escape(site)}\.\d+/site-packages/{re.escape(module)}",
                         listing), module
    for path in ("./usr/bin/fedd -> ../lib/fedd/bin/fedd", "./usr/bin/fedd-provision",
                 "./usr/bin/fedd-enroll", "./usr/share/man/man1/fedd-enroll.1.gz",
                 "./etc/fedd/fedd.yaml", "./lib/systemd/system/fedd.service",
                 "./usr/share/fedd/models/manifest.json", "./usr/share/fedd/models/har-mlp.tflite",
                 "./usr/share/fedd/mosquitto/fedd-acl.in",
                 "./usr/share/fedd/mosquitto/fedd-broker.conf.in",
                 "./usr/share/man/man1/fedd.1.gz", "./usr/share/doc/fedd/operations.md",
                 "./usr/share/doc/fedd/examples/iio-buffered.conf",
                 "./usr/share/doc/fedd/examples/60-fedd-iio.rules"):
        assert path in listing, path
    assert "/pip/" not in listing and "__pycache__" not in listing
    conffiles = run(["dpkg-deb", "-I", str(debs["fedd"]), "conffiles"]).stdout.split()
    assert conffiles == ["/etc/fedd/fedd.yaml"]
    hub = run(["dpkg-deb", "-I", str(debs["fedd-hub"]), "conffiles"]).stdout.split()
    assert hub == ["/etc/fedd/hub.yaml"]


def test_lintian_reports_no_error_and_no_unjustified_warning(debs, out):
    result = run(["lintian", "--pedantic", "--display-info", "--show-overrides",
                  str(debs["fedd"]), str(debs["fedd-hub"])], check=False,
                 log=out / "lintian.txt")
    lines = [line for line in result.stdout.splitlines() if re.match(r"^[EWIPXO]: ", line)]
    counts: dict[str, int] = {}
    for line in lines:
        counts[line[0]] = counts.get(line[0], 0) + 1
    REPORT["lintian"] = {"counts": counts,
                         "not_overridden": [line for line in lines if line[0] in "EW"],
                         "overridden": sorted({" ".join(line.split()[1:3])
                                               for line in lines if line[0] == "O"})}
    assert [line for line in lines if line[0] in "EW"] == []
    for overrides in (REPO / "debian").glob("*.lintian-overrides"):
        lines = overrides.read_text().splitlines()
        for number, line in enumerate(lines):
            if line and not line.startswith("#"):
                above = number - 1  # skip the overrides of the same paragraph
                while above >= 0 and lines[above] and not lines[above].startswith("#"):
                    above -= 1
                assert above >= 0 and lines[above].startswith("#"), \
                    f"{overrides.name}:{number + 1}: an override without a reason above it"


# ---------------------------------------------------------------- install on a clean Debian 12


@pytest.fixture(scope="module")
def tree(out: Path) -> Iterator[Tree]:
    """A fresh Debian 12 (debootstrap, cached as a tarball) with Mosquitto, the site's broker."""
    CACHE.mkdir(parents=True, exist_ok=True)
    pristine = CACHE / f"{SUITE}.tar"
    if not pristine.exists():
        staging = CACHE / f"{SUITE}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        started = time.monotonic()
        run(["debootstrap", SUITE, str(staging), MIRROR], env=system_env(),
            log=CACHE / "debootstrap.log")
        REPORT["debootstrap_seconds"] = round(time.monotonic() - started, 1)
        run(["tar", "-C", str(staging), "-cf", str(pristine) + ".part", "."])
        os.replace(str(pristine) + ".part", pristine)
        shutil.rmtree(staging)
    root = out / "root"
    root.mkdir()
    with tarfile.open(pristine) as archive:
        archive.extractall(root, filter="fully_trusted")
    made = Tree(root)
    shutil.copy("/etc/resolv.conf", made.path("/etc/resolv.conf"))
    # Nothing installed in the chroot may start a daemon on this machine.
    made.path("/usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
    made.path("/usr/sbin/policy-rc.d").chmod(0o755)
    made.apt("update", log=out / "apt-update.log")
    # The site: its broker, and a software TPM standing in for the device's.
    made.apt("install --no-install-recommends mosquitto mosquitto-clients swtpm",
             log=out / "apt-site.log")
    try:
        yield made
    finally:
        made.umount_proc()


def packages(tree: Tree) -> set[str]:
    listed = tree.sh("dpkg-query -W -f='${db:Status-Abbrev} ${Package}\\n'").stdout
    return {line.split()[1] for line in listed.splitlines() if line.startswith("ii")}


@pytest.fixture(scope="module")
def clean_state(tree: Tree) -> dict[str, object]:
    return {"paths": tree.snapshot(), "users": users(tree), "groups": set(groups(tree)),
            "packages": packages(tree)}


@pytest.fixture(scope="module")
def installed(tree: Tree, debs, clean_state, out: Path) -> Tree:
    """`apt install ./fedd_*.deb`, then ./fedd-hub_*.deb, as an operator would."""
    assert clean_state["paths"]
    tmp = tree.path("/tmp/debs")
    tmp.mkdir()
    for deb in debs.values():
        shutil.copy(deb, tmp)
    started = time.monotonic()
    tree.sh(f"cd /tmp/debs && apt install -y -q ./{debs['fedd'].name}",
            log=out / "apt-install-fedd.log")
    REPORT["apt_install_fedd_seconds"] = round(time.monotonic() - started, 1)
    tree.sh(f"cd /tmp/debs && apt install -y -q ./{debs['fedd-hub'].name}",
            log=out / "apt-install-hub.log")
    return tree


def test_fedd_version_and_check_config_work(installed):
    version = installed.sh("fedd --version").stdout.strip()
    assert version == f"fedd {__version__}"
    checked = installed.sh("fedd check-config /etc/fedd/fedd.yaml")
    assert checked.stdout.strip() == "/etc/fedd/fedd.yaml: valid agent configuration"
    hub = installed.sh("fedd check-config /etc/fedd/hub.yaml")
    assert hub.stdout.strip() == "/etc/fedd/hub.yaml: valid hub configuration"
    bad = installed.sh("printf 'broker:\\n  port: 0\\n' > /tmp/bad.yaml; "
                       "fedd check-config /tmp/bad.yaml", check=False)
    assert bad.returncode == 78
    assert "/tmp/bad.yaml:2: broker.port" in bad.stderr
    assert "Provision a fleet for mutual TLS" in installed.sh("fedd-provision --help").stdout


def test_install_creates_users_state_and_enabled_units(installed):
    assert {"fedd", "fedd-hub"} <= users(installed)
    passwd = {line.split(":")[0]: line.split(":")
              for line in installed.path("/etc/passwd").read_text().splitlines()}
    for user, home in (("fedd", "/var/lib/fedd"), ("fedd-hub", "/var/lib/fedd-hub")):
        assert int(passwd[user][2]) < 1000, "not a system user"
        assert passwd[user][5] == home
        assert passwd[user][6] == "/usr/sbin/nologin"
        state = installed.path(home)
        assert state.is_dir()
        assert oct(state.stat().st_mode & 0o777) == "0o750"
        owner = installed.sh(f"stat -c %U:%G {home}").stdout.strip()
        assert owner == f"{user}:{user}"
    for unit in ("fedd.service", "fedd-hub.service"):
        wanted = installed.path(f"/etc/systemd/system/multi-user.target.wants/{unit}")
        assert wanted.is_symlink(), f"{unit} is not enabled"
    conffiles = installed.sh("dpkg-query -W -f='${Conffiles}' fedd fedd-hub").stdout
    assert "/etc/fedd/fedd.yaml" in conffiles and "/etc/fedd/hub.yaml" in conffiles
    assert installed.path("/etc/fedd/tls").is_dir()
    # Byte code compiled at installation: the service's read-only /usr needs it.
    assert list(installed.path("/usr/lib/fedd/lib").glob("python3*/site-packages/fedd/"
                                                         "__pycache__/cli.*.pyc"))


def test_the_packaged_runtime_trains_a_model(installed):
    """LiteRT, numpy and the shipped model as installed (the venv's libraries were stripped)."""
    script = (
        "import numpy as np\n"
        "from fedd.model import ModelSpec, TrainableModel\n"
        "spec = ModelSpec.from_manifest('/usr/share/fedd/models/manifest.json', 'har-mlp')\n"
        "model = TrainableModel(spec)\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.normal(size=(32, 96)).astype(np.float32)\n"
        "y = (np.arange(32) % 6).astype(np.int32)\n"
        "losses = [float(model.train_step(x, y, 0.1)) for _ in range(30)]\n"
        "assert losses[-1] < losses[0] / 2, losses\n"
        "assert np.linalg.inv(np.eye(3) * 2)[0, 0] == 0.5\n"
        "print('trained', losses[0], losses[-1])\n")
    installed.path("/tmp/train.py").write_text(script)
    result = installed.sh("/usr/lib/fedd/bin/python /tmp/train.py")
    assert "trained" in result.stdout


# ---------------------------------------------------------------- under systemd


@pytest.fixture(scope="module")
def booted(installed: Tree, debs, out: Path) -> Path:
    """Provision and configure a fleet in the tree, boot it, let the driver unit run it."""
    if shutil.which("systemd-nspawn") is None:
        pytest.skip("systemd-nspawn is not installed (Debian package systemd-container)")
    from fedd.datasets import hapt_person, save_stream

    srv = installed.path("/srv/fedd-pkgtest")
    (srv / "upgrade").mkdir(parents=True)
    save_stream(hapt_person(1), srv / "person-01.npz")
    for name in ("boot-check.sh", "enroll.sh", "prepare-fleet.sh", "configure.py",
                 "configure-trust.py"):
        shutil.copy(HERE / name, srv / name)
    installed.sh("sh /srv/fedd-pkgtest/prepare-fleet.sh", log=out / "prepare-fleet.log")
    installed.sh("/usr/lib/fedd/bin/python /srv/fedd-pkgtest/configure.py")
    installed.sh("fedd check-config /etc/fedd/fedd.yaml && fedd check-config /etc/fedd/hub.yaml")
    # A newer fedd for the upgrade step: the same files under a higher version.
    unpacked = out / "upgrade"
    run(["dpkg-deb", "-R", str(debs["fedd"]), str(unpacked)])
    control = unpacked / "DEBIAN" / "control"
    control.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {UPGRADE_VERSION}",
                              control.read_text()))
    run(["dpkg-deb", "-Zgzip", "-z1", "-b", str(unpacked),
         str(srv / "upgrade" / f"fedd_{UPGRADE_VERSION}.deb")])
    units = ("fedd-pkgtest.service", "fedd-pkgtest-enroll.service", "fedd-pkgtest-swtpm.service")
    for unit in units:
        shutil.copy(HERE / unit, installed.path("/etc/systemd/system/"))
    wanted = [installed.path(f"/etc/systemd/system/multi-user.target.wants/{unit}")
              for unit in units[:2]]
    for link, unit in zip(wanted, units, strict=False):
        link.symlink_to(f"/etc/systemd/system/{unit}")
    installed.path("/usr/sbin/policy-rc.d").unlink()
    installed.umount_proc()
    started = time.monotonic()
    result = run(["systemd-nspawn", "--quiet", "--register=no", "--keep-unit",
                  "--private-network", f"--directory={installed.root}", "--boot"],
                 env=system_env(), timeout=BOOT_TIMEOUT_S,
                 check=False, log=out / "boot-console.log")
    REPORT["boot_seconds"] = round(time.monotonic() - started, 1)
    for link in wanted:
        link.unlink()
    for unit in units:
        installed.path(f"/etc/systemd/system/{unit}").unlink()
    installed.path("/usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
    installed.path("/usr/sbin/policy-rc.d").chmod(0o755)
    results = srv / "results"
    shutil.copytree(results, out / "boot-results", dirs_exist_ok=True)
    assert (results / "steps.txt").is_file(), (
        f"the driver wrote no results (nspawn exited {result.returncode}); "
        f"see {out / 'boot-console.log'}")
    return results


def steps(results: Path) -> list[str]:
    return (results / "steps.txt").read_text().splitlines()


def shown(results: Path, name: str) -> dict[str, str]:
    lines = (results / f"show-{name}.txt").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def journal(results: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (results / "journal.json").read_text().splitlines()
            if line.strip()]


def test_the_units_are_enabled_and_the_fleet_works_under_systemd(booted):
    done = steps(booted)
    assert (booted / "enabled-fedd.txt").read_text().strip() == "enabled"
    assert (booted / "enabled-hub.txt").read_text().strip() == "enabled"
    for step in ("fedd.service started at boot", "fedd-hub.service started at boot",
                 "mosquitto started", "hub started", "agent started", "agent working",
                 "heartbeat heard", "done"):
        assert step in done, f"{step!r} missing: {done}\n{(booted / 'driver.log').read_text()}"
    for name in ("agent", "hub", "broker"):
        state = shown(booted, name)
        assert (state["ActiveState"], state["SubState"], state["NRestarts"]) == (
            "active", "running", "0"), (name, state)
    assert shown(booted, "agent")["StatusText"].startswith("version ")
    assert "updates accepted" in shown(booted, "hub")["StatusText"]
    status = json.loads((booted / "status.json").read_text())
    assert status["device"] == "pi-001"
    assert status["model_version"] >= 2 and status["acked"] >= 1
    assert "device        pi-001" in (booted / "fedd-status.txt").read_text()
    assert "device        pi-001" in (booted / "fedd-status-operator.txt").read_text()
    heartbeat = json.loads((booted / "heartbeat.json").read_text())
    assert heartbeat["device"] == "pi-001" and heartbeat["software"] == __version__


def test_the_agent_attests_with_its_tpm_and_signs_its_updates(booted):
    """fedd-enroll on the device and the hub, then trust.mode require with signatures."""
    done = steps(booted)
    for step in ("enrolled", "registered", "trust required", "agent working"):
        assert step in done, (step, (booted / "enroll.log").read_text())
    status = json.loads((booted / "status.json").read_text())
    assert status["trusted"] is True and status["trust_reason"] is None
    hub = json.loads((booted / "hub-status.json").read_text())
    assert hub["trust"]["mode"] == "require"
    assert hub["trust"]["verdicts"].get("trusted", 0) >= 1
    assert hub["accepted"] >= 2
    assert "measured the agent into PCR 23" in (booted / "journal.txt").read_text()


def test_the_agent_runs_sandboxed(booted):
    proc = dict(line.split(":\t", 1) for line in
                (booted / "agent-proc-status.txt").read_text().splitlines())
    assert int(proc["CapEff"], 16) == 0 and int(proc["CapBnd"], 16) == 0
    assert proc["NoNewPrivs"].strip() == "1"
    assert proc["Seccomp"].strip() == "2"  # a filter is installed
    mounts = dict(line.split() for line in (booted / "agent-mounts.txt").read_text().splitlines())
    assert mounts["/usr/lib/fedd"] == "ro"
    assert mounts["/sys/class"] == "ro"
    assert mounts["/home"] == "ro"
    assert mounts["/var/lib/fedd"] == "rw"
    # ConfigurationDirectory= makes /etc/fedd writable under ProtectSystem=strict;
    # ownership keeps the agent out: everything there is root's, the key root:fedd 0640.
    assert mounts["/etc/fedd"] == "rw"
    security = (booted / "security.txt").read_text()
    live = dict(re.findall(r"Overall exposure level for (\S+): (\d+\.\d+)", security))
    REPORT["exposure_live"] = live
    assert float(live["fedd.service"]) <= 2.5
    assert float(live["fedd-hub.service"]) <= 2.5


def test_logs_are_structured_journal_entries_without_secrets(booted, installed):
    entries = journal(booted)
    agent = [e for e in entries if e.get("_SYSTEMD_UNIT") == "fedd.service"
             and e.get("_TRANSPORT") == "journal"]
    hub = [e for e in entries if e.get("_SYSTEMD_UNIT") == "fedd-hub.service"
           and e.get("_TRANSPORT") == "journal"]
    assert agent and hub
    for entry in agent:
        assert entry["SYSLOG_IDENTIFIER"] == "fedd"
        assert (entry["FEDD_ROLE"], entry["FEDD_DEVICE"], entry["FEDD_FLEET"]) == (
            "agent", "pi-001", "pkgtest")
        assert entry["PRIORITY"] in {"2", "3", "4", "6", "7"}
        assert entry["CODE_FILE"].startswith("/usr/lib/fedd/")
    assert {e["SYSLOG_IDENTIFIER"] for e in hub} == {"fedd-hub"}
    assert {e["FEDD_ROLE"] for e in hub} == {"hub"}
    # The update and the version a line is about, for `journalctl FEDD_UPDATE_SEQ=…`.
    assert any("FEDD_UPDATE_SEQ" in e and "FEDD_MODEL_VERSION" in e for e in agent)
    assert any("FEDD_MODEL_VERSION" in e for e in hub)
    assert any("reloaded configuration" in e["MESSAGE"] for e in agent)
    everything = (booted / "journal.txt").read_text()
    key = installed.path("/root/pki/devices/pi-001/client.key").read_text()
    body = "".join(key.strip().splitlines()[1:-1])
    assert "PRIVATE KEY" not in everything and body[:32] not in everything
    assert "Traceback" not in everything
    assert "Error in cpuinfo" not in everything  # LiteRT's XNNPACK reads /proc/cpuinfo


def test_the_training_thread_gets_its_priority_back(booted):
    """LimitNICE=+10 lets the thread return from nice 19 to 10 without CAP_SYS_NICE.

    The container's systemd cannot raise RLIMIT_NICE above the hard limit
    it inherited; where that is below 10 (a Docker host: 0, without
    CAP_SYS_RESOURCE) the agent says so once, as documented, and keeps
    working. A real device's systemd sets the limit.
    """
    limits = (booted / "agent-limits.txt").read_text()
    soft = int(re.search(r"Max nice priority\s+(\d+)", limits).group(1))
    complaint = "keeps its training priority" in (booted / "journal.txt").read_text()
    REPORT["agent_rlimit_nice"] = soft
    if soft >= 10:
        assert not complaint
    else:
        host_hard = int(run(["prlimit", "--nice", "--noheadings", "--output=HARD"]
                            ).stdout.split()[0])
        assert host_hard < 10, "systemd should have set RLIMIT_NICE 10"
        assert complaint


def test_a_frozen_agent_is_killed_by_the_watchdog_and_restarted(booted):
    done = steps(booted)
    assert "agent frozen" in done and "agent running again after the watchdog" in done
    assert int(shown(booted, "after-watchdog")["NRestarts"]) >= 1
    text = (booted / "journal.txt").read_text()
    assert re.search(r"fedd\.service: Watchdog timeout \(limit 4s\)", text)
    assert "fedd.service: Failed with result 'watchdog'" in text


def test_an_upgrade_restarts_the_agent_and_keeps_the_operators_config(booted):
    done = steps(booted)
    assert "upgraded" in done, (booted / "upgrade.log").read_text()
    assert (booted / "version-after-upgrade.txt").read_text().strip() == UPGRADE_VERSION
    assert (booted / "conffile-before-upgrade.txt").read_text() == \
        (booted / "conffile-after-upgrade.txt").read_text()
    assert not [n for n in (booted / "etc-after-upgrade.txt").read_text().split()
                if "dpkg" in n]
    assert "agent restarted by the upgrade" in done
    assert "agent working after the upgrade" in done


def test_stop_is_clean(booted):
    for name in ("stopped", "hub-stopped"):
        state = shown(booted, name)
        assert (state["ActiveState"], state["Result"], state["ExecMainStatus"]) == (
            "inactive", "success", "0"), state
    text = (booted / "journal.txt").read_text()
    assert "agent pi-001 stopped cleanly" in text


# ---------------------------------------------------------------- remove and purge


@pytest.fixture(scope="module")
def removed(installed: Tree, booted: Path) -> Tree:
    """Removed in the booted system, by the driver, while both services ran."""
    status = (booted / "status-after-remove.txt").read_text().split()
    assert status == ["rc", "rc"], (booted / "remove.log").read_text()
    return installed


def test_remove_stops_the_services(booted, removed):
    done = steps(booted)
    assert "agent running before removal" in done and "removed" in done
    assert "no fedd process after removal" in done
    assert "no fedd-hub process after removal" in done


def test_remove_keeps_config_and_state(removed):
    assert not removed.path("/usr/lib/fedd").exists()
    assert not removed.path("/usr/bin/fedd").exists()
    assert not removed.path("/lib/systemd/system/fedd.service").exists()
    assert removed.path("/etc/fedd/fedd.yaml").read_text().startswith(
        "# fedd.yaml as the packaging test's operator edited it")
    assert removed.path("/etc/fedd/hub.yaml").exists()
    assert removed.path("/var/lib/fedd/agent.sqlite").exists()
    assert {"fedd", "fedd-hub"} <= users(removed)


@pytest.fixture(scope="module")
def purged(removed: Tree, out: Path) -> Tree:
    removed.apt("purge fedd-hub fedd", log=out / "apt-purge.log")
    # The dependencies apt pulled in for fedd (python3.11, …) go too.
    removed.apt("-o APT::AutoRemove::RecommendsImportant=false "
                "-o APT::AutoRemove::SuggestsImportant=false autoremove --purge",
                log=out / "apt-autoremove.log")
    return removed


# What the test's operator made for the site's broker and its test account:
# not the packages' to remove.
OPERATORS_OWN = ("/etc/mosquitto/fedd", "/etc/systemd/system/mosquitto.service.d",
                 "/var/lib/mosquitto/mosquitto.db", "/etc/subuid-", "/etc/subgid-",
                 "/var/lib/fedd-pkgtest-swtpm")


def test_purge_leaves_nothing_behind(purged, clean_state):
    assert packages(purged) == clean_state["packages"]
    new = sorted(purged.snapshot() - clean_state["paths"])
    left = [p for p in new if not p.startswith(OPERATORS_OWN)]
    REPORT["left_after_purge"] = left
    assert left == []
    # tpm-udev (pulled in by Debian's TSS libraries) makes user and group tss and,
    # as Debian packages do, keeps them when purged; fedd's own are gone.
    assert users(purged) - clean_state["users"] <= {"tss"}
    assert set(groups(purged)) - clean_state["groups"] <= {"tss"}
    assert not {"fedd", "fedd-hub"} & (users(purged) | set(groups(purged)))
    for name in ("/etc/fedd", "/var/lib/fedd", "/var/lib/fedd-hub", "/usr/lib/fedd",
                 "/usr/share/fedd", "/usr/share/doc/fedd"):
        assert not purged.path(name).exists(), name
    status = purged.sh("dpkg-query -W -f='${db:Status-Abbrev}' fedd fedd-hub 2>&1",
                       check=False).stdout
    assert "ii" not in status and "rc" not in status
