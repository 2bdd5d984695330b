"""Link emulation for tests and benchmarks: a device behind a narrow, lossy, slow link.

A `Namespace` is a private Linux network namespace joined to the root
namespace by a veth pair with a /30 on it (10.231.0.0/16, one free /30 per
instance). Processes started with `run_in` live inside it and see only the
veth peer (no default route), so an agent there reaches a broker that
listens in the root namespace on `Namespace.root_ip` and nothing else.

    with Namespace() as ns:
        ns.shape(Shape(rate_bps=64_000))            # tbf, both directions
        ns.set_loss(5.0)                           # nftables, both directions
        agent = ns.run([sys.executable, "-m", "fedd.cli", "agent", "-c", cfg])
        with ns.outage():                          # 100 % loss for a while
            ...

Directions are the device's: UP is namespace → root (the device's uplink),
DOWN is root → namespace.

- Rate: a `tc tbf` qdisc on the sending end's egress (the namespace's veth for
  UP, the root's veth for DOWN). GSO is switched off on both ends
  (`gso_max_segs 1`) so every packet is one wire-sized frame for tbf and loss.
- Loss: an nftables `netdev` table with an ingress chain on the *receiving*
  end (`numgen random mod 10000 < p·100 drop`): for DOWN in the namespace on
  its veth, for UP in the root namespace on the root veth. A drop at the
  receiver is what a lost frame on the wire looks like to both ends; a drop
  in the sender's output or egress path is reported back to the sender's
  stack as local congestion (TCP retries at once, UDP sees ENOBUFS), which is
  not loss. Only IPv4/IPv6 frames are dropped, never ARP.
- Delay: the kernel here has no `netem`, so `DelayProxy` is a small userspace
  TCP proxy that holds every chunk for a fixed one-way delay.

Everything goes through `ip`, `tc` and `nft` (Debian: iproute2, nftables),
needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and is checked: a failing command
raises `LinkEmuError` with the command and its stderr. `close()` tears down
every piece even after errors, may be called any number of times, and
`remove_stale()` clears what a crashed run left behind. This module is for
tests and benchmarks only; the agent runtime never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "DelayProxy",
    "Direction",
    "LinkEmuError",
    "LossCount",
    "Namespace",
    "Shape",
    "can_create_namespaces",
    "remove_stale",
    "run_in",
]

NAME_PREFIX = "fedd-t"  # namespaces: fedd-t<pid>-<n>
LINK_PREFIX = "fdt"  # veth ends: fdt<pid>-<n>r (root side), fdt<pid>-<n>n (namespace side)
TABLE_PREFIX = "fedd_t"  # root-side nftables table: netdev fedd_t<pid>_<n>
NS_TABLE = "fedd_loss"  # namespace-side nftables table (dies with the namespace)
SUBNET_POOL = ipaddress.IPv4Network("10.231.0.0/16")
IFNAMSIZ = 15  # usable characters in a Linux interface name
TOOL_TIMEOUT_S = 15.0
STOP_GRACE_S = 3.0
LOSS_SCALE = 10_000  # loss resolution: 0.01 %
ETH_FRAME = 1514  # bytes of a full-size Ethernet frame on a 1500-byte MTU veth
INSTALL_HINT = "apt-get install iproute2 nftables"

_NS_RE = re.compile(rf"^{re.escape(NAME_PREFIX)}(\d+)-(\d+)$")
_LINK_RE = re.compile(rf"^{re.escape(LINK_PREFIX)}(\d+)-(\d+)[rn]$")
_TABLE_RE = re.compile(rf"^{re.escape(TABLE_PREFIX)}(\d+)_(\d+)$")


class LinkEmuError(RuntimeError):
    """A link-emulation command failed; the message holds the command and its stderr."""


class Direction(enum.Flag):
    """Which way traffic flows, seen from the device in the namespace."""

    UP = enum.auto()  # namespace → root namespace (the device's uplink)
    DOWN = enum.auto()  # root namespace → namespace
    BOTH = UP | DOWN


@dataclass(frozen=True)
class Shape:
    """A tbf rate limit: `rate_bps` bits/s, a `burst_bytes` bucket, `latency_s` of queue."""

    rate_bps: int
    burst_bytes: int | None = None  # None: max(2 full frames, 20 ms at the rate)
    latency_s: float = 0.2  # longest a packet may wait in the queue before tbf drops it

    def __post_init__(self) -> None:
        if self.rate_bps < 8:
            raise ValueError(f"rate_bps must be at least 8 bit/s, got {self.rate_bps}")
        if self.burst_bytes is not None and self.burst_bytes < ETH_FRAME:
            raise ValueError(f"burst_bytes must hold one full frame ({ETH_FRAME} bytes), "
                             f"got {self.burst_bytes}")
        if not 0.0 < self.latency_s <= 60.0:
            raise ValueError(f"latency_s must be in (0, 60], got {self.latency_s}")

    @property
    def burst(self) -> int:
        """The bucket size in bytes that tbf gets."""
        if self.burst_bytes is not None:
            return self.burst_bytes
        return max(2 * ETH_FRAME, self.rate_bps // 8 // 50)

    def tc_args(self) -> list[str]:
        """The `tbf …` part of a `tc qdisc` command."""
        return ["tbf", "rate", f"{self.rate_bps}bit", "burst", str(self.burst),
                "latency", f"{max(1, round(self.latency_s * 1000))}ms"]


@dataclass(frozen=True)
class LossCount:
    """Frames the loss rule of one direction let `passed` or `dropped` since it was last set."""

    passed: int
    dropped: int

    @property
    def rate(self) -> float:
        """The dropped fraction (0.0 when nothing went through)."""
        total = self.passed + self.dropped
        return self.dropped / total if total else 0.0


# ---------------------------------------------------------------- commands


def _which(tool: str) -> str | None:
    """`tool` on PATH or in the sbin folders (often missing from a user's PATH)."""
    found = shutil.which(tool)
    if found:
        return found
    for folder in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        path = Path(folder) / tool
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def _tool(tool: str) -> str:
    path = _which(tool)
    if path is None:
        raise LinkEmuError(f"`{tool}` not found; install it with: {INSTALL_HINT}")
    return path


def _run(argv: Sequence[str], *, stdin: str | None = None,
         ok_if: Sequence[str] = (), timeout: float = TOOL_TIMEOUT_S) -> str:
    """Run one tool command and return its stdout.

    A non-zero exit raises `LinkEmuError`, unless its stderr contains one of
    `ok_if` (how idempotent deletes accept "already gone").
    """
    command = [_tool(argv[0]), *argv[1:]]
    shown = " ".join(argv)
    try:
        done = subprocess.run(command, input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=None if stdin is not None
                              else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise LinkEmuError(f"`{shown}` did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        if any(marker in done.stderr for marker in ok_if):
            return ""
        detail = done.stderr.strip() or done.stdout.strip() or "(no output)"
        if stdin:
            detail += f"\n--- input ---\n{stdin.rstrip()}"
        raise LinkEmuError(f"`{shown}` failed with exit code {done.returncode}: {detail}")
    return done.stdout


GONE = ("No such file or directory", "Cannot find device", "does not exist",
        "Cannot delete qdisc with handle of zero", "Invalid handle")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_names() -> list[str]:
    out = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(name: str) -> list[int]:
    out = _run(["ip", "netns", "pids", name], ok_if=GONE)
    return [int(word) for word in out.split() if word.isdigit()]


def _kill_all(pids: Sequence[int], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM, then SIGKILL whatever still runs after `grace_s`."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_pid_alive(pid) for pid in pids):
        time.sleep(0.02)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_in(namespace: Namespace | str, argv: Sequence[str],
           **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """Start `argv` inside the namespace (`ip netns exec NAME …`); the Popen is the process.

    `ip netns exec` execs the command, so `popen.pid` is the command's own pid.
    Keyword arguments go to `subprocess.Popen` (stdout, env, cwd, text, …);
    stdin defaults to /dev/null. A `Namespace` also tracks the process and
    stops it in `close()`; with a bare name, stopping it is the caller's job.
    """
    if isinstance(namespace, Namespace):
        return namespace.run(argv, **popen_kwargs)
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen([_tool("ip"), "netns", "exec", namespace, *argv], **popen_kwargs)


# ---------------------------------------------------------------- namespace


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network on an interface or in a route of the root namespace."""
    nets: list[ipaddress.IPv4Network] = []
    for entry in json.loads(_run(["ip", "-j", "-4", "addr", "show"]) or "[]"):
        for info in entry.get("addr_info", []):
            with contextlib.suppress(KeyError, ValueError):
                nets.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}",
                                                  strict=False))
    for route in json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "all"]) or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32",
                                                  strict=False))
    return nets


def _free_subnet(seed: int) -> ipaddress.IPv4Network:
    """A /30 of SUBNET_POOL that overlaps nothing in the root namespace, starting at `seed`."""
    subnets = list(SUBNET_POOL.subnets(new_prefix=30))
    used = _used_networks()
    for step in range(len(subnets)):
        candidate = subnets[(seed + step) % len(subnets)]
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise LinkEmuError(f"no free /30 left in {SUBNET_POOL}")


class Namespace:
    """A network namespace behind a veth pair, with shaping, loss and outages on that link.

    `with Namespace() as ns:` creates it; `ns.root_ip` is the root side's
    address (where a broker listens), `ns.ns_ip` the namespace side's.
    Leaving the block (or `close()`) stops every process inside and removes
    the namespace, the veth pair with its qdiscs and both nftables tables.
    """

    _counter = 0
    _counter_lock = threading.Lock()

    def __init__(self, *, subnet: str | None = None) -> None:
        """`subnet`: a /30 (or wider) IPv4 network to use; default: a free /30 of 10.231/16."""
        with Namespace._counter_lock:
            pid = os.getpid()
            while True:
                n = Namespace._counter
                Namespace._counter = (n + 1) % 1000
                tag = f"{pid}-{n}"
                if f"{NAME_PREFIX}{tag}" not in _netns_names():
                    break
        self.pid, self.index = pid, n
        self.name = f"{NAME_PREFIX}{tag}"
        self.root_dev = f"{LINK_PREFIX}{tag}r"
        self.ns_dev = f"{LINK_PREFIX}{tag}n"
        self.root_table = f"{TABLE_PREFIX}{pid}_{n}"
        if len(self.root_dev) > IFNAMSIZ:
            raise LinkEmuError(f"interface name {self.root_dev!r} is longer than {IFNAMSIZ}")
        self._subnet_arg = ipaddress.IPv4Network(subnet) if subnet else None
        self.subnet: ipaddress.IPv4Network | None = None
        self.root_ip = ""
        self.ns_ip = ""
        self._processes: list[subprocess.Popen[Any]] = []
        self._loss = {Direction.UP: 0.0, Direction.DOWN: 0.0}
        self._shape: dict[Direction, Shape | None] = {Direction.UP: None, Direction.DOWN: None}
        self._link_up = True
        self._created = False

    def __repr__(self) -> str:
        return (f"Namespace({self.name!r}, root {self.root_ip or '?'} on {self.root_dev}, "
                f"ns {self.ns_ip or '?'} on {self.ns_dev})")

    # -------------------------------------------------------- lifecycle

    def create(self) -> Namespace:
        """Create the namespace, the veth pair, the addresses and empty loss tables."""
        if self._created:
            return self
        self._created = True  # from here on, close() has something to undo
        try:
            self._create()
        except BaseException:
            with contextlib.suppress(LinkEmuError):
                self.close()
            raise
        return self

    def _create(self) -> None:
        subnet = self._subnet_arg or _free_subnet(self.pid * 7919 + self.index)
        hosts = list(subnet.hosts())
        if len(hosts) < 2:
            raise LinkEmuError(f"subnet {subnet} has fewer than two host addresses")
        self.subnet = subnet
        self.root_ip, self.ns_ip = str(hosts[0]), str(hosts[1])
        prefix = subnet.prefixlen
        _run(["ip", "netns", "add", self.name])
        _run(["ip", "link", "add", self.root_dev, "type", "veth", "peer", "name", self.ns_dev])
        _run(["ip", "link", "set", self.ns_dev, "netns", self.name])
        for ip_prefix, dev, addr in ((["ip"], self.root_dev, self.root_ip),
                                     (["ip", "-n", self.name], self.ns_dev, self.ns_ip)):
            # One wire-sized frame per packet (no GSO super-packets through tbf and the
            # loss rule) and no IPv6 link-local chatter on the link.
            _run([*ip_prefix, "link", "set", dev, "gso_max_segs", "1", "gso_max_size", "1500",
                  "addrgenmode", "none"])
            _run([*ip_prefix, "addr", "add", f"{addr}/{prefix}", "dev", dev])
            _run([*ip_prefix, "link", "set", dev, "up"])
        _run(["ip", "-n", self.name, "link", "set", "lo", "up"])
        self._apply_loss(Direction.BOTH)

    def close(self) -> None:
        """Stop the processes inside, remove tables, veth (and its qdiscs), namespace.

        Every step runs even when an earlier one failed; the first failure is
        raised at the end. Safe to call again, and after a partial `create()`.
        """
        if not self._created:
            return
        errors: list[BaseException] = []
        steps = (
            self._stop_processes,
            lambda: _run(["nft", "delete", "table", "netdev", self.root_table], ok_if=GONE),
            lambda: _run(["ip", "netns", "exec", self.name, "nft", "delete", "table", "netdev",
                          NS_TABLE], ok_if=(*GONE, "Cannot open network namespace")),
            lambda: _run(["ip", "link", "del", self.root_dev], ok_if=GONE),
            lambda: _run(["ip", "netns", "del", self.name], ok_if=GONE),
        )
        for step in steps:
            try:
                step()
            except (LinkEmuError, OSError) as exc:
                errors.append(exc)
        self._created = False
        if errors:
            raise LinkEmuError(f"teardown of {self.name} was incomplete: "
                               + "; ".join(str(e) for e in errors)) from errors[0]

    def _stop_processes(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        pids = [p.pid for p in self._processes if p.poll() is None]
        if self.name in _netns_names():
            pids += [pid for pid in _netns_pids(self.name) if pid not in pids]
        _kill_all(pids)
        for process in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(STOP_GRACE_S)
        self._processes.clear()

    def __enter__(self) -> Namespace:
        return self.create()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -------------------------------------------------------- processes

    def run(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside this namespace (see `run_in`); `close()` stops it."""
        self._require()
        process = run_in(self.name, argv, **popen_kwargs)
        self._processes.append(process)
        return process

    def check_output(self, argv: Sequence[str], *, timeout: float = TOOL_TIMEOUT_S) -> str:
        """Run a short command inside the namespace to completion; its stdout, or raise."""
        self._require()
        return _run(["ip", "netns", "exec", self.name, *argv], timeout=timeout)

    def pids(self) -> list[int]:
        """Every process living in the namespace now."""
        self._require()
        return _netns_pids(self.name)

    # -------------------------------------------------------- shaping

    def shape(self, shape: Shape | None, direction: Direction = Direction.BOTH) -> None:
        """Rate-limit `direction` with tbf (replacing any previous shape); None: unlimited."""
        self._require()
        for one in _each(direction):
            prefix = ["tc", "-n", self.name] if one is Direction.UP else ["tc"]
            dev = self.ns_dev if one is Direction.UP else self.root_dev
            if shape is None:
                _run([*prefix, "qdisc", "del", "dev", dev, "root"], ok_if=GONE)
            else:
                _run([*prefix, "qdisc", "replace", "dev", dev, "root", *shape.tc_args()])
            self._shape[one] = shape

    def shaping(self, direction: Direction) -> Shape | None:
        """The shape in force in one direction (UP or DOWN)."""
        return self._shape[_single(direction)]

    def set_loss(self, percent: float, direction: Direction = Direction.BOTH) -> None:
        """Drop `percent` % of IP frames at random in `direction` (0 to 100, step 0.01).

        Replaces the rule atomically, which also resets that direction's counters.
        """
        if not 0.0 <= percent <= 100.0:
            raise ValueError(f"loss must be within 0 to 100 %, got {percent}")
        self._require()
        for one in _each(direction):
            self._loss[one] = float(percent)
        self._apply_loss(direction)

    def loss(self, direction: Direction) -> float:
        """The loss in percent in force in one direction (UP or DOWN)."""
        return self._loss[_single(direction)]

    def loss_count(self, direction: Direction) -> LossCount:
        """Frames passed and dropped by one direction's loss rule since it was last set."""
        one = _single(direction)
        self._require()
        family_table = ["netdev", self.root_table if one is Direction.UP else NS_TABLE]
        argv = ["nft", "-j", "list", "table", *family_table]
        if one is Direction.DOWN:
            argv = ["ip", "netns", "exec", self.name, *argv]
        counts = {"accept": 0, "drop": 0}
        for item in json.loads(_run(argv)).get("nftables", []):
            rule = item.get("rule")
            if not rule:
                continue
            packets = verdict = None
            for expr in rule.get("expr", []):
                if "counter" in expr:
                    packets = int(expr["counter"]["packets"])
                for word in counts:
                    if word in expr:
                        verdict = word
            if packets is not None and verdict is not None:
                counts[verdict] += packets
        return LossCount(passed=counts["accept"], dropped=counts["drop"])

    def _apply_loss(self, direction: Direction) -> None:
        for one in _each(direction):
            threshold = round(self._loss[one] * LOSS_SCALE / 100)
            if one is Direction.UP:
                table, dev, argv = self.root_table, self.root_dev, ["nft", "-f", "-"]
            else:
                table, dev = NS_TABLE, self.ns_dev
                argv = ["ip", "netns", "exec", self.name, "nft", "-f", "-"]
            ip_only = "meta protocol { ip, ip6 }"
            drop = ""
            if threshold >= LOSS_SCALE:
                drop = f"{ip_only} counter drop"
            elif threshold > 0:
                drop = f"{ip_only} numgen random mod {LOSS_SCALE} < {threshold} counter drop"
            # add + delete + define in one transaction: an atomic replace that also works
            # when the table does not exist yet.
            script = "\n".join([
                f"add table netdev {table}",
                f"delete table netdev {table}",
                f"table netdev {table} {{",
                "  chain loss {",
                f'    type filter hook ingress device "{dev}" priority 0; policy accept;',
                f"    {drop}" if drop else "",
                f"    {ip_only} counter accept",
                "  }",
                "}",
                "",
            ])
            _run(argv, stdin=script)

    def set_link(self, up: bool) -> None:
        """Take the veth pair administratively down (carrier lost on both ends) or up again.

        Down is a hard outage that the stacks see at once (routes go, sends fail);
        `outage()` is the silent kind, where packets just vanish.
        """
        self._require()
        _run(["ip", "link", "set", self.root_dev, "up" if up else "down"])
        self._link_up = up

    @property
    def link_up(self) -> bool:
        return self._link_up

    @contextlib.contextmanager
    def outage(self, direction: Direction = Direction.BOTH) -> Iterator[None]:
        """A silent outage: 100 % loss in `direction` inside the block, then the loss before."""
        before = dict(self._loss)
        self.set_loss(100.0, direction)
        try:
            yield
        finally:
            for one in _each(direction):
                self.set_loss(before[one], one)

    def _require(self) -> None:
        if not self._created:
            raise LinkEmuError(f"namespace {self.name} is not created (use `with Namespace()`)")


def _each(direction: Direction) -> list[Direction]:
    ones = [one for one in (Direction.UP, Direction.DOWN) if one in direction]
    if not ones:
        raise ValueError(f"no direction in {direction!r}")
    return ones


def _single(direction: Direction) -> Direction:
    if direction not in (Direction.UP, Direction.DOWN):
        raise ValueError(f"expected Direction.UP or Direction.DOWN, got {direction!r}")
    return direction


# ---------------------------------------------------------------- machine checks


@functools.cache
def can_create_namespaces() -> str | None:
    """None when namespaces, veth, tbf and netdev nftables work here, else why not.

    The answer is a real probe (a throwaway namespace with a shaped, lossy
    veth, removed again), made once per process: a reason for `pytest.skip`.
    """
    if os.geteuid() != 0:
        return "link emulation needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    missing = [tool for tool in ("ip", "tc", "nft") if _which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found; install them with: {INSTALL_HINT}"
    try:
        with Namespace() as probe:
            probe.shape(Shape(rate_bps=64_000))
            probe.set_loss(5.0)
    except LinkEmuError as exc:
        return f"the kernel refused link emulation: {exc}"
    except OSError as exc:
        return f"link emulation failed: {exc}"
    return None


def remove_stale(*, everything: bool = False) -> list[str]:
    """Remove namespaces, veths and nftables tables left by runs that died; what was removed.

    A leftover belongs to a dead run when the pid in its name no longer
    exists; `everything=True` also removes those of live processes (other
    test runs on this machine included: use it by hand only).
    """
    removed: list[str] = []

    def stale(match: re.Match[str] | None) -> bool:
        return bool(match) and (everything or not _pid_alive(int(match.group(1))))

    for name in _netns_names():
        if stale(_NS_RE.match(name)):
            _kill_all(_netns_pids(name))
            _run(["ip", "netns", "del", name], ok_if=GONE)
            removed.append(f"netns {name}")
    for entry in json.loads(_run(["ip", "-j", "link", "show"]) or "[]"):
        name = entry.get("ifname", "")
        if stale(_LINK_RE.match(name)):
            _run(["ip", "link", "del", name], ok_if=GONE)
            removed.append(f"link {name}")
    for line in _run(["nft", "list", "tables"]).splitlines():
        words = line.split()
        if len(words) == 3 and words[1] == "netdev" and stale(_TABLE_RE.match(words[2])):
            _run(["nft", "delete", "table", "netdev", words[2]], ok_if=GONE)
            removed.append(f"nft table netdev {words[2]}")
    return removed


# ---------------------------------------------------------------- delay


class DelayProxy:
    """A TCP proxy that forwards each chunk `delay_s` after it arrived, in both directions.

    Userspace, because this kernel has no `netem`. Clients connect to
    `address` (listen on a Namespace's `root_ip` to delay a device's link)
    and are relayed to `target`. Order and throughput are kept; only latency
    is added (every byte arrives `delay_s` later, a round trip 2 x `delay_s`).
    It terminates TCP on both sides, so it delays the application's data and
    not TCP's own handshake or acknowledgements: connect() returns at once,
    the first exchange of bytes pays the delay. Memory is bounded by
    `max_chunks` buffered reads per direction.
    """

    CHUNK = 65536

    def __init__(self, target: tuple[str, int], delay_s: float, *,
                 listen: tuple[str, int] = ("127.0.0.1", 0), max_chunks: int = 256,
                 connect_timeout_s: float = 10.0) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.target = target
        self.delay_s = delay_s
        self.listen = listen
        self.max_chunks = max_chunks
        self.connect_timeout_s = connect_timeout_s
        self.address: tuple[str, int] = listen
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, timeout_s: float = 10.0) -> DelayProxy:
        """Listen (in a background thread with its own event loop); returns self."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="delay-proxy", daemon=True)
        self._thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(
                asyncio.start_server(self._serve, *self.listen), loop).result(timeout_s)
        except BaseException:
            self.close()
            raise
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = (host, port)
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop listening, cut every relayed connection, stop the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout_s)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = self._server = None

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    async def _serve(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        server_w: asyncio.StreamWriter | None = None
        try:
            server_r, server_w = await asyncio.wait_for(
                asyncio.open_connection(*self.target), self.connect_timeout_s)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._relay(client_r, server_w))
                group.create_task(self._relay(server_r, client_w))
        except* (OSError, TimeoutError):
            pass  # a reset or refused side ends the pair; the other is closed below
        finally:
            for writer in (client_w, server_w):
                if writer is not None:
                    writer.close()
            self._tasks.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(self.max_chunks)

        async def receive() -> None:
            while True:
                data = await reader.read(self.CHUNK)
                await queue.put((loop.time() + self.delay_s, data))
                if not data:
                    return

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:  # the sender half-closed: pass the EOF on, in order
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        async with asyncio.TaskGroup() as group:
            group.create_task(receive())
            group.create_task(deliver())
