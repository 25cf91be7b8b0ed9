"""Network namespaces: a few "machines" with their own addresses, and a Skulk cluster across them.

Used by the reliability report (``python -m loadtests.report``) and by the
tests that run real nodes in namespaces (``tests/runtime/test_netns.py``,
``tests/reliability/test_netns_reliability.py``).

``Netns`` builds N namespaces (each with loopback up) and ``link``s between
them: a veth pair whose two ends get the given addresses. Every name carries a
random prefix, so concurrent runs never collide, and ``teardown`` deletes the
namespaces (which deletes their veth ends). Root only: ``netns_available``
checks that ``ip netns`` really works before a test relies on it.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.cluster import FAST_ENV, RealCluster
from skulk.runtime import auth
from skulk.runtime.localcluster import LocalCluster, NodePlan

__all__ = [
    "netns_available", "Netns", "Link", "ns_http", "netns_cluster", "netns_cluster_with_links", "sweep_stale",
    "free_host_block", "VPN_PREFIX", "PEER_ADDRESS", "link_three",
]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def netns_available() -> tuple[bool, str]:
    """(usable, why not): root, the ``ip`` tool, and a namespace that can be created and used."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    if shutil.which("ip") is None:
        return False, "the ip tool (iproute2) is not installed"
    name = f"skprobe{secrets.token_hex(3)}"
    try:
        made = _ip("netns", "add", name, check=False)
        if made.returncode != 0:
            return False, f"ip netns add failed: {made.stderr.strip()}"
        up = _ip("netns", "exec", name, "ip", "link", "set", "lo", "up", check=False)
        if up.returncode != 0:
            return False, f"ip netns exec failed: {up.stderr.strip()}"
        pair = _ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b", check=False)
        if pair.returncode != 0:
            return False, f"veth pairs unavailable: {pair.stderr.strip()}"
        _ip("link", "del", f"{name}a", check=False)
        return True, ""
    finally:
        _ip("netns", "del", name, check=False)


# Namespaces this module makes are named "sk" + 6 hex digits + "n" + index.
_OURS = re.compile(r"^sk[0-9a-f]{6}n\d+$")
# A namespace of ours with no process inside and older than this was left by a killed run.
STALE_AFTER_S = 600.0


def sweep_stale(*, older_than_s: float = STALE_AFTER_S) -> list[str]:
    """Delete the namespaces a killed run left behind; return their names.

    A run killed before its teardown leaves its namespaces, and with them the
    root ends of its host links, which still hold their addresses: the next
    run's identical addresses then route into the dead namespace and its nodes
    look unreachable. Only our names, only with no process inside, and only
    when older than ``older_than_s`` (a concurrent run's fresh namespaces are
    left alone).
    """
    listed = _ip("netns", "list", check=False)
    removed: list[str] = []
    for line in listed.stdout.splitlines():
        name = line.split(" ", 1)[0]
        if not _OURS.match(name) or _ip("netns", "pids", name, check=False).stdout.strip():
            continue
        try:
            age = time.time() - os.stat(f"/run/netns/{name}").st_mtime
        except OSError:
            continue
        if age >= older_than_s and _ip("netns", "del", name, check=False).returncode == 0:
            removed.append(name)
    return removed


def _root_addresses() -> list[tuple[str, str]]:
    """(interface, address) for every IPv4 address in this (root) namespace."""
    out = _ip("-o", "-4", "addr", "show", check=False).stdout
    pairs = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "inet":
            pairs.append((parts[1], parts[3].split("/", 1)[0]))
    return pairs


def free_host_block(first: int = 78, last: int = 99) -> int:
    """The first ``x`` in [first, last] such that no root address lies in 10.x.0.0/16.

    Host links are numbered 10.x.(i+1).1/30 (root end) and .2 (machine i); a
    block another run (or a leftover) still holds is skipped, not shared.
    """
    taken = {addr for _, addr in _root_addresses()}
    for x in range(first, last + 1):
        if not any(a.startswith(f"10.{x}.") for a in taken):
            return x
    holders = sorted({f"{iface} {addr}" for iface, addr in _root_addresses() if addr.startswith("10.")})
    raise OSError(f"no free 10.x.0.0/16 block in {first}..{last} for host links; taken: {', '.join(holders)}")


@dataclass(frozen=True)
class Link:
    a: int
    b: int
    a_addr: str  # "10.77.1.1/24"
    b_addr: str
    a_name: str
    b_name: str


@dataclass
class Netns:
    """N namespaces; ``names[i]`` is machine i's namespace."""

    n: int
    prefix: str = field(default_factory=lambda: f"sk{secrets.token_hex(3)}")
    names: list[str] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)

    def build(self) -> Netns:
        sweep_stale()
        for i in range(self.n):
            name = f"{self.prefix}n{i}"
            _ip("netns", "add", name)
            self.names.append(name)
            self.run(i, ["ip", "link", "set", "lo", "up"])
        return self

    def run(self, i: int, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside machine ``i``'s namespace."""
        return subprocess.run(["ip", "netns", "exec", self.names[i], *argv], capture_output=True, text=True,
                              timeout=kw.pop("timeout", 20), check=kw.pop("check", True), **kw)  # type: ignore[arg-type]

    def prefix_argv(self, i: int) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.names[i])

    def link(self, a: int, b: int, a_addr: str, b_addr: str, *, a_name: str, b_name: str) -> Link:
        """A veth pair between machines ``a`` and ``b`` with the given CIDR addresses."""
        tmp_a = f"{self.prefix}{len(self.links)}a"
        tmp_b = f"{self.prefix}{len(self.links)}b"
        _ip("link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        _ip("link", "set", tmp_a, "netns", self.names[a])
        _ip("link", "set", tmp_b, "netns", self.names[b])
        for i, tmp, name, addr in ((a, tmp_a, a_name, a_addr), (b, tmp_b, b_name, b_addr)):
            self.run(i, ["ip", "link", "set", tmp, "name", name])
            self.run(i, ["ip", "addr", "add", addr, "dev", name])
            self.run(i, ["ip", "link", "set", name, "up"])
        link = Link(a, b, a_addr, b_addr, a_name, b_name)
        self.links.append(link)
        return link

    def link_host(self, i: int, host_addr: str, ns_addr: str, *, ns_name: str = "host0") -> Link:
        """A veth pair between this (root) namespace and machine ``i``, so the test process reaches it.

        ``host_addr``/``ns_addr`` are CIDR addresses ("10.78.1.1/30", "10.78.1.2/30");
        the host end is named ``<prefix>h<i>`` and disappears with the namespace.
        """
        host_name = f"{self.prefix}h{i}"
        tmp = f"{self.prefix}t{i}"
        bare = host_addr.split("/", 1)[0]
        holder = next((iface for iface, addr in _root_addresses() if addr == bare), None)
        if holder is not None:
            raise OSError(f"{bare} is already on {holder} in the root namespace (a leftover of a killed run? "
                          f"loadtests.netns.sweep_stale() removes those); pick another block (free_host_block)")
        _ip("link", "add", host_name, "type", "veth", "peer", "name", tmp)
        _ip("link", "set", tmp, "netns", self.names[i])
        self.run(i, ["ip", "link", "set", tmp, "name", ns_name])
        self.run(i, ["ip", "addr", "add", ns_addr, "dev", ns_name])
        self.run(i, ["ip", "link", "set", ns_name, "up"])
        _ip("addr", "add", host_addr, "dev", host_name)
        _ip("link", "set", host_name, "up")
        link = Link(-1, i, host_addr, ns_addr, host_name, ns_name)
        self.links.append(link)
        return link

    def teardown(self) -> None:
        for name in self.names:
            _ip("netns", "del", name, check=False)
        self.names.clear()

    def __enter__(self) -> Netns:
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.teardown()


def ns_http(netns: Netns, i: int, path: str, *, port: int, method: str = "GET", body: object = None,
            timeout_s: float = 10.0, raw: bool = False) -> object:
    """An HTTP request made from inside machine ``i`` to its own API (``curl``)."""
    import json

    argv = ["curl", "-s", "-m", str(timeout_s), "-X", method, f"http://127.0.0.1:{port}{path}"]
    if body is not None:
        argv += ["-H", "content-type: application/json", "--data-binary", json.dumps(body)]
    out = netns.run(i, argv, timeout=timeout_s + 5, check=False)
    if out.returncode != 0:
        raise OSError(f"curl in {netns.names[i]} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout if raw else json.loads(out.stdout or "null")


# --- a cluster across three namespaces ------------------------------------------------------
#
# Each machine is a namespace with its own addresses: plain veth links between
# every pair (10.77.x.0/24) and, between machines 0 and 1, a second link whose
# only tell is its VPN-range address (100.64.7.0/24, Tailscale's range), named
# like any other interface. Each namespace also gets a link to the root
# namespace (10.78.i.0/30, or the next free 10.x block), so Locust, the trace recorder and the checks run
# from the test process against each node's own address. Nodes discover their
# interfaces for real, bind the API on every address, and find each other
# through bootstrap peers on the plain links. Root only; ``netns_available``
# says why not otherwise.

API_PORT = 52415
ZENOH_PORT = 52416
VPN_PREFIX = "100.64.7."
# The address of machine j as machine i reaches it: j's end of the link between them.
# (Each machine bootstraps to its peers over the links it has; an address on a
# subnet the machine is not on is unreachable from it.)
PEER_ADDRESS = {
    (0, 1): "10.77.1.2", (1, 0): "10.77.1.1",
    (1, 2): "10.77.2.2", (2, 1): "10.77.2.1",
    (0, 2): "10.77.3.2", (2, 0): "10.77.3.1",
}


def link_three(net: Netns) -> None:
    """The plain veth links between every pair of three machines (the addresses ``PEER_ADDRESS`` names)."""
    net.link(0, 1, "10.77.1.1/24", "10.77.1.2/24", a_name="eth1", b_name="eth1")
    net.link(1, 2, "10.77.2.1/24", "10.77.2.2/24", a_name="eth2", b_name="eth2")
    net.link(0, 2, "10.77.3.1/24", "10.77.3.2/24", a_name="eth3", b_name="eth3")


@contextmanager
def netns_cluster(base: Path, models: Path, *, env: Mapping[str, str] | None = None) -> Iterator[RealCluster]:
    """Build the three namespaces, start a node in each, yield the cluster; always tear everything down."""
    with netns_cluster_with_links(base, models, env=env) as (cluster, _):
        yield cluster


@contextmanager
def netns_cluster_with_links(
    base: Path, models: Path, *, env: Mapping[str, str] | None = None, sysctls: Mapping[str, str] | None = None
) -> Iterator[tuple[RealCluster, Netns]]:
    """``netns_cluster``, yielding the namespaces too (to take a machine's links down: a lost host).

    ``sysctls`` are set in every namespace before the nodes start (the ``net.*``
    ones are per namespace), e.g. ``{"net.ipv4.tcp_retries2": "3"}``.
    """
    with Netns(3) as net:
        for i in range(3):
            for name, value in (sysctls or {}).items():
                net.run(i, ["sysctl", "-q", "-w", f"{name}={value}"])
        link_three(net)
        net.link(0, 1, VPN_PREFIX + "1/24", VPN_PREFIX + "2/24", a_name="eth9", b_name="eth9")
        block = free_host_block()
        for i in range(3):
            net.link_host(i, f"10.{block}.{i + 1}.1/30", f"10.{block}.{i + 1}.2/30")
        key = auth.load_or_create_secret(base)[1]
        namespace = f"relns{random.randrange(1 << 30):x}"
        plans = []
        for i in range(3):
            node_env = dict(FAST_ENV)
            node_env.update({
                "SKULK_HOME": str(base / f"node-{i + 1}"), "SKULK_MODELS_DIR": str(models),
                "SKULK_NODE_ID": f"m-{i + 1}", "SKULK_FRIENDLY_NAME": f"m-{i + 1}", "SKULK_NAMESPACE": namespace,
                "SKULK_CLUSTER_KEY": key, "SKULK_API_PORT": str(API_PORT), "SKULK_LISTEN": f"tcp/0.0.0.0:{ZENOH_PORT}",
                "SKULK_BOOTSTRAP_PEERS": ",".join(f"tcp/{PEER_ADDRESS[i, j]}:{ZENOH_PORT}" for j in range(3) if j != i),
                "SKULK_MULTICAST": "0", "SKULK_AUTO_PLACE": "none",
            })
            node_env.update(env or {})
            plans.append(NodePlan(index=i, node_id=f"m-{i + 1}", home=base / f"node-{i + 1}", api_host=f"10.{block}.{i + 1}.2",
                                  api_port=API_PORT, zenoh_port=ZENOH_PORT, env=node_env, argv_prefix=net.prefix_argv(i)))
        local = LocalCluster(plans, log_dir=base / "logs")
        local.start()
        try:
            local.wait_ready(timeout_s=90)
            yield RealCluster(local, base), net
        finally:
            local.stop()
