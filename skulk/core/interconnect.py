"""Interconnect selection: which link each pair of ring neighbours uses.

Theory of operation
-------------------
Nodes advertise their interfaces (name, address, kind); every node probes each
address its peers advertise and reports what it reached as a ``Connection``:
``source`` reached ``sink`` at ``address`` (one of the sink's addresses) over a
link of ``kind``. Only observed links are ever used.

Direction matters. In MLX's ring backend rank ``i + 1`` *listens* on the
address the hostfile gives for it and rank ``i`` *connects* to it (ranks wrap
around: rank 0's predecessor is the last rank). So the hop into rank ``r``
needs a connection whose ``source`` is rank ``r - 1``'s node and whose
``sink`` is rank ``r``'s node; its ``address`` is where rank ``r`` listens.

Ranking: thunderbolt > ethernet > wifi > unknown > vpn. A VPN (Tailscale) is
recognised by its address (100.64.0.0/10, fd7a:115c:a1e0::/48) whatever the
interface is called or labelled: it exists for reachability, never as a
preferred data path. Ties between links of one kind break on IPv4 before IPv6,
then the numeric address, so the choice never depends on the order in which
connections were observed.

Addresses that a hostfile cannot use are never chosen: unparsable strings,
unspecified and multicast addresses, and IPv6 link-local addresses (they need
a zone index that a bare ``ip:port`` cannot carry).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Iterator, Mapping, Sequence

from skulk.core.ids import NodeId
from skulk.core.instances import Instance, LinkKind, RingHop
from skulk.core.topology import Connection
from skulk.core.records import Record
from skulk.core.state import State

__all__ = [
    "KIND_ORDER",
    "KIND_RANK",
    "VPN_NETWORKS",
    "RingRefusal",
    "ConnectDiagnosis",
    "is_vpn_address",
    "usable_address",
    "classify_interface",
    "effective_kind",
    "link_sort_key",
    "best_link",
    "LinkTable",
    "link_table",
    "ring_quality",
    "ring_quality_bound",
    "best_ring_order",
    "EXACT_ORDER_MAX_NODES",
    "format_address",
    "ring_hops",
    "hostfile",
    "diagnose_connect_failure",
]

KIND_ORDER: tuple[LinkKind, ...] = ("thunderbolt", "ethernet", "wifi", "unknown", "vpn")
KIND_RANK: dict[str, int] = {kind: i for i, kind in enumerate(KIND_ORDER)}

VPN_NETWORKS = (
    ipaddress.ip_network("100.64.0.0/10"),  # Tailscale (CGNAT range) IPv4
    ipaddress.ip_network("fd7a:115c:a1e0::/48"),  # Tailscale IPv6 ULA
)


# Parsing is pure and placement asks about the same few addresses many times.
@functools.lru_cache(maxsize=4_096)
def _parse(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address.strip())
    except ValueError:
        return None


@functools.lru_cache(maxsize=4_096)
def is_vpn_address(address: str) -> bool:
    """True when ``address`` lies in a VPN (Tailscale) range."""
    ip = _parse(address)
    return ip is not None and any(ip.version == net.version and ip in net for net in VPN_NETWORKS)


def usable_address(address: str) -> bool:
    """True when ``address`` can stand in an MLX hostfile entry."""
    ip = _parse(address)
    if ip is None or ip.is_unspecified or ip.is_multicast:
        return False
    return not (ip.version == 6 and ip.is_link_local)


# Interface-name prefixes, checked in order; the first match wins.
_NAME_RULES: tuple[tuple[str, LinkKind], ...] = (
    ("thunderbolt", "thunderbolt"),  # Linux thunderbolt-net: thunderbolt0
    ("tailscale", "vpn"),
    ("utun", "vpn"),
    ("wg", "vpn"),
    ("tun", "vpn"),
    ("zt", "vpn"),  # ZeroTier
    ("wlan", "wifi"),
    ("wlp", "wifi"),
    ("wl", "wifi"),
    ("eth", "ethernet"),
    ("enp", "ethernet"),
    ("eno", "ethernet"),
    ("ens", "ethernet"),
    ("enx", "ethernet"),
)


def classify_interface(name: str, ip_address: str, hardware_port: str | None = None) -> LinkKind:
    """The kind of an interface, from its address, its hardware port and its name.

    Order of evidence: a VPN address wins over everything; then the macOS
    hardware port description (``networksetup -listallhardwareports``: a
    "Thunderbolt Bridge" or "Thunderbolt N" port, "Ethernet", "Wi-Fi"); then
    the interface name (Linux conventions). macOS ``enN`` names say nothing
    by themselves (en0 is Wi-Fi on a laptop, Ethernet on a desktop), so they
    stay "unknown" without a hardware port.
    """
    if is_vpn_address(ip_address):
        return "vpn"
    port = (hardware_port or "").strip().lower()
    words = port.replace("/", " ").split()
    if port:
        # "Thunderbolt Bridge" and "Thunderbolt 1".."Thunderbolt N" are IP over Thunderbolt;
        # "Thunderbolt Ethernet Slot 0" is an Ethernet adapter on a Thunderbolt port.
        if port == "thunderbolt bridge" or (len(words) == 2 and words[0] == "thunderbolt" and words[1].isdigit()):
            return "thunderbolt"
        if "wi-fi" in port or "wifi" in port or "airport" in port or "wlan" in port:
            return "wifi"
        if "ethernet" in words or "lan" in words:
            return "ethernet"
        if "vpn" in words or "tailscale" in words:
            return "vpn"
    lowered = name.strip().lower()
    for prefix, kind in _NAME_RULES:
        if lowered.startswith(prefix):
            return kind
    return "unknown"


def effective_kind(conn: Connection) -> LinkKind:
    """The kind a link is ranked as: "vpn" for a VPN address, whatever its label."""
    return "vpn" if is_vpn_address(conn.address) else conn.kind


def link_sort_key(conn: Connection) -> tuple[int, int, int, str]:
    """Smaller is better: kind rank, then IPv4 before IPv6, then numeric address."""
    ip = _parse(conn.address)
    assert ip is not None, conn
    return (KIND_RANK[effective_kind(conn)], ip.version, int(ip), conn.kind)


def best_link(
    state: State, source: NodeId, sink: NodeId, *, avoid: Iterable[Connection] = ()
) -> Connection | None:
    """The best observed link on which ``source`` reaches ``sink`` (None if there is none).

    In ring terms ``source`` is rank ``i`` (it connects) and ``sink`` rank
    ``i + 1`` (it listens at the returned connection's address). Connections
    in ``avoid`` (for example one that failed group connect) are skipped.
    """
    assert source != sink, "a node does not link to itself"
    skip = frozenset(avoid)
    candidates = [
        c
        for c in state.topology.connections
        if c.source == source and c.sink == sink and c not in skip and usable_address(c.address)
    ]
    return min(candidates, key=link_sort_key, default=None)


LinkTable = Mapping[tuple[NodeId, NodeId], Connection]

EXACT_ORDER_MAX_NODES = 7  # rings up to this size: every order is tried (at most 720)
_DFS_STEP_BUDGET = 50_000  # larger rings: bounded depth-first search


def link_table(
    state: State,
    nodes: Iterable[NodeId],
    *,
    avoid: Iterable[Connection] = (),
    kinds: Sequence[LinkKind] | None = None,
) -> dict[tuple[NodeId, NodeId], Connection]:
    """The best link for every ordered pair of ``nodes`` that has one (``best_link``).

    With ``kinds``, pairs whose best link is of another (effective) kind are
    left out. Keys are (source, sink), inserted in sorted order.
    """
    members = set(nodes)
    skip = tuple(avoid)
    pairs = sorted(
        {(c.source, c.sink) for c in state.topology.connections if c.source != c.sink and {c.source, c.sink} <= members}
    )
    out: dict[tuple[NodeId, NodeId], Connection] = {}
    for source, sink in pairs:
        link = best_link(state, source, sink, avoid=skip)
        if link is not None and (kinds is None or effective_kind(link) in kinds):
            out[(source, sink)] = link
    return out


def ring_quality(order: Sequence[NodeId], links: LinkTable) -> tuple[int, ...]:
    """The kind ranks of a ring's hops, worst first: a smaller tuple is a better ring."""
    if len(order) == 1:
        return ()
    ranks = (KIND_RANK[effective_kind(links[(order[i - 1], order[i])])] for i in range(len(order)))
    return tuple(sorted(ranks, reverse=True))


def ring_quality_bound(nodes: Sequence[NodeId], links: LinkTable) -> tuple[int, ...] | None:
    """A lower bound on ``ring_quality`` of any ring over ``nodes``; None when none can exist.

    Every node needs one outgoing hop to another member, at best its best such
    link, so the sorted best-outgoing ranks bound any ring from below (in the
    tuple order ``ring_quality`` uses). A node without an outgoing or an
    incoming link rules a ring out.
    """
    members = tuple(sorted(nodes))
    if len(members) == 1:
        return ()
    best_out: list[int] = []
    for a in members:
        outs = [KIND_RANK[effective_kind(links[(a, b)])] for b in members if b != a and (a, b) in links]
        if not outs or not any((b, a) in links for b in members if b != a):
            return None
        best_out.append(min(outs))
    return tuple(sorted(best_out, reverse=True))


def best_ring_order(
    nodes: Sequence[NodeId], links: LinkTable, *, full_mesh: bool = False
) -> tuple[NodeId, ...] | None:
    """The rank order of ``nodes`` whose ring has the best links, or None when there is no ring.

    Rank 0 is the smallest node id (rotations are the same ring). Up to
    ``EXACT_ORDER_MAX_NODES`` nodes every ring is considered and the best
    ``ring_quality`` wins, ties going to the lexicographically smallest order;
    beyond, the first ring a depth-first search (successors by id) finds.
    ``full_mesh`` demands a link between every ordered pair (JACCL), not only
    along the ring.
    """
    ordered = tuple(sorted(nodes))
    assert ordered and len(set(ordered)) == len(ordered), nodes
    if len(ordered) == 1:
        return ordered
    if full_mesh and not all((a, b) in links for a in ordered for b in ordered if a != b):
        return None
    bound = ring_quality_bound(ordered, links)
    if bound is None:
        return None
    best: tuple[tuple[int, ...], tuple[NodeId, ...]] | None = None
    exhaustive = len(ordered) <= EXACT_ORDER_MAX_NODES
    for order in _cycles(ordered[0], ordered[1:], links, exhaustive=exhaustive):
        key = (ring_quality(order, links), order)
        if best is None or key < best:
            best = key
        if key[0] == bound:
            break  # rings come in lexicographic order: nothing later can beat this one
    return None if best is None else best[1]


def _cycles(
    first: NodeId, rest: tuple[NodeId, ...], links: LinkTable, *, exhaustive: bool
) -> Iterator[tuple[NodeId, ...]]:
    """Rings through ``first`` and every node of ``rest``, as rank orders, in lexicographic order.

    A depth-first search along existing links only (so sparse graphs cost
    little), bounded by ``_DFS_STEP_BUDGET`` partial paths; stops at the first
    ring unless ``exhaustive``.
    """
    want = len(rest) + 1
    members = set(rest)
    succ: dict[NodeId, list[NodeId]] = {}
    for a, b in sorted(links):
        succ.setdefault(a, []).append(b)
    stack: list[tuple[NodeId, ...]] = [(first,)]
    steps = 0
    while stack and steps < _DFS_STEP_BUDGET:
        path = stack.pop()
        steps += 1
        if len(path) == want:
            if (path[-1], first) in links:
                yield path
                if not exhaustive:
                    return
            continue
        nexts = [s for s in succ.get(path[-1], ()) if s in members and s not in path]
        stack.extend((*path, s) for s in reversed(nexts))


def format_address(ip: str, port: int) -> str:
    """'ip:port', with IPv6 addresses in brackets."""
    assert 0 < port < 65_536, port
    parsed = _parse(ip)
    assert parsed is not None, ip
    return f"[{parsed.compressed}]:{port}" if parsed.version == 6 else f"{parsed.compressed}:{port}"


class RingRefusal(Record, frozen=True, kw_only=True):
    """No ring over the given order: ``missing`` lists the (source, sink) hops without a link."""

    message: str
    missing: tuple[tuple[NodeId, NodeId], ...]


def ring_hops(
    state: State, ordered_nodes: Sequence[NodeId], port: int, *, avoid: Iterable[Connection] = ()
) -> tuple[RingHop, ...] | RingRefusal:
    """The ring over ``ordered_nodes`` (rank order), each hop on its best observed link.

    Output: one ``RingHop`` per rank (``ring[r]`` describes how rank ``r`` is
    reached from rank ``r - 1``; rank ``r`` listens on ``port + r``, so ranks
    sharing one address, as on a loopback cluster, never collide), or a
    ``RingRefusal`` naming every hop with no observed link. A single node
    needs no ring: the result is ``()``.
    """
    nodes = list(ordered_nodes)
    assert nodes, "a ring has at least one node"
    assert len(set(nodes)) == len(nodes), f"a node appears twice in the ring order {nodes}"
    if len(nodes) == 1:
        return ()
    skip = tuple(avoid)
    hops: list[RingHop] = []
    missing: list[tuple[NodeId, NodeId]] = []
    for rank, node in enumerate(nodes):
        pred = nodes[rank - 1]
        link = best_link(state, pred, node, avoid=skip)
        if link is None:
            missing.append((pred, node))
            continue
        hops.append(
            RingHop(rank=rank, node_id=node, address=format_address(link.address, port + rank), kind=effective_kind(link))
        )
    if missing:
        listed = ", ".join(f"{a} -> {b}" for a, b in missing)
        return RingRefusal(message=f"no observed link for ring hop(s) {listed}", missing=tuple(missing))
    assert [h.rank for h in hops] == list(range(len(nodes)))
    return tuple(hops)


def hostfile(instance: Instance) -> tuple[str, ...]:
    """The MLX ring hostfile of ``instance``: one 'ip:port' per rank, in rank order.

    Empty for a single-node instance (a world of one needs no hostfile). This
    is what ``RunnerSpec.hosts`` carries.
    """
    ring = instance.ring
    assert [h.rank for h in ring] == list(range(len(ring))), f"ring of {instance.instance_id} is not in rank order"
    world = len(instance.shard_assignments.node_to_runner)
    assert not ring or len(ring) == world, f"{instance.instance_id}: {len(ring)} hops for {world} nodes"
    return tuple(h.address for h in ring)


class ConnectDiagnosis(Record, frozen=True, kw_only=True):
    """Why group connect failed, and what re-placement should avoid.

    ``avoid_connections`` are the links re-placement should not use (empty
    when the instance has no ring): first the one the failing hop used, then
    the same kind of link in the other direction between the same two nodes,
    which a dead cable takes down too although its probes may not have said
    so yet. ``link_still_observed`` says whether probes still reach the hop's
    address (then a firewall or a runner that never listened is the likelier
    cause than the network).
    """

    message: str
    unreachable_rank: int | None
    unreachable_node: NodeId | None
    address: str | None
    avoid_connections: tuple[Connection, ...]
    link_still_observed: bool


def diagnose_connect_failure(
    state: State,
    instance: Instance,
    *,
    reporting_node: NodeId,
    deadline_s: float,
    unreachable_rank: int | None = None,
) -> ConnectDiagnosis:
    """Explain a group connect that did not complete within ``deadline_s``.

    ``reporting_node`` is the node whose runner gave up; ``unreachable_rank``
    is the rank it could not reach, when the runner knows. Without it (or
    when it is not a rank of this ring: it comes from a runner) the diagnosis
    names the rank the reporter connects to (its successor), since that is
    the connection a rank makes itself.
    """
    iid = instance.instance_id
    ring = instance.ring
    ranks = {h.node_id: h.rank for h in ring}
    if not ring or reporting_node not in ranks:
        return ConnectDiagnosis(
            message=(
                f"group connect for instance {iid} did not complete within {deadline_s:.0f} s on node "
                f"{reporting_node}; the instance has no ring entry for that node"
            ),
            unreachable_rank=None,
            unreachable_node=None,
            address=None,
            avoid_connections=(),
            link_still_observed=False,
        )
    world = len(ring)
    if unreachable_rank is not None and 0 <= unreachable_rank < world:
        target = unreachable_rank
    else:
        target = (ranks[reporting_node] + 1) % world
    hop = ring[target]
    pred = ring[target - 1]
    ip = hop.address.rsplit(":", 1)[0].strip("[]")
    observed = [
        c
        for c in state.topology.connections
        if c.source == pred.node_id and c.sink == hop.node_id and _same_ip(c.address, ip)
    ]
    # The hop's own link; rebuilt from the ring when probes no longer report it.
    avoid = (
        min(observed, key=link_sort_key)
        if observed
        else Connection(source=pred.node_id, sink=hop.node_id, address=ip, kind=hop.kind)
    )
    # The way back over the same kind of link: probes report each direction on
    # its own schedule, so a cable that just died may still be listed one way
    # (ring_deadline seed 457 re-placed onto it and failed a second deadline).
    back = tuple(
        sorted(
            (
                c
                for c in state.topology.connections
                if c.source == hop.node_id and c.sink == pred.node_id and c.kind == avoid.kind
            ),
            key=link_sort_key,
        )
    )
    if observed:
        cause = (
            f"probes from {pred.node_id} still reach {ip}, so the port may be blocked by a firewall "
            f"or rank {target} never started listening"
        )
    else:
        cause = f"that link is no longer observed from {pred.node_id}"
    message = (
        f"group connect for instance {iid} (generation {instance.generation}) did not complete within "
        f"{deadline_s:.0f} s: rank {target} on node {hop.node_id} listens at {hop.address} and was not "
        f"reached from rank {pred.rank} on node {pred.node_id} over {hop.kind}; {cause}"
    )
    return ConnectDiagnosis(
        message=message,
        unreachable_rank=target,
        unreachable_node=hop.node_id,
        address=hop.address,
        avoid_connections=(avoid, *back),
        link_still_observed=bool(observed),
    )


def _same_ip(a: str, b: str) -> bool:
    pa, pb = _parse(a), _parse(b)
    return pa is not None and pa == pb
