"""A hand-stepped cluster of real core nodes, for tests and Hypothesis.

Where the simpy simulator (``sim.world``) models time, links and faults with
distributions, ``ManualCluster`` lets a test decide every step: deliver or drop
a particular in-flight message, fire the next timer, partition, crash or
restart a node. Hypothesis stateful tests use these steps as rules, so a
failing schedule shrinks to a minimal one.

It drives the very same ``skulk.core.node.CoreNode``; runners are modelled
just enough to become ready and stream a few tokens. Disks are modelled just
enough for the file keeper: every host holds every card's model, verified,
unless ``disks`` says otherwise; a transfer completes ``transfer_s`` after it
starts (whole files: the need it was asked for), and a deletion at once.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from skulk.core.cards import ModelCard
from skulk.core.config import CoreConfig
from skulk.core.effects import (
    AppendLog,
    EffectCarrier,
    CancelRunnerTask,
    CancelTimer,
    CancelTransfer,
    CommandCompleted,
    DeleteFiles,
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
    StartTransfer,
    StopRunner,
    WriteSnapshot,
)
from skulk.core.files import Coverage
from skulk.core.ids import CommandId, ModelId, NodeId, RunnerId, TaskId
from skulk.core.inputs import (
    Boot,
    FilesGone,
    FilesObserved,
    InfoObserved,
    Input,
    LinkProbed,
    PeersChanged,
    Received,
    RunnerExited,
    RunnerOutput,
    RunnerStatusObserved,
    TimerFired,
    TransferEnded,
)
from skulk.core.instances import LinkKind, RunnerLoaded, RunnerLoading, RunnerReady, RunnerSpec, RunnerWarmingUp
from skulk.core.messages import Message
from skulk.core.node import CoreNode
from skulk.core.telemetry import Memory, MemoryInfo, NetworkInfo, NetworkInterface, NodeIdentity
from skulk.core.tasks import TokenChunk, Usage
from sim.files import whole_coverage

__all__ = ["ManualCluster", "InFlight", "GIB"]

GIB = 1024**3


@dataclass
class InFlight:
    seq: int
    sender: NodeId
    to: NodeId
    message: Message


# The cluster's own scheduled happenings (runner reports), kept beside the
# core's timers in one time-ordered heap. Equal keys replace each other, as
# the core's timer keys do.


@dataclass(frozen=True)
class _RunnerLoading:
    runner_id: RunnerId


@dataclass(frozen=True)
class _RunnerReady:
    runner_id: RunnerId


@dataclass(frozen=True)
class _RunnerExit:
    runner_id: RunnerId


@dataclass(frozen=True)
class _TaskDone:
    runner_id: RunnerId
    task_id: TaskId
    command_id: CommandId


@dataclass(frozen=True)
class _TransferDone:
    transfer_id: str


@dataclass(frozen=True)
class _Later:
    """An input for the node, handled as the next step (never inside the step that raised it)."""

    seq: int


_SimKey = _RunnerLoading | _RunnerReady | _RunnerExit | _TaskDone | _TransferDone | _Later
TimerKey = str | _SimKey  # a core timer's key, or one of the cluster's own


class _Host(EffectCarrier):
    """One node's machine: carries out its node's effects on the cluster."""

    def __init__(self, cluster: ManualCluster, nid: NodeId, *, ram_total: int, address: str) -> None:
        self.cluster = cluster
        self.nid = nid
        self.node: CoreNode | None = None
        self.record: NodeRecord | None = None
        self.ram_total = ram_total
        self.ram_used = 0
        self.address = address
        self.kind: LinkKind = "ethernet"
        self.runners: dict[RunnerId, RunnerSpec] = {}
        self.tasks: dict[TaskId, RunnerId] = {}
        # Verified model files on this host's disk (they survive a crash), and transfers in flight.
        self.disk: dict[ModelId, Coverage] = {}
        self.transfers: dict[str, StartTransfer] = {}

    def carry_send(self, effect: Send) -> None:
        c, nid = self.cluster, self.nid
        targets = [effect.to] if effect.to is not None else [p for p in c.alive() if p != nid]
        for to in targets:
            if to in c.hosts and c.hosts[to].node is not None and c.connected(nid, to):
                c.inflight.append(InFlight(next(c._seq), nid, to, effect.message))

    def carry_set_timer(self, effect: SetTimer) -> None:
        self.cluster._schedule(self.nid, effect.key, effect.at)

    def carry_cancel_timer(self, effect: CancelTimer) -> None:
        self.cluster._timers[self.nid].pop(effect.key, None)

    def carry_persist_node(self, effect: PersistNode) -> None:
        self.record = effect.record

    def carry_append_log(self, effect: AppendLog) -> None:
        pass  # no disk: the record is the only state that survives a crash here

    def carry_write_snapshot(self, effect: WriteSnapshot) -> None:
        pass

    def carry_start_runner(self, effect: StartRunner) -> None:
        runner_id = effect.spec.runner_id
        self.runners[runner_id] = effect.spec
        now = self.cluster.now
        self.cluster._schedule(self.nid, _RunnerLoading(runner_id), now + 0.1)
        self.cluster._schedule(self.nid, _RunnerReady(runner_id), now + self.cluster.runner_load_s)

    def carry_stop_runner(self, effect: StopRunner) -> None:
        if self.runners.pop(effect.runner_id, None) is not None:
            self.cluster._schedule(self.nid, _RunnerExit(effect.runner_id), self.cluster.now + 0.1)

    def carry_dispatch_task(self, effect: DispatchTask) -> None:
        task = effect.task
        self.tasks[task.task_id] = effect.runner_id
        self.cluster._schedule(self.nid, _TaskDone(effect.runner_id, task.task_id, task.command_id), self.cluster.now + 0.5)

    def carry_cancel_runner_task(self, effect: CancelRunnerTask) -> None:
        self.tasks.pop(effect.task_id, None)

    def carry_deliver_chunk(self, effect: DeliverChunk) -> None:
        self.cluster.delivered.setdefault(effect.chunk.command_id, []).append(effect.chunk)

    def carry_command_completed(self, effect: CommandCompleted) -> None:
        self.cluster.completed[effect.command_id] = effect

    def carry_session_changed(self, effect: SessionChanged) -> None:
        self.cluster.session_changes.append((self.cluster.now, self.nid, effect))

    def carry_log(self, effect: Log) -> None:
        self.cluster.log.append((self.cluster.now, self.nid, effect.message))

    def carry_start_transfer(self, effect: StartTransfer) -> None:
        self.transfers[effect.transfer_id] = effect
        self.cluster.transfers_started.append((self.cluster.now, self.nid, effect))
        source = effect.source or "hub"
        if source in self.cluster.stalled_sources:
            return  # bytes never come: the keeper's stall timer must notice
        self.cluster._schedule(self.nid, _TransferDone(effect.transfer_id), self.cluster.now + self.cluster.transfer_s)

    def carry_cancel_transfer(self, effect: CancelTransfer) -> None:
        tr = self.transfers.pop(effect.transfer_id, None)
        if tr is not None:
            self.cluster._timers[self.nid].pop(_TransferDone(effect.transfer_id), None)
            self.cluster._later(self.nid, TransferEnded(transfer_id=tr.transfer_id, model_id=tr.model_id, ok=False,
                                                        code="cancelled", message="cancelled"))

    def carry_delete_files(self, effect: DeleteFiles) -> None:
        self.disk.pop(effect.model_id, None)
        self.cluster.deleted.append((self.cluster.now, self.nid, effect.model_id))
        self.cluster._later(self.nid, FilesGone(model_id=effect.model_id))

    def files_observed(self, model: ModelId) -> FilesObserved:
        cov = self.disk[model]
        card = self.cluster._card(self.nid, model)
        weight = card.weight_bytes if card is not None else 0
        held = cov.layer_count() + (1 if cov.head else 0)
        return FilesObserved(model_id=model, status="verified", coverage=cov, source="local",
                             bytes=weight * held // (cov.n_layers + 1) if cov.n_layers else weight)


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
        disks: Mapping[str, Iterable[str]] | None = None,
        transfer_s: float = 5.0,
    ) -> None:
        # Transfers from these sources ("hub" or a node id) never move a byte; transfers
        # from those in ``failing_sources`` end with its failure code.
        self.stalled_sources: set[str] = set()
        self.failing_sources: dict[str, str] = {}
        self.transfers_started: list[tuple[float, NodeId, StartTransfer]] = []
        self._later_inputs: dict[int, Input] = {}
        self.config = config or CoreConfig()
        self.cards = dict(cards or {})
        self.now = 0.0
        self.runner_load_s = runner_load_s
        self.transfer_s = transfer_s
        self.deleted: list[tuple[float, NodeId, ModelId]] = []
        self.tokens_per_request = tokens_per_request
        rams = list(ram_gib) if ram_gib is not None else [64] * n
        assert len(rams) == n
        self.hosts: dict[NodeId, _Host] = {}
        for i in range(n):
            nid = NodeId(f"n{i + 1}")
            self.hosts[nid] = _Host(self, nid, ram_total=rams[i] * GIB, address=f"10.0.0.{i + 1}")
            held = sorted(self.cards) if disks is None else sorted(disks.get(nid, ()))
            for model in held:
                self.hosts[nid].disk[ModelId(model)] = whole_coverage(self.cards[model].n_layers)
        self.inflight: list[InFlight] = []
        self._seq = itertools.count()
        # (at, seq, node, key) heap plus the live key->at map per node.
        self._timer_heap: list[tuple[float, int, NodeId, TimerKey]] = []
        self._timers: dict[NodeId, dict[TimerKey, float]] = {nid: {} for nid in self.hosts}
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
        host.transfers.clear()
        host.ram_used = 0
        self._timers[nid] = {}
        self._feed(nid, Boot())
        self._feed(nid, self._telemetry(nid))
        for model in sorted(host.disk):
            self._feed(nid, host.files_observed(model))
        self._refresh_membership()

    def crash(self, nid: str) -> None:
        nid = NodeId(nid)
        host = self.hosts[nid]
        if host.node is not None:
            self._notify("node_crashed", nid)
        host.node = None
        host.runners.clear()
        host.tasks.clear()
        host.transfers.clear()
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
        self._notify("cluster_changed", "partition " + " | ".join(" ".join(sorted(g)) for g in map(list, groups)))
        self._refresh_membership()

    def heal(self) -> None:
        self.cut = set()
        self._notify("cluster_changed", "heal")
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
        if isinstance(key, str):
            self._feed(nid, TimerFired(key=key))
        else:
            self._happen(nid, key)
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
        self.hosts[nid].carry_out(effects)

    def _schedule(self, nid: NodeId, key: TimerKey, at: float) -> None:
        self._timers[nid][key] = at
        heapq.heappush(self._timer_heap, (at, next(self._seq), nid, key))

    def _later(self, nid: NodeId, inp: Input) -> None:
        seq = next(self._seq)
        self._later_inputs[seq] = inp
        self._schedule(nid, _Later(seq), self.now)

    def _card(self, nid: NodeId, model: ModelId) -> ModelCard:
        """The card of ``model`` as ``nid`` knows it (its own cards, then the cards added to the state)."""
        node = self.hosts[nid].node
        if node is not None:
            card = node.cards.get(model) or node.state.model_cards.get(model)
            if card is not None:
                return card
        return self.cards[model]

    def _happen(self, nid: NodeId, key: _SimKey) -> None:
        """One of the cluster's own happenings: a runner reports, exits or finishes a task."""
        host = self.hosts[nid]
        if isinstance(key, _Later):
            self._feed(nid, self._later_inputs.pop(key.seq))
            return
        if isinstance(key, _TransferDone):
            tr = host.transfers.pop(key.transfer_id, None)
            if tr is None:
                return
            code = self.failing_sources.get(tr.source or "hub")
            if code is not None:
                self._feed(nid, TransferEnded(transfer_id=tr.transfer_id, model_id=tr.model_id, ok=False, code=code,
                                              message=f"{code} (planted by the test)"))
                return
            card = self._card(nid, tr.model_id)
            got = Coverage(n_layers=card.n_layers, layers=((tr.need.start, tr.need.end),), head=tr.need.head) \
                if tr.need is not None else whole_coverage(card.n_layers)
            old = host.disk.get(tr.model_id)
            host.disk[tr.model_id] = got if old is None else old.union(got)
            self._feed(nid, host.files_observed(tr.model_id))
            self._feed(nid, TransferEnded(transfer_id=tr.transfer_id, model_id=tr.model_id, ok=True))
            return
        if isinstance(key, _RunnerExit):
            self._feed(nid, RunnerExited(runner_id=key.runner_id, exit_code=0))
            return
        if isinstance(key, (_RunnerLoading, _RunnerReady)):
            spec = host.runners.get(key.runner_id)
            if spec is None:
                return
            if isinstance(key, _RunnerLoading):
                self._feed(nid, RunnerStatusObserved(runner_id=key.runner_id, status=RunnerLoading()))
                return
            for status in (RunnerLoaded(), RunnerWarmingUp(), RunnerReady(context_ceiling=spec.context_ceiling)):
                self._feed(nid, RunnerStatusObserved(runner_id=key.runner_id, status=status))
            return
        runner_id, task_id = key.runner_id, key.task_id
        if host.tasks.pop(task_id, None) is None or runner_id not in host.runners:
            return
        n = self.tokens_per_request
        for seq in range(n):
            last = seq == n - 1
            chunk = TokenChunk(
                command_id=key.command_id,
                task_id=task_id,
                seq=seq,
                text=f"t{seq}",
                token_ids=(seq,),
                finish_reason="stop" if last else None,
                usage=Usage(prompt_tokens=1, completion_tokens=n, total_tokens=n + 1) if last else None,
            )
            self._feed(nid, RunnerOutput(runner_id=runner_id, chunk=chunk))
