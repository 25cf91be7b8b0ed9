"""Node telemetry: memory, interfaces, system facts, and link probes.

Theory of operation
-------------------
``gather_info`` measures this host (blocking: it may run ``vm_stat``,
``sysctl`` and ``networksetup`` on macOS, read sysfs on Linux); the
``Telemetry`` task runs it in a worker thread every interval under a timeout
and feeds the result to the node as ``InfoObserved``. ``LinkProber`` probes
every address each peer advertises (HTTP ``GET /node_id`` on the peer's API
port, answered with the peer's id as a JSON string) and feeds ``LinkProbed``.

Both run beside inference and can never stall or crash it: every blocking
call is in a thread with a timeout, every exception is caught and logged
(rate-limited), and a failed measurement simply leaves the previous one in
force.

The parsers (``parse_vm_stat``, ``parse_hardware_ports``, ``parse_sysctl``)
are pure functions over command output, tested on recorded outputs from real
Macs (tests/runtime/data).

Kinds: on macOS a hardware port ("Thunderbolt Bridge", "Thunderbolt 1",
"Wi-Fi", "Ethernet") decides; on Linux sysfs does (``wireless/`` means Wi-Fi,
a backing ``device`` with ARP type 1 means Ethernet, tun/WireGuard/Tailscale
interfaces stay "unknown"). A VPN is recognised by address in the core
(``skulk.core.interconnect``), whatever the interface.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import psutil

from skulk.core.inputs import InfoObserved, Input, LinkProbed
from skulk.core.instances import LinkKind
from skulk.core.interconnect import classify_interface, usable_address
from skulk.core.telemetry import Memory, MemoryInfo, NetworkInfo, NetworkInterface, NodeIdentity, SystemInfo

__all__ = [
    "parse_vm_stat",
    "gpu_wireable_bytes",
    "parse_hardware_ports",
    "parse_sysctl",
    "linux_interface_kind",
    "memory_info",
    "network_info",
    "system_info",
    "gather_info",
    "Telemetry",
    "LinkProber",
    "probe_node_id",
]

log = logging.getLogger("skulk.telemetry")

_COMMAND_TIMEOUT_S = 5.0


# --- pure parsers ------------------------------------------------------------------------


def parse_vm_stat(text: str) -> tuple[int, dict[str, int]]:
    """``vm_stat`` output -> (page size in bytes, {statistic: pages}).

    Keys are the statistic names as printed, lower-cased, without quotes
    (``"pages wired down"``, ``"anonymous pages"``, ``"pages occupied by
    compressor"``).
    """
    match = re.search(r"page size of (\d+) bytes", text)
    if match is None:
        raise ValueError("vm_stat output has no page size line")
    page = int(match.group(1))
    stats: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        name, sep, value = line.rpartition(":")
        value = value.strip().rstrip(".")
        if not sep or not value.isdigit():
            continue
        stats[name.strip().strip('"').lower()] = int(value)
    assert page > 0
    return page, stats


def gpu_wireable_bytes(total_bytes: int, vm_stat_text: str) -> int:
    """GPU-wireable memory on macOS: total - wired - anonymous - compressor pages.

    File-backed cache is reclaimable, so free RAM understates what Metal can
    wire; wired, anonymous and compressed pages are what it cannot take.
    """
    page, stats = parse_vm_stat(vm_stat_text)
    needed = ("pages wired down", "anonymous pages", "pages occupied by compressor")
    missing = [k for k in needed if k not in stats]
    if missing:
        raise ValueError(f"vm_stat output lacks {missing}")
    used = sum(stats[k] for k in needed) * page
    return max(0, total_bytes - used)


def parse_hardware_ports(text: str) -> dict[str, str]:
    """``networksetup -listallhardwareports`` -> {device: hardware port name}."""
    ports: dict[str, str] = {}
    port: str | None = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Hardware Port:"):
            port = line.split(":", 1)[1].strip()
        elif line.startswith("Device:") and port is not None:
            device = line.split(":", 1)[1].strip()
            if device:
                ports[device] = port
            port = None
    return ports


def parse_sysctl(text: str) -> dict[str, str]:
    """``sysctl key1 key2 ...`` output (``key: value`` lines) -> {key: value}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


_ARPHRD_ETHER = 1


def linux_interface_kind(name: str, sysfs_net: Path = Path("/sys/class/net")) -> str | None:
    """A hardware-port-like label for Linux interface ``name`` from sysfs, or None.

    ``"Wi-Fi"`` when ``wireless/`` (or ``phy80211``) exists; ``"Ethernet"``
    when a backing ``device`` exists and the ARP type is Ethernet; None for
    virtual interfaces (tun, WireGuard, Tailscale, bridges, veth), which the
    core then classifies by name and address.
    """
    base = sysfs_net / name
    if not base.exists():
        return None
    if (base / "wireless").exists() or (base / "phy80211").exists():
        return "Wi-Fi"
    if (base / "tun_flags").exists():
        return None
    try:
        arp_type = int((base / "type").read_text().strip())
    except (OSError, ValueError):
        return None
    if (base / "device").exists() and arp_type == _ARPHRD_ETHER:
        return "Ethernet"
    return None


# --- measuring (blocking; run in a thread) -------------------------------------------------


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=True).stdout


def memory_info() -> MemoryInfo:
    """Total RAM, and GPU-wireable (macOS) or available (Linux) memory."""
    vm = psutil.virtual_memory()
    total = int(vm.total)
    available = int(vm.available)
    if sys.platform == "darwin":
        try:
            total = int(parse_sysctl(_run(["sysctl", "hw.memsize"]))["hw.memsize"])
            available = gpu_wireable_bytes(total, _run(["vm_stat"]))
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            log.debug("vm_stat/sysctl unavailable, using psutil: %s", exc)
    assert total > 0 and 0 <= available <= total, (total, available)
    return MemoryInfo(ram_total=Memory(in_bytes=total), ram_available=Memory(in_bytes=available))


def _ports() -> dict[str, str]:
    if sys.platform != "darwin":
        return {}
    try:
        return parse_hardware_ports(_run(["networksetup", "-listallhardwareports"]))
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("networksetup unavailable: %s", exc)
        return {}


def network_info(
    advertise: Iterable[tuple[str, str | None]] = (),
    *,
    addresses: Mapping[str, list[str]] | None = None,
    ports: Mapping[str, str] | None = None,
    sysfs_net: Path = Path("/sys/class/net"),
    platform_name: str = sys.platform,
) -> NetworkInfo:
    """This host's usable interface addresses with their kinds (sorted).

    ``advertise`` (``SKULK_ADVERTISE``) replaces discovery: each ``(ip, kind)``
    is advertised as given (kind None: classified from the address). Loopback
    and IPv6 link-local addresses are never advertised by discovery: a ring
    cannot use them between machines. ``addresses`` and ``ports`` stand in
    for the live system in tests.
    """
    chosen = list(advertise)
    for ip, _ in chosen:
        if not usable_address(ip):
            raise ValueError(f"advertised address {ip!r} cannot be used between nodes")
    if chosen:
        ifaces = [
            NetworkInterface(name="advertised", ip_address=ip, kind=kind or classify_interface("", ip))  # type: ignore[arg-type]
            for ip, kind in chosen
        ]
        return NetworkInfo(interfaces=tuple(sorted(ifaces, key=lambda i: (i.name, i.ip_address))))
    if addresses is None:
        addresses = {
            name: [a.address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
            for name, addrs in psutil.net_if_addrs().items()
        }
    if ports is None:
        ports = _ports() if platform_name == "darwin" else {}
    out: list[NetworkInterface] = []
    for name in sorted(addresses):
        for raw in addresses[name]:
            ip = raw.split("%", 1)[0]
            try:
                parsed = ipaddress.ip_address(ip)
            except ValueError:
                continue
            if parsed.is_loopback or not usable_address(ip):
                continue
            hint = ports.get(name) if platform_name == "darwin" else linux_interface_kind(name, sysfs_net)
            kind: LinkKind = classify_interface(name, ip, hint)
            out.append(NetworkInterface(name=name, ip_address=parsed.compressed, kind=kind))
    return NetworkInfo(interfaces=tuple(sorted(out, key=lambda i: (i.name, i.ip_address))))


def system_info() -> SystemInfo:
    chip = platform.processor() or platform.machine()
    if sys.platform == "darwin":
        try:
            chip = parse_sysctl(_run(["sysctl", "machdep.cpu.brand_string"])).get("machdep.cpu.brand_string", chip)
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.lower().startswith("model name"):
                    chip = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return SystemInfo(
        platform=sys.platform,
        chip=chip,
        os_version=platform.platform(),
        cpu_count=os.cpu_count() or 0,
    )


def gather_info(identity: NodeIdentity, advertise: Iterable[tuple[str, str | None]]) -> InfoObserved:
    """One full measurement (blocking). A part that fails is left None."""
    parts: dict[str, object] = {"identity": identity}
    for name, fn in (("memory", memory_info), ("network", lambda: network_info(advertise)), ("system", system_info)):
        try:
            parts[name] = fn()
        except Exception as exc:  # telemetry never takes the node down
            log.warning("could not measure %s: %s", name, exc)
    return InfoObserved(**parts)  # type: ignore[arg-type]


# --- the periodic tasks ----------------------------------------------------------------------


class Telemetry:
    """Measures this host every ``interval_s`` off the loop and feeds ``InfoObserved``."""

    def __init__(
        self,
        *,
        identity: NodeIdentity,
        advertise: Iterable[tuple[str, str | None]],
        interval_s: float,
        feed: Callable[[Input], None],
        timeout_s: float = 10.0,
    ) -> None:
        assert interval_s > 0 and timeout_s > 0
        self.identity = identity
        self.advertise = tuple(advertise)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.feed = feed
        self.measurements = 0
        self.failures = 0

    async def measure_once(self) -> InfoObserved | None:
        try:
            info = await asyncio.wait_for(
                asyncio.to_thread(gather_info, self.identity, self.advertise), timeout=self.timeout_s
            )
        except Exception as exc:
            self.failures += 1
            if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
                log.warning("telemetry measurement failed (%d so far): %r", self.failures, exc)
            return None
        self.measurements += 1
        self.feed(info)
        return info

    async def run(self) -> None:
        while True:
            await self.measure_once()
            await asyncio.sleep(self.interval_s)


async def probe_node_id(ip: str, port: int, timeout_s: float) -> str | None:
    """``GET http://ip:port/node_id``; the node id it answers, or None on any failure."""
    host = f"[{ip}]" if ":" in ip else ip

    async def _go() -> str | None:
        reader, writer = await asyncio.open_connection(ip, port)
        try:
            writer.write(
                f"GET /node_id HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/json\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            await writer.drain()
            raw = await reader.read(65536)
            while len(raw) < 65536:
                more = await reader.read(65536)
                if not more:
                    break
                raw += more
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
        head, _, body = raw.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].split()
        if len(status) < 2 or status[1] != b"200":
            return None
        if b"chunked" in head.lower():
            # One chunk is all a JSON string needs: "<hex>\r\n<data>\r\n0\r\n\r\n".
            size_line, _, rest = body.partition(b"\r\n")
            body = rest[: int(size_line.strip() or b"0", 16)]
        value = json.loads(body.decode())
        return value if isinstance(value, str) else None

    try:
        return await asyncio.wait_for(_go(), timeout=timeout_s)
    except (OSError, asyncio.TimeoutError, ValueError, UnicodeDecodeError):
        return None


class LinkProber:
    """Every ``interval_s``: probe each address every peer advertises, feed ``LinkProbed``.

    ``targets()`` returns ``{peer id: (api port, interfaces)}``, read from the
    transport (api ports) and the replicated state (interfaces) at each round.
    """

    def __init__(
        self,
        *,
        node_id: str,
        targets: Callable[[], Mapping[str, tuple[int, tuple[NetworkInterface, ...]]]],
        feed: Callable[[Input], None],
        interval_s: float,
        timeout_s: float,
        concurrency: int = 16,
    ) -> None:
        assert interval_s > 0 and timeout_s > 0 and concurrency > 0
        self.node_id = node_id
        self.targets = targets
        self.feed = feed
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._sem = asyncio.Semaphore(concurrency)
        self.rounds = 0
        self.last_results: dict[tuple[str, str], bool] = {}

    async def probe_round(self, *, only_new: bool = False) -> dict[tuple[str, str], bool]:
        """Probe every advertised address (``only_new``: those never probed yet)."""
        jobs: list[tuple[str, NetworkInterface, int]] = []
        for peer, (port, ifaces) in sorted(self.targets().items()):
            if peer == self.node_id or port <= 0:
                continue
            for iface in ifaces:
                if only_new and (peer, iface.ip_address) in self.last_results:
                    continue
                if usable_address(iface.ip_address):
                    jobs.append((peer, iface, port))
        if not jobs:
            return {}

        async def one(peer: str, iface: NetworkInterface, port: int) -> tuple[str, NetworkInterface, bool]:
            async with self._sem:
                answer = await probe_node_id(iface.ip_address, port, self.timeout_s)
            return peer, iface, answer == peer

        results = await asyncio.gather(*(one(*j) for j in jobs), return_exceptions=True)
        out: dict[tuple[str, str], bool] = {}
        for res in results:
            if isinstance(res, BaseException):
                log.debug("probe failed: %r", res)
                continue
            peer, iface, ok = res
            out[(peer, iface.ip_address)] = ok
            self.feed(LinkProbed(sink=peer, address=iface.ip_address, kind=iface.kind, reachable=ok))  # type: ignore[arg-type]
        self.rounds += 1
        self.last_results.update(out)
        return out

    async def run(self, tick_s: float = 1.0) -> None:
        """A full round every ``interval_s``; addresses that appear between rounds
        (a new peer, a new interface) are probed within ``tick_s``."""
        next_full = time.monotonic() + tick_s
        while True:
            await asyncio.sleep(tick_s)
            full = time.monotonic() >= next_full
            try:
                await self.probe_round(only_new=not full)
            except Exception:
                log.exception("link probe round failed")
            if full:
                next_full = time.monotonic() + self.interval_s
