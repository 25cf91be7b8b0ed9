"""Fault injection: every fault the simulator knows, each with its own heal.

Theory of operation
-------------------
``Faults`` turns a fault kind into changes of the world (a crashed host, cut
directions, clogged links, a full disk...) and returns a ``Fault`` whose
``heal()`` undoes exactly those changes. Faults compose: the network keeps
reference counts, so two overlapping partitions heal independently. Every
fault is recorded (start, end, description) for the trace and the timeline
picture.

When a fault takes a master away from some hosts (a crash, a pause, an
isolation or a partition), the hosts that no longer hear the master are told
to the client hub: requests they sent in that master's session must end
within ``failover_end_bound_s`` (invariant 8).

``swarm(duration)`` is the TigerBeetle-style fault generator: faults of the
kinds enabled for the seed arrive at exponential intervals, each with a random
target and duration, until the chaos phase ends.

Invariants kept: a fault heals at most once; ``heal_all`` leaves no cut,
clogged or downed link, no paused host and no faulty disk; at most
``crash_stop_max`` hosts are stopped for good, and at least one host is
always left able to run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import simpy

from skulk.core.ids import NodeId

from sim.network import Link

if TYPE_CHECKING:
    from sim.host import SimHost
    from sim.world import World

__all__ = ["Fault", "Faults"]


class Fault:
    """One injected fault; ``heal()`` undoes it (idempotent)."""

    __slots__ = ("kind", "target", "started_at", "ended_at", "_undo", "_faults")

    def __init__(self, faults: Faults, kind: str, target: str, undo: Callable[[], None] | None) -> None:
        self._faults = faults
        self.kind = kind
        self.target = target
        self.started_at = faults.world.env.now
        self.ended_at: float | None = None if undo is not None else self.started_at
        self._undo = undo

    @property
    def active(self) -> bool:
        return self.ended_at is None

    def heal(self) -> None:
        if self.ended_at is not None:
            return
        self.ended_at = self._faults.world.env.now
        undo, self._undo = self._undo, None
        self._faults._healed(self)
        if undo is not None:
            undo()

    def describe(self) -> str:
        return f"{self.kind}({self.target})"


class Faults:
    """The world's fault injector and the record of every fault."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.env = world.env
        self.history: list[Fault] = []
        self.active: list[Fault] = []
        self.stopped_for_good = 0

    # --- bookkeeping --------------------------------------------------------------------

    def _record(self, kind: str, target: str, undo: Callable[[], None] | None) -> Fault:
        fault = Fault(self, kind, target, undo)
        self.history.append(fault)
        if fault.active:
            self.active.append(fault)
        self.world.trace_note("-", "fault", fault.describe())
        self.world.notify("fault_started", fault)
        return fault

    def _healed(self, fault: Fault) -> None:
        if fault in self.active:
            self.active.remove(fault)
        self.world.trace_note("-", "heal", fault.describe())
        self.world.notify("fault_healed", fault)

    def heal_after(self, fault: Fault, delay_s: float) -> Fault:
        self.world.call_later(delay_s, fault.heal)
        return fault

    def heal_all(self) -> None:
        """Heal every active fault, oldest first."""
        for fault in list(self.active):
            fault.heal()

    def _with_master_watch(self, change: Callable[[], None]) -> None:
        """Apply ``change``; hosts that stop hearing a master get its requests bounded."""
        world = self.world
        net = world.network
        before: list[tuple[NodeId, Any, list[NodeId]]] = []
        for host in world.running_hosts():
            node = host.node
            if node is not None and node.is_master and node.master is not None:
                hearing = [h.id for h in world.running_hosts() if h.id != host.id and net.hears(h.id, host.id)]
                before.append((host.id, node.master.session, hearing))
        change()
        for master, session, hearing in before:
            lost = [h for h in hearing if not net.hears(h, master)]
            if world.hosts[master].node is None or world.hosts[master].paused:
                lost = hearing
            if lost:
                world.notify("master_lost", master, session, lost)
                world.clients.master_lost(session, lost)

    # --- process faults -----------------------------------------------------------------------

    def crash_stop(self, host: SimHost) -> Fault:
        """``host`` dies and never comes back."""
        assert host.node is not None
        self._with_master_watch(host.crash)
        host.stopped_for_good = True
        self.stopped_for_good += 1
        return self._record("crash_stop", host.id, None)

    def crash_restart(self, host: SimHost) -> Fault:
        """``host`` dies; ``heal()`` boots it again from its persisted record."""
        assert host.node is not None
        self._with_master_watch(host.crash)

        def undo() -> None:
            if host.node is None and not host.stopped_for_good:
                host.boot()

        return self._record("crash_restart", host.id, undo)

    def pause(self, host: SimHost) -> Fault:
        """``host`` freezes; ``heal()`` resumes it."""
        assert host.node is not None and not host.paused
        incarnation = host.incarnation
        self._with_master_watch(host.pause)

        def undo() -> None:
            if host.incarnation == incarnation and host.paused:
                host.resume()

        return self._record("pause", host.id, undo)

    # --- network faults ------------------------------------------------------------------------------

    def _cut(self, pairs: list[tuple[NodeId, NodeId]], kind: str, target: str) -> Fault:
        net = self.world.network

        def change() -> None:
            for src, dst in pairs:
                net.cut_direction(src, dst)
            net.refresh()

        def undo() -> None:
            for src, dst in pairs:
                net.uncut_direction(src, dst)
            net.refresh()

        self._with_master_watch(change)
        return self._record(kind, target, undo)

    def partition(self, groups: list[list[NodeId]]) -> Fault:
        """Cut every direction between hosts of different groups (unlisted hosts: alone)."""
        member: dict[NodeId, int] = {}
        for g, names in enumerate(groups):
            for name in names:
                member[name] = g
        ids = self.world.host_ids
        pairs = []
        for a in ids:
            for b in ids:
                if a != b and member.get(a, -1 - ids.index(a)) != member.get(b, -1 - ids.index(b)):
                    pairs.append((a, b))
        target = " | ".join(",".join(sorted(g)) for g in groups)
        return self._cut(pairs, "partition", target)

    def partition_oneway(self, src: NodeId, dst: NodeId) -> Fault:
        """``src`` can no longer reach ``dst`` (the other direction still works)."""
        return self._cut([(src, dst)], "partition_asymmetric", f"{src}->{dst}")

    def isolate(self, host: SimHost) -> Fault:
        ids = self.world.host_ids
        pairs = [(host.id, o) for o in ids if o != host.id] + [(o, host.id) for o in ids if o != host.id]
        return self._cut(pairs, "isolate_one", host.id)

    def clog(self, hosts: list[NodeId], rng: random.Random, *, hold_s: float) -> Fault:
        """Swizzle-clog: clog ``hosts``' links one at a time, hold, unclog in random order."""
        net = self.world.network
        ids = self.world.host_ids
        directions = []
        for h in hosts:
            for o in ids:
                if o != h:
                    directions.extend([(h, o), (o, h)])
        clogged: list[tuple[NodeId, NodeId]] = []
        stop = {"healed": False}

        def swizzle() -> Generator[simpy.Event, Any, None]:
            for d in directions:
                if stop["healed"]:
                    return
                net.clog_direction(*d)
                clogged.append(d)
                net.refresh()
                yield self.env.timeout(rng.uniform(0.0, 0.5))
            yield self.env.timeout(hold_s)
            order = list(clogged)
            rng.shuffle(order)
            for d in order:
                if stop["healed"]:
                    return
                if d in clogged:
                    clogged.remove(d)
                    net.unclog_direction(*d)
                    net.refresh()
                yield self.env.timeout(rng.uniform(0.0, 0.5))

        def undo() -> None:
            stop["healed"] = True
            for d in list(clogged):
                clogged.remove(d)
                net.unclog_direction(*d)
            net.refresh()

        fault = self._record("clog", ",".join(hosts), undo)
        self.world.process(swizzle())
        return fault

    def set_link(self, link: Link, *, kind: str) -> Fault:
        net = self.world.network

        def change() -> None:
            net.set_link_down(link, True)
            net.refresh()

        def undo() -> None:
            net.set_link_down(link, False)
            net.refresh()

        self._with_master_watch(change)
        return self._record(kind, f"{link.kind} {link.a}<->{link.b}", undo)

    def interconnect_loss(self, a: NodeId, b: NodeId) -> Fault | None:
        """Pull the fastest direct cable between ``a`` and ``b`` (None: no direct link)."""
        for link in self.world.network.links_between(a, b):
            if link.kind != "vpn" and link.up:
                return self.set_link(link, kind="interconnect_loss")
        return None

    def vpn_only(self, a: NodeId, b: NodeId) -> Fault | None:
        """Every direct link between ``a`` and ``b`` goes down; only the VPN is left."""
        net = self.world.network
        direct = [l for l in net.links_between(a, b) if l.kind != "vpn"]
        if not direct:
            return None

        def change() -> None:
            for link in direct:
                net.set_link_down(link, True)
            net.refresh()

        def undo() -> None:
            for link in direct:
                net.set_link_down(link, False)
            net.refresh()

        self._with_master_watch(change)
        return self._record("vpn_only", f"{a}<->{b}", undo)

    def ring_address_unreachable(self, address: str) -> Fault:
        """Ring connections to ``address`` ("ip:port") fail until healed.

        A stale listener or a firewall on the ring port: the node's API and its
        link probes still answer, so the link stays observed. Felt only with
        ``ring_data_plane`` (runners then cannot form a ring through it).
        """
        net = self.world.network
        net.block_ring_address(address, True)

        def undo() -> None:
            net.block_ring_address(address, False)

        return self._record("ring_address_unreachable", address, undo)

    def loss_burst(self) -> Fault:
        net = self.world.network
        net.burst += 1

        def undo() -> None:
            net.burst -= 1

        return self._record("loss_burst", "all links", undo)

    # --- host faults ---------------------------------------------------------------------------------

    def clock_step(self, host: SimHost, delta_s: float) -> Fault:
        host.step_clock(delta_s)
        return self._record("clock_step", f"{host.id} {delta_s:+.3f}s", None)

    def disk_full(self, host: SimHost) -> Fault:
        host.disk_full += 1

        def undo() -> None:
            host.disk_full -= 1

        return self._record("disk_full", host.id, undo)

    def disk_errors(self, host: SimHost) -> Fault:
        host.disk_errors += 1

        def undo() -> None:
            host.disk_errors -= 1

        return self._record("disk_errors", host.id, undo)

    def runner_crash_loop(self, host: SimHost) -> Fault:
        """Runners started on ``host`` crash while loading until healed; live ones crash now."""
        host.crash_loop += 1
        for runner in sorted(host.runners.values(), key=lambda r: r.spec.runner_id):
            if runner.alive and not runner.stopping:
                runner.exit(1)

        def undo() -> None:
            host.crash_loop -= 1

        return self._record("runner_crash_loop", host.id, undo)

    def runner_wedge(self, host: SimHost) -> Fault:
        """Wedge a live runner on ``host`` now, or the next one to load."""
        live = [r for r in sorted(host.runners.values(), key=lambda r: r.spec.runner_id) if r.alive and not r.stopping]
        if live:
            live[0].wedge()
            target = f"{host.id} {live[0].spec.runner_id}"
        else:
            host.wedge_next += 1
            target = f"{host.id} next runner"
        return self._record("runner_wedge", target, None)

    # --- the swarm ------------------------------------------------------------------------------------------

    def swarm(self, until: float, rng: random.Random) -> Generator[simpy.Event, Any, None]:
        """Inject faults of the enabled kinds at random until ``until`` (a simpy process)."""
        opts = self.world.opts
        kinds = [k for k in opts.fault_kinds if k != "abandon_storm"]
        if not kinds:
            return
        while True:
            yield self.env.timeout(rng.expovariate(1.0 / opts.fault_mean_interval_s))
            if self.env.now >= until:
                return
            kind = rng.choice(kinds)
            duration = rng.uniform(opts.fault_duration_s_min, opts.fault_duration_s_max)
            duration = min(duration, max(0.0, until - self.env.now))
            fault = self.inject(kind, rng, duration)
            if fault is not None and fault.active:
                self.heal_after(fault, duration)

    def inject(self, kind: str, rng: random.Random, duration_s: float) -> Fault | None:
        """One fault of ``kind`` on random targets (None when no target fits now)."""
        world = self.world
        opts = world.opts
        up = [h for h in world.running_hosts()]
        ids = world.host_ids
        if kind in ("crash_stop", "crash_restart", "pause"):
            # Keep at least one host running, so the cluster always has someone to elect.
            if len(up) <= 1:
                return None
            host = rng.choice(up)
            if kind == "crash_stop":
                if self.stopped_for_good >= opts.crash_stop_max or len(up) <= 2:
                    return None
                return self.crash_stop(host)
            if kind == "crash_restart":
                fault = self.crash_restart(host)
                down = rng.uniform(0.5, max(0.5, opts.restart_delay_s_max))
                return self.heal_after(fault, min(down, duration_s) if duration_s > 0.5 else 0.5)
            return self.pause(host)
        if kind == "partition_symmetric":
            shuffled = list(ids)
            rng.shuffle(shuffled)
            cut = rng.randint(1, len(ids) - 1) if len(ids) > 1 else 0
            if cut == 0:
                return None
            return self.partition([sorted(shuffled[:cut]), sorted(shuffled[cut:])])
        if kind == "partition_asymmetric":
            if len(ids) < 2:
                return None
            a, b = rng.sample(ids, 2)
            return self.partition_oneway(a, b)
        if kind == "isolate_one":
            if not up:
                return None
            return self.isolate(rng.choice(up))
        if kind == "clog":
            chosen = sorted(rng.sample(ids, rng.randint(1, max(1, len(ids) // 2))))
            return self.clog(chosen, rng, hold_s=duration_s * 0.5)
        if kind == "clock_step":
            if not up:
                return None
            delta = rng.uniform(-opts.clock_step_s_max, opts.clock_step_s_max)
            return self.clock_step(rng.choice(up), delta)
        if kind == "disk_full":
            return self.disk_full(world.hosts[rng.choice(ids)])
        if kind == "disk_errors":
            return self.disk_errors(world.hosts[rng.choice(ids)])
        if kind in ("interconnect_loss", "vpn_only"):
            if len(ids) < 2:
                return None
            a, b = sorted(rng.sample(ids, 2))
            return self.interconnect_loss(a, b) if kind == "interconnect_loss" else self.vpn_only(a, b)
        if kind == "runner_crash_loop":
            return self.runner_crash_loop(world.hosts[rng.choice(ids)])
        if kind == "runner_wedge":
            if not up:
                return None
            return self.runner_wedge(rng.choice(up))
        if kind == "loss_burst":
            return self.loss_burst()
        raise AssertionError(f"unknown fault kind {kind!r}")
