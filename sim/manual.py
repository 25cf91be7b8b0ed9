"""A hand-stepped cluster of real core nodes, for tests and Hypothesis.

Where the simpy simulator (``sim.world``) models time, links and faults with
distributions, ``ManualCluster`` lets a test decide every step: deliver or drop
a particular in-flight message, fire the next timer, partition, crash or
restart a node. Hypothesis stateful tests use these steps as rules, so a
failing schedule shrinks to a minimal one.

It drives the very same ``skulk.core.node.CoreNode``; runners are modelled
just enough to become ready and stream a few tokens.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from skulk.core.cards import ModelCard
from skulk.core.config import CoreConfig
from skulk.core.effects import (
    AppendLog,
    CancelRunnerTask,
    CancelTimer,
    CommandCompleted,
    DeliverChunk,
    DispatchTask,
    Effect,
    Log,
    NodeRecord,
    PersistNode,
    Send,
    SessionChanged,
    SetTimer,
    StartRunner,
    StopRunner,
    WriteSnapshot,
)
from skulk.core.ids import NodeId, RunnerId, TaskId
from skulk.core.inputs import (
    Boot,
    InfoObserved,
    Input,
    LinkProbed,
    PeersChanged,
    Received,
    RunnerExited,
    RunnerOutput,
    RunnerStatusObserved,
    TimerFired,
)
from skulk.core.instances import LinkKind, RunnerLoaded, RunnerLoading, RunnerReady, RunnerSpec, RunnerWarmingUp
from skulk.core.messages import Message
from skulk.core.node import CoreNode
from skulk.core.telemetry import Memory, MemoryInfo, NetworkInfo, NetworkInterface, NodeIdentity
from skulk.core.tasks import TokenChunk, Usage

__all__ = ["ManualCluster", "InFlight", "GIB"]

GIB = 1024**3


@dataclass
class InFlight:
    seq: int
    sender: NodeId
    to: NodeId
    message: Message


@dataclass
class _Host:
    node: CoreNode | None
    record: NodeRecord | None = None
    ram_total: int = 64 * GIB
    ram_used: int = 0
    address: str = ""
    kind: LinkKind = "ethernet"
    runners: dict[RunnerId, RunnerSpec] = field(default_factory=dict)
    tasks: dict[TaskId, RunnerId] = field(default_factory=dict)


class ManualCluster:
    """``n`` nodes named n1..nN, fully connected, nothing delivered until asked."""

    def __init__(
        self,
        n: int,
        *,
        config: CoreConfig | None = None,
        cards: Mapping[str, ModelCard] | None = None,
        ram_gib: Iterable[int] | None = None,
        runner_load_s: float = 2.0,
        tokens_per_request: int = 3,
    ) -> None:
        self.config = config or CoreConfig()
        self.cards = dict(cards or {})
        self.now = 0.0
        self.runner_load_s = runner_load_s
        self.tokens_per_request = tokens_per_request
        rams = list(ram_gib) if ram_gib is not None else [64] * n
        assert len(rams) == n
        self.hosts: dict[NodeId, _Host] = {}
        for i in range(n):
            nid = NodeId(f"n{i + 1}")
            self.hosts[nid] = _Host(node=None, ram_total=rams[i] * GIB, address=f"10.0.0.{i + 1}")
        self.inflight: list[InFlight] = []
        self._seq = itertools.count()
        # (at, seq, node, key) heap plus the live key->at map per node.
        self._timer_heap: list[tuple[float, int, NodeId, str]] = []
        self._timers: dict[NodeId, dict[str, float]] = {nid: {} for nid in self.hosts}
        self.cut: set[frozenset[NodeId]] = set()
        self.peers_seen: dict[NodeId, frozenset[NodeId]] = {}
        self.delivered: dict[str, list[TokenChunk]] = {}
        self.completed: dict[str, CommandCompleted] = {}
        self.log: list[tuple[float, NodeId, str]] = []
        self.session_changes: list[tuple[float, NodeId, SessionChanged]] = []
        # Checkers (chaos.checkers.SafetyChecker) that see every step, boot and crash.
        self.observers: list[Any] = []

    # --- queries ---------------------------------------------------------------

    def node(self, nid: str) -> CoreNode:
        node = self.hosts[NodeId(nid)].node
        assert node is not None, f"{nid} is down"
        return node

    def alive(self) -> list[NodeId]:
        return [nid for nid, h in self.hosts.items() if h.node is not None]

    def masters(self) -> list[NodeId]:
        return [nid for nid in self.alive() if self.node(nid).is_master]

    def connected(self, a: NodeId, b: NodeId) -> bool:
        return frozenset((a, b)) not in self.cut

    # --- lifecycle ------------------------------------------------------------------

    def boot_all(self) -> None:
        for nid in list(self.hosts):
            self.boot(nid)

    def boot(self, nid: str) -> None:
        nid = NodeId(nid)
        host = self.hosts[nid]
        assert host.node is None
        host.node = CoreNode(nid, self.config, cards=self.cards, record=host.record)
        self._notify("node_booted", nid)
        host.runners.clear()
        host.tasks.clear()
        host.ram_used = 0
        self._timers[nid] = {}
        self._feed(nid, Boot())
        self._feed(nid, self._telemetry(nid))
        self._refresh_membership()

    def crash(self, nid: str) -> None:
        nid = NodeId(nid)
        host = self.hosts[nid]
        if host.node is not None:
            self._notify("node_crashed", nid)
        host.node = None
        host.runners.clear()
        host.tasks.clear()
        self._timers[nid] = {}
        self.inflight = [m for m in self.inflight if m.to != nid and m.sender != nid]
        self.peers_seen.pop(nid, None)
        self._refresh_membership()

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every link between different groups (nodes not listed are isolated)."""
        member = {}
        for g, names in enumerate(groups):
            for name in names:
                member[NodeId(name)] = g
        self.cut = set()
        ids = sorted(self.hosts)
        for a, b in itertools.combinations(ids, 2):
            if member.get(a, -1 - ids.index(a)) != member.get(b, -2 - ids.index(b)):
                self.cut.add(frozenset((a, b)))
        self.inflight = [m for m in self.inflight if self.connected(m.sender, m.to)]
        self._refresh_membership()

    def heal(self) -> None:
        self.cut = set()
        self._refresh_membership()

    # --- steps -------------------------------------------------------------------------

    def deliver(self, i: int = 0) -> None:
        msg = self.inflight.pop(i)
        if self.hosts[msg.to].node is None or not self.connected(msg.sender, msg.to):
            return
        self._feed(msg.to, Received(sender=msg.sender, message=msg.message))

    def drop(self, i: int = 0) -> None:
        self.inflight.pop(i)

    def duplicate(self, i: int = 0) -> None:
        m = self.inflight[i]
        self.inflight.append(InFlight(next(self._seq), m.sender, m.to, m.message))

    def next_timer_at(self) -> float | None:
        while self._timer_heap:
            at, _, nid, key = self._timer_heap[0]
            if self._timers.get(nid, {}).get(key) == at and self.hosts[nid].node is not None:
                return at
            heapq.heappop(self._timer_heap)
        return None

    def fire_next_timer(self) -> bool:
        at = self.next_timer_at()
        if at is None:
            return False
        _, _, nid, key = heapq.heappop(self._timer_heap)
        self.now = max(self.now, at)
        del self._timers[nid][key]
        if key.startswith("sim."):
            self._sim_timer(nid, key)
        else:
            self._feed(nid, TimerFired(key=key))
        return True

    def settle(self, *, until: float | None = None, max_steps: int = 200_000) -> None:
        """Deliver everything in flight and fire timers in time order until ``until``."""
        limit = self.now + 60.0 if until is None else until
        for _ in range(max_steps):
            if self.inflight:
                self.deliver(0)
                continue
            at = self.next_timer_at()
            if at is None or at > limit:
                self.now = max(self.now, limit)
                return
            self.fire_next_timer()
        raise AssertionError("cluster did not settle")

    def submit(self, nid: str, inp: Input) -> None:
        self._feed(NodeId(nid), inp)

    # --- internals -------------------------------------------------------------------------

    def _telemetry(self, nid: NodeId) -> InfoObserved:
        host = self.hosts[nid]
        return InfoObserved(
            identity=NodeIdentity(friendly_name=f"host-{nid}", version="sim"),
            memory=MemoryInfo(
                ram_total=Memory(in_bytes=host.ram_total),
                ram_available=Memory(in_bytes=host.ram_total - host.ram_used - 4 * GIB),
            ),
            network=NetworkInfo(interfaces=(NetworkInterface(name="en0", ip_address=host.address, kind=host.kind),)),
        )

    def _refresh_membership(self) -> None:
        alive = self.alive()
        for nid in alive:
            peers = frozenset(p for p in alive if p != nid and self.connected(nid, p))
            if self.peers_seen.get(nid) != peers:
                self.peers_seen[nid] = peers
                self._feed(nid, PeersChanged(peers=peers))
                for p in sorted(peers):
                    self._feed(
                        nid,
                        LinkProbed(sink=p, address=self.hosts[p].address, kind=self.hosts[p].kind, reachable=True),
                    )

    def _feed(self, nid: NodeId, inp: Input) -> None:
        node = self.hosts[nid].node
        if node is None:
            return
        effects = node.handle(self.now, inp)
        for observer in self.observers:
            observer.after_step(nid, node, inp, effects)
        self._carry_out(nid, effects)

    def _notify(self, event: str, *args: Any) -> None:
        for observer in self.observers:
            hook = getattr(observer, event, None)
            if hook is not None:
                hook(*args)

    def _carry_out(self, nid: NodeId, effects: list[Effect]) -> None:
        host = self.hosts[nid]
        for effect in effects:
            if isinstance(effect, Send):
                targets = [effect.to] if effect.to is not None else [p for p in self.alive() if p != nid]
                for to in targets:
                    if to in self.hosts and self.hosts[to].node is not None and self.connected(nid, to):
                        self.inflight.append(InFlight(next(self._seq), nid, to, effect.message))
            elif isinstance(effect, SetTimer):
                self._timers[nid][effect.key] = effect.at
                heapq.heappush(self._timer_heap, (effect.at, next(self._seq), nid, effect.key))
            elif isinstance(effect, CancelTimer):
                self._timers[nid].pop(effect.key, None)
            elif isinstance(effect, PersistNode):
                host.record = effect.record
            elif isinstance(effect, StartRunner):
                host.runners[effect.spec.runner_id] = effect.spec
                self._sim_later(nid, f"sim.runner.loading.{effect.spec.runner_id}", 0.1)
                self._sim_later(nid, f"sim.runner.ready.{effect.spec.runner_id}", self.runner_load_s)
            elif isinstance(effect, StopRunner):
                if host.runners.pop(effect.runner_id, None) is not None:
                    self._sim_later(nid, f"sim.runner.exit.{effect.runner_id}", 0.1)
            elif isinstance(effect, DispatchTask):
                host.tasks[effect.task.task_id] = effect.runner_id
                self._sim_later(nid, f"sim.task.{effect.runner_id}.{effect.task.task_id}.{effect.task.command_id}", 0.5)
            elif isinstance(effect, CancelRunnerTask):
                host.tasks.pop(effect.task_id, None)
            elif isinstance(effect, DeliverChunk):
                self.delivered.setdefault(effect.chunk.command_id, []).append(effect.chunk)
            elif isinstance(effect, CommandCompleted):
                self.completed[effect.command_id] = effect
            elif isinstance(effect, SessionChanged):
                self.session_changes.append((self.now, nid, effect))
            elif isinstance(effect, Log):
                self.log.append((self.now, nid, effect.message))
            elif isinstance(effect, (AppendLog, WriteSnapshot)):
                pass
            else:
                raise AssertionError(f"unhandled effect {type(effect).__name__}")

    def _sim_later(self, nid: NodeId, key: str, delay: float) -> None:
        at = self.now + delay
        self._timers[nid][key] = at
        heapq.heappush(self._timer_heap, (at, next(self._seq), nid, key))

    def _sim_timer(self, nid: NodeId, key: str) -> None:
        host = self.hosts[nid]
        parts = key.split(".")
        if parts[1] == "runner":
            runner_id = RunnerId(".".join(parts[3:]))
            if parts[2] == "exit":
                self._feed(nid, RunnerExited(runner_id=runner_id, exit_code=0))
                return
            spec = host.runners.get(runner_id)
            if spec is None:
                return
            if parts[2] == "loading":
                self._feed(nid, RunnerStatusObserved(runner_id=runner_id, status=RunnerLoading()))
            else:
                for status in (RunnerLoaded(), RunnerWarmingUp(), RunnerReady(context_ceiling=spec.context_ceiling)):
                    self._feed(nid, RunnerStatusObserved(runner_id=runner_id, status=status))
        elif parts[1] == "task":
            runner_id, task_id, command_id = RunnerId(parts[2]), TaskId(parts[3]), parts[4]
            if host.tasks.pop(task_id, None) is None or runner_id not in host.runners:
                return
            n = self.tokens_per_request
            for seq in range(n):
                last = seq == n - 1
                chunk = TokenChunk(
                    command_id=command_id,  # type: ignore[arg-type]
                    task_id=task_id,
                    seq=seq,
                    text=f"t{seq}",
                    token_ids=(seq,),
                    finish_reason="stop" if last else None,
                    usage=Usage(prompt_tokens=1, completion_tokens=n, total_tokens=n + 1) if last else None,
                )
                self._feed(nid, RunnerOutput(runner_id=runner_id, chunk=chunk))
