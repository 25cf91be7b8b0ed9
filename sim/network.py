"""Simulated links, partitions, clogging and membership.

Theory of operation
-------------------
Every pair of hosts is joined by one or more *links*, each of a kind
(Thunderbolt, Ethernet, Wi-Fi, VPN) with its own addresses. A message between
two hosts travels over the best link that is up (the kind with the lowest
latency), like a zenoh session that prefers the direct route:

- it may be lost (``loss_probability``), duplicated, held back so later ones
  overtake it (reordering), or delayed by a heavy Pareto tail;
- each directed path holds at most ``link_capacity_messages`` in flight; one
  more overflows the queue and is dropped;
- a *cut* direction (partition) drops what is sent and what arrives while
  cut; a *clogged* direction holds messages until it unclogs
  (swizzle-clogging), then releases them in order;
- a message addressed to a host is dropped if that host restarted since it
  was sent (the connection it travelled on is gone).

Membership models zenoh liveliness: ``a`` sees ``b`` while ``b``'s process
runs (not crashed, not paused) and some link carries ``b``'s keepalives to
``a`` (not cut, not clogged). A change is felt after a delay: a newly
reachable peer appears after ``discovery_s``; a crashed one disappears after
``crash_detect_s`` (its TCP connections close); a paused or cut-off one after
``lease_s`` (each plus up to ``crash_detect_spread_s`` / ``lease_spread_s``,
drawn per peer from the ``membership`` stream when set: real leases expire at
different moments on different peers). A change that reverts before its
delay passes is never seen.
A paused host's own view is frozen until it resumes.

Fault state is reference counted per direction or link, so overlapping faults
(a partition during a clog) compose and heal independently.

The runners' data plane (with ``ring_data_plane``): ring rank ``r - 1``
reaches rank ``r`` at its ring address ``ip:port`` only over a link between
their hosts that is up and whose address there is ``ip``, and only while that
address is not blocked (``ring_blocked``: a stale listener or a firewall on
the ring port, while the node's API and its probes still answer). Partitions
and clogs cut the control plane only. ``changed`` fires after every change of
links, faults or hosts, so runners can re-check their ring.

Invariants kept: nothing is delivered over a cut direction or to a host that
is down; the in-flight count of a direction never exceeds its capacity;
membership changes reach the core only as ``PeersChanged`` with a sorted,
complete set.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from skulk.core.ids import NodeId
from skulk.core.inputs import PeersChanged, Received
from skulk.core.messages import Message

from sim.options import SimOptions

if TYPE_CHECKING:
    from sim.world import World

__all__ = ["Link", "Network", "KIND_PREFERENCE"]

# Route preference (lowest first): the direct, fast path before the VPN.
KIND_PREFERENCE: dict[str, int] = {"thunderbolt": 0, "ethernet": 1, "wifi": 2, "vpn": 3}


class Link:
    """One physical path between hosts ``a`` and ``b`` (undirected)."""

    __slots__ = ("kind", "a", "b", "address_a", "address_b", "median_ms", "down", "label")

    def __init__(
        self, kind: str, a: NodeId, b: NodeId, address_a: str, address_b: str, median_ms: float, *, label: str | None = None
    ) -> None:
        assert kind in KIND_PREFERENCE, kind
        assert a < b, "links are stored with their ends sorted"
        self.kind = kind
        # The kind the hosts advertise for it (probes report this): normally the
        # kind itself; a VPN on an interface named like ethernet is labelled "ethernet".
        self.label = kind if label is None else label
        self.a = a
        self.b = b
        self.address_a = address_a
        self.address_b = address_b
        self.median_ms = median_ms
        self.down = 0  # reference count of faults holding it down

    @property
    def up(self) -> bool:
        return self.down == 0

    def address_of(self, node: NodeId) -> str:
        assert node in (self.a, self.b)
        return self.address_a if node == self.a else self.address_b

    def __repr__(self) -> str:
        return f"Link({self.kind} {self.a}<->{self.b}{'' if self.up else ' down'})"


def _pair(a: NodeId, b: NodeId) -> tuple[NodeId, NodeId]:
    return (a, b) if a < b else (b, a)


class Network:
    """The links between the world's hosts, the faults on them and membership."""

    def __init__(self, world: World, opts: SimOptions, rng: random.Random) -> None:
        self.world = world
        self.env = world.env
        self.opts = opts
        self.rng = rng
        self.links: dict[tuple[NodeId, NodeId], list[Link]] = {}
        # The same lists keyed by both (a, b) and (b, a): every message looks its route up.
        self._routes: dict[tuple[NodeId, NodeId], list[Link]] = {}
        # Directed fault state, reference counted: (src, dst) -> count.
        self.cut: dict[tuple[NodeId, NodeId], int] = {}
        self.clogged: dict[tuple[NodeId, NodeId], int] = {}
        self.held: dict[tuple[NodeId, NodeId], list[tuple[int, Message]]] = {}
        self.inflight: dict[tuple[NodeId, NodeId], int] = {}
        # Extra loss/duplication on top of the options (loss bursts), reference counted.
        self.burst = 0
        # Membership: what each host currently sees, the truth it is converging
        # to, and a generation per directed pair to cancel stale changes.
        self.view: dict[NodeId, set[NodeId]] = {}
        self.truth: dict[tuple[NodeId, NodeId], bool] = {}
        self.gen: dict[tuple[NodeId, NodeId], int] = {}
        # Counters (reported at the end of a run).
        self.sent = 0
        self.delivered = 0
        self.lost = 0
        self.overflowed = 0
        self.duplicated = 0
        self.dropped_cut = 0
        self._tail_p = opts.latency_tail_probability
        self._reorder_p = opts.reorder_probability
        # Data plane: ring addresses ("ip:port") whose connections fail, reference counted.
        self.ring_blocked: dict[str, int] = {}
        self.changed = self.env.event()
        # An observer of messages that did not arrive, or arrived later than ``late_s``,
        # or were held back so later ones overtook them (lost, cut, clogged, overflowed,
        # late, reordered): the efficiency invariants excuse
        # the retransmissions those cause (``chaos.efficiency``). Off by default.
        self.disturbed: Callable[[NodeId, NodeId, Message, str], None] | None = None
        self.late_s = math.inf
        self._held_back = False  # the last latency drawn includes a reordering hold-back
        self._spread_rng: random.Random | None = None

    # --- construction ------------------------------------------------------------

    def add_link(self, link: Link) -> None:
        links = self.links.setdefault((link.a, link.b), [])
        self._routes[(link.a, link.b)] = self._routes[(link.b, link.a)] = links
        links.append(link)
        links.sort(key=lambda l: (KIND_PREFERENCE[l.kind], l.address_a))

    def links_between(self, a: NodeId, b: NodeId) -> list[Link]:
        return self.links.get(_pair(a, b), [])

    def route(self, a: NodeId, b: NodeId) -> Link | None:
        """The best link up between ``a`` and ``b`` (None: no path at all)."""
        for link in self._routes.get((a, b), ()):
            if link.down == 0:
                return link
        return None

    # --- messages --------------------------------------------------------------------

    def send(self, src: NodeId, dst: NodeId, message: Message) -> None:
        """Put ``message`` on the wire from ``src`` to ``dst``; it may never arrive."""
        self.sent += 1
        hosts = self.world.hosts
        target = hosts[dst]
        if target.node is None:
            self.lost += 1
            return
        key = (src, dst)
        if key in self.cut:
            self.dropped_cut += 1
            self._disturb(src, dst, message, "cut")
            return
        link = self.route(src, dst)
        if link is None:
            self.dropped_cut += 1
            self._disturb(src, dst, message, "no route")
            return
        rng = self.rng
        loss = self.opts.loss_probability + (0.2 if self.burst else 0.0)
        if loss and rng.random() < loss:
            self.lost += 1
            self._disturb(src, dst, message, "lost")
            return
        copies = 1
        dup = self.opts.duplicate_probability + (0.1 if self.burst else 0.0)
        if dup and rng.random() < dup:
            copies = 2
            self.duplicated += 1
        for _ in range(copies):
            count = self.inflight.get(key, 0)
            if count >= self.opts.link_capacity_messages:
                self.overflowed += 1
                self._disturb(src, dst, message, "overflow")
                return
            self.inflight[key] = count + 1
            delay = self._latency_s(link)
            if delay > self.late_s:
                self._disturb(src, dst, message, "late")
            elif self._held_back:
                self._disturb(src, dst, message, "reordered")
            self._held_back = False
            self.world.call_later(delay, self._arrive, src, dst, message, target.incarnation)

    def _latency_s(self, link: Link) -> float:
        rng = self.rng
        ms = link.median_ms * math.exp(rng.gauss(0.0, self.opts.latency_jitter))  # log-normal around the median
        if self._tail_p and rng.random() < self._tail_p:
            ms += min(self.opts.latency_tail_ms_max, 10.0 * rng.paretovariate(self.opts.latency_tail_alpha))
        if self._reorder_p and rng.random() < self._reorder_p:
            ms += rng.uniform(0.0, self.opts.reorder_delay_ms_max)
            self._held_back = True
        return ms / 1000.0

    def _arrive(self, src: NodeId, dst: NodeId, message: Message, incarnation: int) -> None:
        key = (src, dst)
        if key in self.clogged:
            # Held at the clog; released in order when it unclogs.
            self.held.setdefault(key, []).append((incarnation, message))
            self._disturb(src, dst, message, "clogged")
            return
        self.inflight[key] -= 1
        self._hand_over(src, dst, message, incarnation)

    def _hand_over(self, src: NodeId, dst: NodeId, message: Message, incarnation: int) -> None:
        host = self.world.hosts[dst]
        if host.incarnation != incarnation or host.node is None:
            self.lost += 1
            return
        if (src, dst) in self.cut:
            self.dropped_cut += 1
            self._disturb(src, dst, message, "cut")
            return
        self.delivered += 1
        host.feed(Received(sender=src, message=message))

    def _disturb(self, src: NodeId, dst: NodeId, message: Message, why: str) -> None:
        if self.disturbed is not None:
            self.disturbed(src, dst, message, why)

    # --- faults ---------------------------------------------------------------------------

    def cut_direction(self, src: NodeId, dst: NodeId) -> None:
        key = (src, dst)
        self.cut[key] = self.cut.get(key, 0) + 1

    def uncut_direction(self, src: NodeId, dst: NodeId) -> None:
        key = (src, dst)
        count = self.cut.get(key, 0)
        assert count > 0, f"uncut {key} that is not cut"
        if count == 1:
            del self.cut[key]
        else:
            self.cut[key] = count - 1

    def clog_direction(self, src: NodeId, dst: NodeId) -> None:
        key = (src, dst)
        self.clogged[key] = self.clogged.get(key, 0) + 1

    def unclog_direction(self, src: NodeId, dst: NodeId) -> None:
        key = (src, dst)
        count = self.clogged.get(key, 0)
        assert count > 0, f"unclog {key} that is not clogged"
        if count > 1:
            self.clogged[key] = count - 1
            return
        del self.clogged[key]
        held = self.held.pop(key, [])
        # Release in arrival order, a hair apart so the receiver sees them in order.
        for i, (incarnation, message) in enumerate(held):
            self.world.call_later(1e-6 * (i + 1), self._release, src, dst, message, incarnation)

    def _release(self, src: NodeId, dst: NodeId, message: Message, incarnation: int) -> None:
        key = (src, dst)
        if key in self.clogged:
            self.held.setdefault(key, []).append((incarnation, message))
            return
        self.inflight[key] -= 1
        self._hand_over(src, dst, message, incarnation)

    def set_link_down(self, link: Link, down: bool) -> None:
        if down:
            link.down += 1
        else:
            assert link.down > 0, f"{link} is not down"
            link.down -= 1

    # --- membership --------------------------------------------------------------------------

    def hears(self, a: NodeId, b: NodeId) -> bool:
        """Would ``a`` currently receive ``b``'s keepalives?"""
        hosts = self.world.hosts
        ha, hb = hosts[a], hosts[b]
        if ha.node is None or hb.node is None or hb.paused:
            return False
        key = (b, a)
        if key in self.cut or key in self.clogged:
            return False
        return self.route(a, b) is not None

    def refresh(self) -> None:
        """Re-derive who hears whom after any fault or lifecycle change."""
        if self.opts.ring_data_plane:
            self._poke()
        hosts = self.world.hosts
        ids = self.world.host_ids
        for a in ids:
            if hosts[a].paused:
                continue  # a frozen process notices nothing until it resumes
            for b in ids:
                if a == b:
                    continue
                now_true = self.hears(a, b)
                key = (a, b)
                if self.truth.get(key, False) == now_true:
                    continue
                self.truth[key] = now_true
                gen = self.gen.get(key, 0) + 1
                self.gen[key] = gen
                if now_true:
                    delay = self.opts.discovery_s
                elif hosts[b].node is None:
                    delay = self.opts.crash_detect_s
                    if self.opts.crash_detect_spread_s:
                        delay += self._membership_rng().uniform(0.0, self.opts.crash_detect_spread_s)
                else:
                    delay = self.opts.lease_s
                    if self.opts.lease_spread_s:
                        delay += self._membership_rng().uniform(0.0, self.opts.lease_spread_s)
                self.world.call_later(delay, self._membership_change, a, b, gen)

    def _membership_rng(self) -> random.Random:
        """The draws of detection spreads: their own stream, so runs without a spread draw nothing."""
        if self._spread_rng is None:
            self._spread_rng = self.world.rngs("membership")
        return self._spread_rng

    def forget(self, a: NodeId) -> None:
        """``a`` crashed: its view and its side of the truth start from nothing."""
        self.view[a] = set()
        for b in self.world.host_ids:
            if b != a:
                key = (a, b)
                self.truth[key] = False
                self.gen[key] = self.gen.get(key, 0) + 1

    def _membership_change(self, a: NodeId, b: NodeId, gen: int) -> None:
        key = (a, b)
        if self.gen.get(key) != gen:
            return  # superseded by a later change (it flapped back within the delay)
        host = self.world.hosts[a]
        if host.node is None:
            return
        view = self.view.setdefault(a, set())
        present = self.truth[key]
        if present == (b in view):
            return
        if present:
            view.add(b)
        else:
            view.discard(b)
        host.feed(PeersChanged(peers=frozenset(view)))

    def visible_peers(self, a: NodeId) -> list[NodeId]:
        return sorted(self.view.get(a, ()))

    # --- data plane (runner rings) ---------------------------------------------------------------

    def _poke(self) -> None:
        """Wake whoever waits on ``changed`` (runners re-checking their ring)."""
        event, self.changed = self.changed, self.env.event()
        event.succeed()

    def block_ring_address(self, address: str, blocked: bool) -> None:
        """Make ring connections to ``address`` ("ip:port") fail, or stop doing so."""
        count = self.ring_blocked.get(address, 0) + (1 if blocked else -1)
        assert count >= 0, f"unblock {address} that is not blocked"
        if count:
            self.ring_blocked[address] = count
        else:
            del self.ring_blocked[address]
        self._poke()

    def ring_hop_reachable(self, src: NodeId, dst: NodeId, address: str) -> bool:
        """Can a rank on ``src`` connect to the rank on ``dst`` listening at ``address`` ("ip:port")?"""
        if address in self.ring_blocked:
            return False
        ip = address.rsplit(":", 1)[0].strip("[]")
        if src == dst:
            return True  # loopback
        return any(link.up and link.address_of(dst) == ip for link in self.links.get(_pair(src, dst), ()))


def probe_reachable(net: Network, a: NodeId, b: NodeId, link: Link) -> bool:
    """Does a probe from ``a`` to ``b``'s address on ``link`` get an answer?"""
    hosts = net.world.hosts
    hb = hosts[b]
    if not link.up or hb.node is None or hb.paused:
        return False
    for key in ((a, b), (b, a)):
        if key in net.cut or key in net.clogged:
            return False
    return True

