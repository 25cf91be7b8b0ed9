"""The master: the single writer of a session's event log.

Theory of operation
-------------------
Only the master of a session turns commands and workers' local events into
indexed events: dense indices from 0, stamped with the master's clock. Event 0
is ``SessionStarted`` carrying the carryover (instances, completed downloads,
connectivity) from the master's last replicated state; tasks, runner statuses
and topology are rebuilt by the workers, not carried.

Local events from each origin are processed in ``origin_idx`` order (early
ones are buffered, duplicates are acknowledged and dropped). Before an event
takes an index it passes the *ingest cap*, its type's rule in
``skulk.core.ingest``: task events for tasks the master does not know are
dropped, runner statuses for runners it does not know are dropped, and facts
it already holds are not indexed again. That is what keeps an abandonment
storm at a small constant number of events per request.

Liveness pruning (nodes silent for ``node_timeout_s``) is suppressed for
``prune_grace_s`` after the session starts, while the topology settles.
Whenever an instance or node is removed, ``TaskFailed`` is indexed for each of
its in-flight tasks first.

The log kept in memory is bounded: a snapshot every ``snapshot_every`` events,
keeping ``retain_before_snapshot`` events before it plus everything after.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, get_args

from skulk.core import ingest, master_policy, placement
from skulk.core.runner_policy import instance_removal_events
from skulk.core.cards import ModelCard
from skulk.core.commands import (
    AddModelCard,
    CancelTask,
    Command,
    CommandResult,
    DeleteInstance,
    EvictModel,
    PlaceInstance,
    RequestStoreDownload,
    SubmitTask,
)
from skulk.core.config import CoreConfig
from skulk.core.effects import AppendLog, Effect, Log, Send, WriteSnapshot
from skulk.core.events import (
    Carryover,
    Event,
    IndexedEvent,
    InstanceCreated,
    ModelCardAdded,
    ModelEvictionRequested,
    SessionStarted,
    StoreDownloadRequested,
    TaskCreated,
    TaskDeleted,
)
from skulk.core.ids import CommandId, NodeId, TaskId, derive_id
from skulk.core.instances import RUNNER_SERVING, Instance, RunnerFailed
from skulk.core.messages import (
    CommandResultMessage,
    GlobalEvent,
    LocalEventAck,
    LocalEventMessage,
    Snapshot,
    SyncRequest,
    SyncResponse,
)
from skulk.core.output import Output
from skulk.core.session import Incarnation, Session
from skulk.core.state import State, digest, encode_state
from skulk.core.tasks import Task
from skulk.core.timers import PruneTimer, set_timer

__all__ = ["Master"]


class Master:
    """Indexes events for one session. Created when this node wins an election."""

    def __init__(
        self,
        node_id: NodeId,
        config: CoreConfig,
        session: Session,
        cards: Mapping[str, ModelCard],
        apply_own: Callable[[IndexedEvent], State],
    ) -> None:
        assert session.master == node_id or config.canary_double_master
        self.node_id = node_id
        self.config = config
        self.session = session
        self._node_cards = cards
        self._apply_own = apply_own
        self.state: State | None = None
        self.started_at = 0.0
        self.next_index = 0
        # Retained log: events[i] has index log_base + i.
        self._log: list[IndexedEvent] = []
        self._log_base = 0
        self._snapshot: Snapshot | None = None
        self._origin_next: dict[NodeId, int] = {}
        self._origin_incarnation: dict[NodeId, Incarnation] = {}
        self._origin_buffer: dict[NodeId, dict[int, LocalEventMessage]] = {}
        self._results: OrderedDict[CommandId, CommandResult] = OrderedDict()
        self._cancelled: OrderedDict[CommandId, None] = OrderedDict()
        self.dropped_by_ingest_cap = 0
        self.active = True
        # Auto-placed models still to settle in this session (see master_policy.auto_place).
        self.auto_pending: list[str] = list(config.auto_place)

    @property
    def cards(self) -> Mapping[str, ModelCard]:
        """The node's cards, plus those added at run time (``state.model_cards``); the node's win."""
        added = self.state.model_cards if self.state is not None else {}
        if not added:
            return self._node_cards
        return {**added, **self._node_cards}

    # --- lifecycle ---------------------------------------------------------------

    def start(self, now: float, last_state: State) -> Output:
        """Seed the session from our last replicated state (event 0)."""
        self.started_at = now
        carry = Carryover(
            instances=dict(last_state.instances),
            downloads=dict(last_state.downloads),
            connections=last_state.topology.connections,
            next_port_offset=last_state.next_port_offset,
            model_copies={n: dict(m) for n, m in last_state.model_copies.items()},
            model_cards=dict(last_state.model_cards),
        )
        effects = self.index(now, SessionStarted(session=self.session, carryover=carry))
        effects.append(set_timer(PruneTimer(), now + self.config.prune_check_interval_s))
        effects.append(
            Log(
                level="info",
                message=f"master of session {self.session}: carried over {len(carry.instances)} instance(s)",
            )
        )
        return Output(effects)

    def stop(self) -> None:
        self.active = False

    # --- indexing ----------------------------------------------------------------

    def index(
        self, now: float, event: Event, origin: NodeId | None = None, origin_idx: int | None = None
    ) -> list[Effect]:
        assert self.active, "a deposed master must not index"
        incarnation = self._origin_incarnation.get(origin) if origin is not None else None
        indexed = IndexedEvent(
            index=self.next_index,
            event=event,
            at=now,
            origin=origin,
            origin_idx=origin_idx,
            origin_incarnation=incarnation,
        )
        self.next_index += 1
        self.state = self._apply_own(indexed)
        assert self.state.last_index == indexed.index
        self._log.append(indexed)
        effects: list[Effect] = [
            AppendLog(session=self.session, indexed=indexed),
            Send(message=GlobalEvent(session=self.session, indexed=indexed)),
        ]
        if self.next_index % self.config.snapshot_every == 0:
            effects += self._take_snapshot()
        return effects

    def index_all(self, now: float, events: list[Event]) -> list[Effect]:
        effects: list[Effect] = []
        for event in events:
            effects += self.index(now, event)
        return effects

    def _take_snapshot(self) -> list[Effect]:
        assert self.state is not None
        snap = Snapshot(
            session=self.session,
            index=self.state.last_index,
            state=encode_state(self.state),
            digest=digest(self.state),
        )
        self._snapshot = snap
        keep_from = max(0, snap.index + 1 - self.config.retain_before_snapshot)
        if keep_from > self._log_base:
            del self._log[: keep_from - self._log_base]
            self._log_base = keep_from
        return [WriteSnapshot(snapshot=snap)]

    # --- commands ----------------------------------------------------------------

    def on_command(self, now: float, origin: NodeId, command: Command) -> Output:
        cached = self._results.get(command.command_id)
        if cached is not None:
            return Output([self._reply(origin, cached)])
        effects, result = self._execute(now, origin, command)
        if result.status != "pending":
            self._results[command.command_id] = result
            while len(self._results) > self.config.command_dedupe_max:
                self._results.popitem(last=False)
        effects.append(self._reply(origin, result))
        return Output(effects)

    def _reply(self, origin: NodeId, result: CommandResult) -> Effect:
        return Send(message=CommandResultMessage(session=self.session, result=result), to=origin)

    def _execute(self, now: float, origin: NodeId, command: Command) -> tuple[list[Effect], CommandResult]:
        assert self.state is not None
        return COMMAND_RULES[type(command)](self, now, origin, command)

    def _place(self, now: float, origin: NodeId, command: PlaceInstance) -> tuple[list[Effect], CommandResult]:
        state = self.state
        assert state is not None
        cid = command.command_id
        outcome = placement.place(state, command, self.cards, self.config)
        if isinstance(outcome, placement.PlacementRefused):
            status = "pending" if outcome.pending else "rejected"
            return [], CommandResult(command_id=cid, status=status, message=outcome.message, code=outcome.code)
        inst = outcome.instance
        effects = self.index(now, InstanceCreated(instance=inst, command_id=cid))
        return effects, CommandResult(command_id=cid, status="accepted", instance_id=inst.instance_id)

    def _delete(self, now: float, origin: NodeId, command: DeleteInstance) -> tuple[list[Effect], CommandResult]:
        state = self.state
        assert state is not None
        cid = command.command_id
        if command.instance_id not in state.instances:
            return [], CommandResult(
                command_id=cid,
                status="rejected",
                code="instance_not_found",
                message=f"no instance {command.instance_id!r}",
            )
        effects = self.index_all(now, instance_removal_events(state, command.instance_id, "deleted by request"))
        return effects, CommandResult(command_id=cid, status="accepted", instance_id=command.instance_id)

    def _cancel(self, now: float, origin: NodeId, command: CancelTask) -> tuple[list[Effect], CommandResult]:
        state = self.state
        assert state is not None
        cid = command.command_id
        self._cancelled[command.target] = None
        while len(self._cancelled) > self.config.command_dedupe_max:
            self._cancelled.popitem(last=False)
        task_id = TaskId(derive_id("task", command.target))
        if task_id in state.tasks:
            effects = self.index(now, TaskDeleted(task_id=task_id, outcome="cancelled"))
            return effects, CommandResult(command_id=cid, status="accepted")
        return [], CommandResult(command_id=cid, status="accepted", message="nothing to cancel")

    def _submit(self, now: float, origin: NodeId, command: SubmitTask) -> tuple[list[Effect], CommandResult]:
        state = self.state
        assert state is not None
        cid = command.command_id
        if cid in self._cancelled:
            return [], CommandResult(command_id=cid, status="rejected", code="cancelled", message="request was cancelled")
        problem = command.params.problem()
        if problem is not None:
            return [], CommandResult(command_id=cid, status="rejected", code="invalid_request", message=problem)
        instance = self._choose_instance(state, command)
        if isinstance(instance, CommandResult):
            return [], instance
        task = Task(
            task_id=TaskId(derive_id("task", cid)),
            command_id=cid,
            origin=origin,
            instance_id=instance.instance_id,
            model_id=command.model_id,
            kind=command.kind,
            params=command.params,
        )
        if task.task_id in state.tasks:
            return [], CommandResult(command_id=cid, status="accepted", instance_id=instance.instance_id,
                                     task_index=state.last_index)
        effects = self.index(now, TaskCreated(task=task))
        assert self.state is not None
        return effects, CommandResult(command_id=cid, status="accepted", instance_id=instance.instance_id,
                                      task_index=self.state.last_index)

    def _choose_instance(self, state: State, command: SubmitTask) -> Instance | CommandResult:
        cid = command.command_id
        if command.instance_id is not None:
            inst = state.instances.get(command.instance_id)
            if inst is None:
                return CommandResult(
                    command_id=cid, status="rejected", code="instance_not_found",
                    message=f"no instance {command.instance_id!r}",
                )
            return inst
        candidates = [
            state.instances[i]
            for i in sorted(state.instances)
            if state.instances[i].shard_assignments.model_id == command.model_id
        ]
        if not candidates:
            return CommandResult(
                command_id=cid,
                status="rejected",
                code="model_not_found",
                message=f"model {command.model_id!r} is not placed on this cluster; place it with POST /place_instance",
            )
        healthy = [c for c in candidates if not self._instance_failed(state, c)]
        if not healthy:
            reasons = "; ".join(self._failure_reasons(state, candidates[0]))
            return CommandResult(
                command_id=cid, status="rejected", code="instance_failed",
                message=f"every instance of {command.model_id!r} has failed: {reasons}",
            )
        load = {c.instance_id: 0 for c in healthy}
        for task in state.tasks.values():
            if task.instance_id in load:
                load[task.instance_id] += 1

        def score(inst: Instance) -> tuple[int, int, str]:
            ready = all(
                isinstance(state.runners.get(r), RUNNER_SERVING)
                for r in inst.shard_assignments.runner_to_shard
            )
            return (0 if ready else 1, load[inst.instance_id], inst.instance_id)

        return min(healthy, key=score)

    @staticmethod
    def _instance_failed(state: State, inst: Instance) -> bool:
        return any(
            isinstance(state.runners.get(r), RunnerFailed) and state.runners[r].permanent  # type: ignore[union-attr]
            for r in inst.shard_assignments.runner_to_shard
        )

    @staticmethod
    def _failure_reasons(state: State, inst: Instance) -> list[str]:
        out = []
        for r in sorted(inst.shard_assignments.runner_to_shard):
            status = state.runners.get(r)
            if isinstance(status, RunnerFailed):
                out.append(status.error_message)
        return out

    def _evict(self, now: float, origin: NodeId, command: EvictModel) -> tuple[list[Effect], CommandResult]:
        state = self.state
        assert state is not None
        cid = command.command_id
        holders = sorted(
            n for n, copies in state.model_copies.items()
            if command.model_id in copies and (command.node_id is None or n == command.node_id)
        )
        if not holders:
            where = f"on {command.node_id}" if command.node_id is not None else "on any node"
            return [], CommandResult(command_id=cid, status="rejected", code="model_not_found",
                                     message=f"no copy of {command.model_id} {where}")
        for inst in sorted(state.instances.values(), key=lambda i: i.instance_id):
            if inst.shard_assignments.model_id != command.model_id:
                continue
            busy = sorted(set(holders) & set(inst.shard_assignments.node_to_runner))
            if busy:
                return [], CommandResult(
                    command_id=cid, status="rejected", code="model_in_use",
                    message=f"{command.model_id} is in use by instance {inst.instance_id} on {', '.join(busy)}; "
                            "delete the instance first",
                )
        effects: list[Effect] = []
        for node in holders:
            if state.model_copies[node][command.model_id].status != "evicting":
                effects += self.index(now, ModelEvictionRequested(node_id=node, model_id=command.model_id,
                                                                  reason="deleted by request"))
        return effects, CommandResult(command_id=cid, status="accepted")

    def _store_download(self, now: float, origin: NodeId, command: RequestStoreDownload) -> tuple[list[Effect], CommandResult]:
        state = self.state
        assert state is not None
        cid = command.command_id
        copy = state.model_copies.get(command.node_id, {}).get(command.model_id)
        if copy is not None and copy.status not in ("failed",):
            return [], CommandResult(command_id=cid, status="accepted", message=copy.status)
        card = self.cards.get(command.model_id)
        event = StoreDownloadRequested(node_id=command.node_id, model_id=command.model_id,
                                       n_layers=card.n_layers if card is not None else 0)
        return self.index(now, event), CommandResult(command_id=cid, status="accepted", message="requested")

    def _add_card(self, now: float, origin: NodeId, command: AddModelCard) -> tuple[list[Effect], CommandResult]:
        state = self.state
        assert state is not None
        cid = command.command_id
        card = command.card
        if card.model_id in self._node_cards or state.model_cards.get(card.model_id) == card:
            return [], CommandResult(command_id=cid, status="accepted", message="already known")
        return self.index(now, ModelCardAdded(card=card)), CommandResult(command_id=cid, status="accepted")

    # --- local events ----------------------------------------------------------------

    def on_local_event(self, now: float, msg: LocalEventMessage) -> Output:
        if msg.session != self.session:
            return Output()
        origin = msg.origin
        known = self._origin_incarnation.get(origin)
        if known is None or msg.incarnation > known:
            # A new life of the origin (first contact, or it restarted): its
            # numbering starts again; what an earlier life left buffered is moot.
            self._origin_incarnation[origin] = msg.incarnation
            self._origin_next[origin] = 0
            self._origin_buffer.pop(origin, None)
        elif msg.incarnation < known:
            return Output()  # a late message from a life of the origin that has ended
        inc = msg.incarnation
        expected = self._origin_next.get(origin, 0)
        if msg.origin_idx < expected:
            ack = LocalEventAck(session=self.session, origin=origin, next_idx=expected, incarnation=inc)
            return Output([Send(message=ack, to=origin)])
        if msg.origin_idx > expected:
            buf = self._origin_buffer.setdefault(origin, {})
            new = msg.origin_idx not in buf
            if new and len(buf) < self.config.local_outbox_max:
                buf[msg.origin_idx] = msg
                # Event ``expected`` went missing and every later one (telemetry too)
                # now waits behind it; waiting out the origin's retry backoff (5, 10,
                # 20 s) can outlast node_timeout_s and get a live node pruned. Ask for
                # it at once, at 1, 2, 4, 8... events held (bounded, never per copy).
                held = len(buf)
                if held & (held - 1) == 0:
                    ack = LocalEventAck(session=self.session, origin=origin, next_idx=expected, incarnation=inc, gap=True)
                    return Output([Send(message=ack, to=origin)])
            return Output()
        effects: list[Effect] = []
        dropped = False
        while True:
            effects_one, was_dropped = self._ingest(now, msg)
            effects += effects_one
            dropped = dropped or was_dropped
            expected += 1
            self._origin_next[origin] = expected
            nxt = self._origin_buffer.get(origin, {}).pop(expected, None)
            if nxt is None:
                break
            msg = nxt
        if self._origin_buffer.get(origin):
            # Still holding later events: the next one is missing too. Ask for it now;
            # waiting for another later event to arrive (the report above) left a
            # second hole to the node's retry, 5 s or more (found by the simulator's
            # efficiency invariant E5). The ack acknowledges what came before it too.
            effects.append(
                Send(
                    message=LocalEventAck(
                        session=self.session, origin=origin, next_idx=expected, incarnation=inc, gap=True
                    ),
                    to=origin,
                )
            )
        elif dropped:
            effects.append(
                Send(
                    message=LocalEventAck(session=self.session, origin=origin, next_idx=expected, incarnation=inc),
                    to=origin,
                )
            )
        if self.auto_pending:
            effects += master_policy.auto_place(self, now)
        return Output(effects)

    def _ingest(self, now: float, msg: LocalEventMessage) -> tuple[list[Effect], bool]:
        """Index one local event, or drop it (returns dropped=True); the rule is the event type's."""
        assert self.state is not None
        rule = ingest.INGEST_RULES.get(type(msg.event))
        if rule is None:
            return [Log(level="warning", message=f"dropped non-local event {type(msg.event).__name__} from {msg.origin}")], True
        return rule(self, now, msg, msg.event)

    # --- what the ingest rules (skulk.core.ingest) and the master's policy use ----------

    # --- sync ----------------------------------------------------------------------

    def on_sync_request(self, now: float, msg: SyncRequest) -> Output:
        if msg.session != self.session:
            return Output()
        start = max(0, msg.from_index)
        end = self.next_index if msg.to_index is None else min(msg.to_index, self.next_index)
        snapshot = None
        if start < self._log_base:
            snapshot = self._snapshot
            assert snapshot is not None, "log trimmed without a snapshot"
            start = snapshot.index + 1
            end = self.next_index
        end = min(end, start + self.config.replay_batch_max)
        events = tuple(self._log[start - self._log_base : end - self._log_base]) if end > start else ()
        return Output([Send(message=SyncResponse(session=self.session, snapshot=snapshot, events=events), to=msg.requester)])

    # --- pruning -------------------------------------------------------------------

    def on_prune_timer(self, now: float) -> Output:
        effects: list[Effect] = [set_timer(PruneTimer(), now + self.config.prune_check_interval_s)]
        effects += master_policy.prune(self, now)
        return Output(effects + master_policy.evict_over_budget(self, now))


# --- the rule tables ------------------------------------------------------------------------------

_CommandRule = Callable[[Master, float, NodeId, Any], tuple[list[Effect], CommandResult]]

COMMAND_RULES: dict[type, _CommandRule] = {
    PlaceInstance: Master._place,
    DeleteInstance: Master._delete,
    SubmitTask: Master._submit,
    CancelTask: Master._cancel,
    EvictModel: Master._evict,
    RequestStoreDownload: Master._store_download,
    AddModelCard: Master._add_card,
}
"""What the master does with each command type."""


assert set(COMMAND_RULES) == set(get_args(Command)), "every command type needs a rule in COMMAND_RULES"
