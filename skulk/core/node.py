"""``CoreNode``: one node's whole protocol, as a single sans-I/O state machine.

Theory of operation
-------------------
``handle(now, input) -> list[Effect]`` is the only entry point. The node
composes the election, the replica (follower log), the master (while this
node is master), the worker, the reporter (its own facts), the outbox of
local events and the origin-side request tracker, and routes inputs between
them through three tables, each keyed by type and checked at import to cover
every type there is:

- ``INPUT_ROUTES``: one route per input type (``skulk.core.inputs``);
- ``MESSAGE_ROUTES``: one route per message type (``Received``, and the
  messages a node sends itself);
- ``TIMER_ROUTES``: one route per timer kind (``skulk.core.timers``).

A route asks a component and turns its ``Output`` into effects in one place
(``_take``): the node's record first when the component asked to persist,
then the effects, then the session change (if the election made one), then
the component's local events, raised through the outbox to the master (or
indexed in place when this node is the master).

After every routed input the node shows what its replica applied to the
request tracker and the worker, until quiet (``_after_state``); that runs
once per input, from ``_settled``, for the driver's input and for each
message the node delivers to itself (``_loopback``).

A session change (from the election's output) deposes or creates the master,
points the replica at the new session (bootstrap), resets the outbox and fails
requests that were in flight on the old master. Once the new session's first
event is applied the node re-reports its facts (telemetry, links, models,
runner statuses, hosted instances) to the new master.

The driver supplies time, transport, timers, disk and processes; nothing here
reads a clock or does I/O.

Adding an input: a record in ``inputs.py`` (and in its ``Input`` union), a
route here in ``INPUT_ROUTES``. A message or a timer kind: the same, in
``messages.py`` or ``timers.py`` and the matching table. The import-time
checks below fail until the route exists.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, get_args

from skulk.core.cards import ModelCard
from skulk.core.config import CoreConfig
from skulk.core.effects import Effect, Log, NodeRecord, PersistNode, Send, SessionChanged
from skulk.core.election import Election, Standing
from skulk.core.events import Event
from skulk.core.ids import ModelId, NodeId
from skulk.core.inputs import (
    AbandonRequest,
    Boot,
    FilesGone,
    FilesObserved,
    InfoObserved,
    Input,
    LinkProbed,
    ModelAvailable,
    PeersChanged,
    PersistFailed,
    Received,
    RunnerExited,
    RunnerOutput,
    RunnerStatusObserved,
    Shutdown,
    SubmitCommand,
    TimerFired,
    TransferEnded,
    TransferProgressed,
)
from skulk.core.keeper import FileKeeper
from skulk.core.master import Master
from skulk.core.messages import (
    ChunkMessage,
    CommandMessage,
    CommandResultMessage,
    ElectionMessage,
    GlobalEvent,
    LocalEventAck,
    LocalEventMessage,
    Message,
    SyncRequest,
    SyncResponse,
)
from skulk.core.outbox import Outbox
from skulk.core.output import Output, SessionChange
from skulk.core.replica import Replica
from skulk.core.reporter import Reporter
from skulk.core.requests import Requests
from skulk.core.session import Incarnation, Session
from skulk.core.state import EMPTY_STATE, State, decode_state, encode_state
from skulk.core.timers import (
    TIMER_KINDS,
    CampaignTimer,
    HeartbeatTimer,
    MasterLostTimer,
    NackTimer,
    OutboxTimer,
    PruneTimer,
    RequestTimer,
    RunnerDeadlineTimer,
    RunnerRestartTimer,
    SettleTimer,
    TelemetryTimer,
    Timer,
    TransferRetryTimer,
    TransferStallTimer,
    cancel_timer,
    parse,
    set_timer,
)
from skulk.core.worker import Worker

__all__ = ["CoreNode", "INPUT_ROUTES", "MESSAGE_ROUTES", "TIMER_ROUTES"]

_LOOP_LIMIT = 10_000


class CoreNode:
    """One node. Construct with its persisted record (None on first start)."""

    def __init__(
        self,
        node_id: NodeId,
        config: CoreConfig,
        *,
        cards: Mapping[str, ModelCard],
        record: NodeRecord | None = None,
    ) -> None:
        assert record is None or record.node_id == node_id, "a node's record must be its own"
        self.node_id = node_id
        self.config = config
        # The node's own copy: it grows only through ModelAvailable inputs.
        self.cards: dict[str, ModelCard] = dict(cards)
        last_state = EMPTY_STATE
        if record is not None and record.state is not None:
            last_state = decode_state(record.state)
        self.election = Election(node_id, config, clock=record.election_clock if record else 0)
        self.replica = Replica(node_id, config, last_state)
        self.master: Master | None = None
        self.outbox = Outbox(node_id, config)
        self.keeper = FileKeeper(node_id, config)
        self.worker = Worker(node_id, config, files=self.keeper)
        self.reporter = Reporter(node_id)
        self.requests = Requests(node_id, config)
        self._session_applied = False
        self._master_lost_since: float | None = None  # when this follower's master left its peer set
        self._since_persist = 0
        self._persist_failures: dict[str, int] = {}
        self.booted = False
        self._last_incarnation = record.incarnation if record is not None else 0
        self.incarnation = Incarnation(number=0, boot_at=0.0)  # set at Boot

    # --- queries (for drivers, the API and the checkers) ------------------------------

    @property
    def state(self) -> State:
        return self.replica.state

    @property
    def session(self) -> Session | None:
        return self.election.session

    @property
    def is_master(self) -> bool:
        """True while this node acts as a master (indexes events)."""
        return self.master is not None and self.master.active

    @property
    def master_id(self) -> NodeId | None:
        return self.election.session.master if self.election.session else None

    # --- the entry point ---------------------------------------------------------------

    def handle(self, now: float, inp: Input) -> list[Effect]:
        route = INPUT_ROUTES.get(type(inp))
        assert route is not None, f"unknown input {type(inp).__name__}"
        return self._loopback(now, self._settled(now, route(self, now, inp)))

    def _settled(self, now: float, effects: list[Effect]) -> list[Effect]:
        """``effects`` of one routed input, then what the state it moved asks of the node."""
        effects += self._after_state(now)
        return effects

    def _take(self, now: float, out: Output) -> list[Effect]:
        """A component's output as effects, in the one order every route keeps (module doc)."""
        effects: list[Effect] = [self._persist_effect()] if out.persist else []
        effects += out.effects
        if out.session is not None:
            effects += self._follow(now, out.session)
            effects += self.election.announce(out.session, self._standing())
        if out.events:
            effects += self._raise(now, out.events)
        return effects

    # --- inputs ------------------------------------------------------------------------

    def _on_boot(self, now: float, inp: Boot) -> list[Effect]:
        assert not self.booted, "Boot twice"
        self.booted = True
        self.incarnation = Incarnation(number=self._last_incarnation + 1, boot_at=now)
        self.outbox.boot(self.incarnation)
        effects = self._take(now, self.election.on_boot(now, self._standing()))
        effects.append(set_timer(TelemetryTimer(), now + self.config.telemetry_interval_s))
        return effects

    def _on_peers_changed(self, now: float, inp: PeersChanged) -> list[Effect]:
        effects = self._take(now, self.election.on_peers_changed(now, inp.peers, self._standing()))
        effects += self._watch_master(now)
        if self._session_applied and self.keeper.waiting:
            effects += self._reconcile_files(now)  # a store node we wait for may have gone
        return effects

    def _on_received(self, now: float, inp: Received) -> list[Effect]:
        return self._on_message(now, inp.sender, inp.message)

    def _on_timer_fired(self, now: float, inp: TimerFired) -> list[Effect]:
        timer = parse(inp.key)
        route = TIMER_ROUTES.get(type(timer)) if timer is not None else None
        if timer is None or route is None:
            return [Log(level="debug", message=f"stale timer {inp.key}")]
        return route(self, now, timer)

    def _on_info(self, now: float, inp: InfoObserved) -> list[Effect]:
        effects: list[Effect] = []
        if inp.memory is not None:
            effects += self._take(now, self.worker.on_memory(inp.memory))
        return effects + self._take(now, self.reporter.on_info(inp, reporting=self._session_applied))

    def _on_link(self, now: float, inp: LinkProbed) -> list[Effect]:
        return self._take(now, self.reporter.on_link(inp, self.state, reporting=self._session_applied))

    def _on_model(self, now: float, inp: ModelAvailable) -> list[Effect]:
        model = ModelId(inp.model_id)
        effects: list[Effect] = []
        if inp.card is not None and model not in self.cards:
            assert inp.card.model_id == model, f"card of {inp.card.model_id} offered for {model}"
            self.cards[model] = inp.card  # the master here (if any) places it from now on
            effects.append(Log(level="info", message=f"new local model {model}: placeable from now on"))
        return effects + self._take(now, self.reporter.on_model(model, self.state, reporting=self._session_applied))

    def _on_files_observed(self, now: float, inp: FilesObserved) -> list[Effect]:
        return self._take(now, self.keeper.on_observed(now, inp, self.state))

    def _on_files_gone(self, now: float, inp: FilesGone) -> list[Effect]:
        return self._take(now, self.keeper.on_gone(now, inp, self.state))

    def _on_transfer_progressed(self, now: float, inp: TransferProgressed) -> list[Effect]:
        return self._take(now, self.keeper.on_progress(now, inp, self.state))

    def _on_transfer_ended(self, now: float, inp: TransferEnded) -> list[Effect]:
        effects = self._take(now, self.keeper.on_ended(now, inp, self.state))
        return effects + self._reconcile_files(now)

    def _reconcile_files(self, now: float) -> list[Effect]:
        """The keeper and the worker's gate, against the current state (None: mid-failover, wait)."""
        current = self.replica.current
        if current is None:
            return []
        effects = self._take(now, self.keeper.reconcile(now, current, self.election.peers))
        return effects + self._take(now, self.worker.reconcile(now, current))

    def _on_runner_status(self, now: float, inp: RunnerStatusObserved) -> list[Effect]:
        return self._take(now, self.worker.on_status(now, inp.runner_id, inp.status))

    def _on_runner_exited(self, now: float, inp: RunnerExited) -> list[Effect]:
        return self._take(now, self.worker.on_exit(now, inp.runner_id, inp.exit_code))

    def _on_runner_output(self, now: float, inp: RunnerOutput) -> list[Effect]:
        chunk = inp.chunk
        effects: list[Effect] = []
        task = self.state.tasks.get(chunk.task_id)
        if task is not None:
            if task.origin == self.node_id:
                effects += self._take(now, self.requests.on_chunk(now, chunk, self.incarnation))
            else:
                message = ChunkMessage(destination=task.origin, chunk=chunk, incarnation=self.incarnation)
                effects.append(Send(message=message, to=task.origin))
        return effects + self._take(now, self.worker.on_output(now, inp.runner_id, chunk))

    def _on_submit(self, now: float, inp: SubmitCommand) -> list[Effect]:
        return self._take(now, self.requests.submit(now, inp.command, self.session))

    def _on_abandon(self, now: float, inp: AbandonRequest) -> list[Effect]:
        return self._take(now, self.requests.abandon(now, inp.command_id, self.session))

    def _on_persist_failed(self, now: float, inp: PersistFailed) -> list[Effect]:
        count = self._persist_failures.get(inp.what, 0)
        self._persist_failures[inp.what] = count + 1
        if count > 0:
            return []
        return [Log(level="critical", message=f"cannot persist {inp.what} ({inp.error}); serving on without it")]

    def _on_shutdown(self, now: float, inp: Shutdown) -> list[Effect]:
        return self._take(now, self.worker.stop_all())

    # --- messages ------------------------------------------------------------------------

    def _on_message(self, now: float, sender: NodeId, msg: Message) -> list[Effect]:
        route = MESSAGE_ROUTES.get(type(msg))
        assert route is not None, f"unknown message {type(msg).__name__}"
        return route(self, now, sender, msg)

    def _on_global_event(self, now: float, sender: NodeId, msg: GlobalEvent) -> list[Effect]:
        return self._take(now, self.replica.on_global_event(now, sender, msg))

    def _on_local_event(self, now: float, sender: NodeId, msg: LocalEventMessage) -> list[Effect]:
        if self.master is None or not self.master.active:
            return []
        return self._take(now, self.master.on_local_event(now, msg))

    def _on_election_message(self, now: float, sender: NodeId, msg: ElectionMessage) -> list[Effect]:
        effects = self._take(now, self.election.on_message(now, sender, msg, self._standing()))
        if msg.log_next is not None and not msg.campaigning:
            effects += self._take(now, self.replica.on_master_heartbeat(now, sender, msg.log_next))
        return effects

    def _on_command_message(self, now: float, sender: NodeId, msg: CommandMessage) -> list[Effect]:
        self.election.on_command_seen()
        if self.master is None or not self.master.active:
            return []
        return self._take(now, self.master.on_command(now, msg.origin, msg.command))

    def _on_command_result(self, now: float, sender: NodeId, msg: CommandResultMessage) -> list[Effect]:
        return self._take(now, self.requests.on_result(now, msg.result, self.session, msg.session))

    def _on_local_event_ack(self, now: float, sender: NodeId, msg: LocalEventAck) -> list[Effect]:
        return self._take(now, self.outbox.on_ack(msg))

    def _on_sync_request(self, now: float, sender: NodeId, msg: SyncRequest) -> list[Effect]:
        if self.master is None or not self.master.active:
            return []
        return self._take(now, self.master.on_sync_request(now, msg))

    def _on_sync_response(self, now: float, sender: NodeId, msg: SyncResponse) -> list[Effect]:
        return self._take(now, self.replica.on_sync_response(now, sender, msg))

    def _on_chunk_message(self, now: float, sender: NodeId, msg: ChunkMessage) -> list[Effect]:
        if msg.destination != self.node_id:
            return []
        return self._take(now, self.requests.on_chunk(now, msg.chunk, msg.incarnation))

    # --- timers --------------------------------------------------------------------------

    def _on_campaign_timer(self, now: float, timer: CampaignTimer) -> list[Effect]:
        return self._take(now, self.election.on_campaign_timeout(now, self._standing()))

    def _on_settle_timer(self, now: float, timer: SettleTimer) -> list[Effect]:
        return self._take(now, self.election.on_settle(now, self._standing()))

    def _on_heartbeat_timer(self, now: float, timer: HeartbeatTimer) -> list[Effect]:
        return self._take(now, self.election.on_heartbeat(now, self._standing()))

    def _on_nack_timer(self, now: float, timer: NackTimer) -> list[Effect]:
        return self._take(now, self.replica.on_nack_timer(now))

    def _on_outbox_timer(self, now: float, timer: OutboxTimer) -> list[Effect]:
        return self._take(now, self.outbox.on_timer(now))

    def _on_prune_timer(self, now: float, timer: PruneTimer) -> list[Effect]:
        if self.master is None or not self.master.active:
            return []
        return self._take(now, self.master.on_prune_timer(now))

    def _on_telemetry_timer(self, now: float, timer: TelemetryTimer) -> list[Effect]:
        effects: list[Effect] = [set_timer(TelemetryTimer(), now + self.config.telemetry_interval_s)]
        if self._session_applied:
            effects += self._raise(now, [self.reporter.info_event(periodic=True)])
        return effects

    def _on_master_lost_timer(self, now: float, timer: MasterLostTimer) -> list[Effect]:
        since, session = self._master_lost_since, self.session
        if since is None or session is None:
            return []
        lost_for = now - since
        effects = self._take(now, self.requests.on_master_lost(now, session, lost_for))
        # Still cut off: look again after another grace (a request accepted meanwhile).
        effects.append(set_timer(MasterLostTimer(), now + self.config.master_lost_grace_s))
        if len(effects) > 1:
            effects.append(Log(level="warning", message=(
                f"master {session.master} of session {session} not among this node's peers for {lost_for:.1f} s; "
                "ended its in-flight requests (master_unreachable)")))
        return effects

    def _on_request_timer(self, now: float, timer: RequestTimer) -> list[Effect]:
        return self._take(now, self.requests.on_timer(now, timer, self.session))

    def _on_restart_timer(self, now: float, timer: RunnerRestartTimer) -> list[Effect]:
        return self._take(now, self.worker.on_restart_timer(now, timer, self.replica.current))

    def _on_deadline_timer(self, now: float, timer: RunnerDeadlineTimer) -> list[Effect]:
        return self._take(now, self.worker.on_deadline(now, timer))

    def _on_transfer_stall_timer(self, now: float, timer: TransferStallTimer) -> list[Effect]:
        effects = self._take(now, self.keeper.on_stall_timer(now, timer, self.state))
        return effects + self._reconcile_files(now)

    def _on_transfer_retry_timer(self, now: float, timer: TransferRetryTimer) -> list[Effect]:
        return self._reconcile_files(now)

    # --- session changes -----------------------------------------------------------------

    def _follow(self, now: float, change: SessionChange) -> list[Effect]:
        """Move the whole node to the election's new session."""
        old, new = change.old, change.new
        effects: list[Effect] = []
        deposed = self.master is not None and self.master.session != new
        if self.master is not None and self.master.session != new:
            self.master.stop()
            self.master = None
            effects.append(cancel_timer(PruneTimer()))
        self._session_applied = False
        self.reporter.new_session()
        effects += self._take(now, self.replica.follow(now, new))
        effects += self._take(now, self.outbox.reset(new))
        effects += self._take(now, self.requests.on_session_changed(now, old, new))
        canary = self.config.canary_double_master and deposed and new.master != self.node_id
        if new.master == self.node_id or canary:
            # CANARY (config.canary_double_master): a deposed master that lost the
            # campaign also acts as master of the winner's session. The checkers
            # must catch this planted bug (two masters in one session).
            self.master = Master(self.node_id, self.config, new, self.cards, self.replica.apply_own)
            effects += self._take(now, self.master.start(now, self.replica.last_state))
        effects.append(SessionChanged(session=new, is_master=self.is_master))
        self._master_lost_since = None
        effects += self._watch_master(now)
        effects.append(
            Log(
                level="info",
                message=f"following session {new}" + (" as master" if new.master == self.node_id else ""),
            )
        )
        return effects

    def _standing(self) -> Standing:
        """What the election needs to know about the rest of the node, now."""
        master = self.master
        seniority = 0
        if master is not None and master.active and master.state is not None:
            seniority = 1 + len(master.state.topology.nodes)  # a sitting master grows with the nodes it serves
        return Standing(seniority=seniority, log_next=master.next_index if master is not None else None)

    # --- a master out of reach ----------------------------------------------------------

    def _watch_master(self, now: float) -> list[Effect]:
        """Start (or stop) the clock on a master missing from this follower's peer set.

        Normally a master leaving the peer set starts an election and the new
        session ends open requests. In a partial mesh the others may still
        reach the master and keep it, while this node cannot: its requests
        would wait for chunks that never come. After ``master_lost_grace_s``
        they end with ``master_unreachable`` (invariant 8).
        """
        session = self.session
        lost = session is not None and session.master != self.node_id and session.master not in self.election.peers
        if not lost:
            if self._master_lost_since is None:
                return []
            self._master_lost_since = None
            return [cancel_timer(MasterLostTimer())]
        if self._master_lost_since is not None:
            return []
        self._master_lost_since = now
        return [set_timer(MasterLostTimer(), now + self.config.master_lost_grace_s)]

    # --- after the state moved -----------------------------------------------------------

    def _after_state(self, now: float) -> list[Effect]:
        """Show newly applied events to the request tracker and the worker, until quiet."""
        effects: list[Effect] = []
        for _ in range(_LOOP_LIMIT):
            applied, jumped = self.replica.take_applied()
            if not applied and not jumped:
                return effects
            state = self.replica.current
            assert state is not None
            for indexed in applied:
                effects += self._take(now, self.requests.on_applied(now, indexed))
                if (
                    indexed.origin == self.node_id
                    and indexed.origin_idx is not None
                    and indexed.origin_incarnation == self.outbox.incarnation
                ):
                    if state.session == self.outbox.session:
                        self.outbox.delivered_below(indexed.origin_idx + 1)
            self._since_persist += len(applied) + (1 if jumped else 0)
            if not self._session_applied:
                self._session_applied = True
                effects += self._raise(
                    now, self.reporter.rebuild(state) + self.keeper.rebuild(now, state) + self.worker.rebuild(state)
                )
            if jumped:
                effects += self._take(now, self.requests.on_state_jumped(now, state))
            if self._since_persist >= self.config.persist_state_every:
                self._since_persist = 0
                effects.append(self._persist_effect())
            # The state now, not the one this pass began with: raising the rebuild
            # on a master indexes (and applies) at once.
            current = self.replica.current
            assert current is not None
            effects += self._take(now, self.keeper.reconcile(now, current, self.election.peers))
            effects += self._take(now, self.worker.reconcile(now, current))
        raise AssertionError("state kept changing: a feedback loop between the worker and the master")

    # --- local events ----------------------------------------------------------------------

    def _raise(self, now: float, events: list[Event]) -> list[Effect]:
        """Send local events to the master (or index them, if we are it)."""
        effects: list[Effect] = []
        if self.outbox.session is None:
            return effects  # no master yet; the rebuild after election re-reports
        master = self.master
        for event in events:
            msg, timer_effects = self.outbox.add(now, event)
            effects += timer_effects
            if master is not None and master.active and msg.session == master.session:
                effects += self._take(now, master.on_local_event(now, msg))
            else:
                effects.append(Send(message=msg, to=msg.session.master))
        return effects

    # --- persistence -------------------------------------------------------------------------------

    def _persist_effect(self) -> PersistNode:
        state = self.replica.last_state
        raw = encode_state(state) if state.session is not None else None
        return PersistNode(
            record=NodeRecord(
                node_id=self.node_id,
                election_clock=self.election.clock,
                state=raw,
                incarnation=self.incarnation.number,
            )
        )

    # --- loopback ------------------------------------------------------------------------------------

    def _loopback(self, now: float, effects: list[Effect]) -> list[Effect]:
        """Deliver in place what this node sends to itself; return the rest.

        What handling a looped-back message produces goes to the end of the
        queue, so effects leave in the order they were produced: a master's
        ``AppendLog`` effects in index order (a command looped back while the
        session starts is indexed after ``SessionStarted`` and must be written
        after it).
        """
        node_id = self.node_id
        for effect in effects:
            if type(effect) is Send and (
                effect.to == node_id or (effect.to is None and type(effect.message) is CommandMessage)
            ):
                break
        else:
            return effects  # nothing to deliver here (the common case): the effects leave as they are
        out: list[Effect] = []
        queue = deque(effects)
        steps = 0
        while queue:
            steps += 1
            assert steps < _LOOP_LIMIT * 10, "loopback did not settle"
            effect = queue.popleft()
            if isinstance(effect, Send):
                msg = effect.message
                if effect.to == self.node_id:
                    queue.extend(self._settled(now, self._on_message(now, self.node_id, msg)))
                    continue
                if effect.to is None and isinstance(msg, CommandMessage) and msg.origin == self.node_id:
                    out.append(effect)
                    queue.extend(self._settled(now, self._on_message(now, self.node_id, msg)))
                    continue
            out.append(effect)
        return out


# --- the routing tables -------------------------------------------------------------------------

_Route = Callable[[CoreNode, float, Any], list[Effect]]
_MessageRoute = Callable[[CoreNode, float, NodeId, Any], list[Effect]]

INPUT_ROUTES: dict[type, _Route] = {
    Boot: CoreNode._on_boot,
    PeersChanged: CoreNode._on_peers_changed,
    Received: CoreNode._on_received,
    TimerFired: CoreNode._on_timer_fired,
    InfoObserved: CoreNode._on_info,
    LinkProbed: CoreNode._on_link,
    ModelAvailable: CoreNode._on_model,
    FilesObserved: CoreNode._on_files_observed,
    FilesGone: CoreNode._on_files_gone,
    TransferProgressed: CoreNode._on_transfer_progressed,
    TransferEnded: CoreNode._on_transfer_ended,
    RunnerStatusObserved: CoreNode._on_runner_status,
    RunnerExited: CoreNode._on_runner_exited,
    RunnerOutput: CoreNode._on_runner_output,
    SubmitCommand: CoreNode._on_submit,
    AbandonRequest: CoreNode._on_abandon,
    PersistFailed: CoreNode._on_persist_failed,
    Shutdown: CoreNode._on_shutdown,
}

MESSAGE_ROUTES: dict[type, _MessageRoute] = {
    ElectionMessage: CoreNode._on_election_message,
    CommandMessage: CoreNode._on_command_message,
    CommandResultMessage: CoreNode._on_command_result,
    LocalEventMessage: CoreNode._on_local_event,
    LocalEventAck: CoreNode._on_local_event_ack,
    GlobalEvent: CoreNode._on_global_event,
    SyncRequest: CoreNode._on_sync_request,
    SyncResponse: CoreNode._on_sync_response,
    ChunkMessage: CoreNode._on_chunk_message,
}

TIMER_ROUTES: dict[type[Timer], _Route] = {
    CampaignTimer: CoreNode._on_campaign_timer,
    SettleTimer: CoreNode._on_settle_timer,
    HeartbeatTimer: CoreNode._on_heartbeat_timer,
    NackTimer: CoreNode._on_nack_timer,
    OutboxTimer: CoreNode._on_outbox_timer,
    PruneTimer: CoreNode._on_prune_timer,
    TelemetryTimer: CoreNode._on_telemetry_timer,
    MasterLostTimer: CoreNode._on_master_lost_timer,
    RequestTimer: CoreNode._on_request_timer,
    RunnerRestartTimer: CoreNode._on_restart_timer,
    RunnerDeadlineTimer: CoreNode._on_deadline_timer,
    TransferStallTimer: CoreNode._on_transfer_stall_timer,
    TransferRetryTimer: CoreNode._on_transfer_retry_timer,
}


def _check_covers(table: Mapping[type, object], types: tuple[type, ...], what: str) -> None:
    missing = sorted(t.__name__ for t in types if t not in table)
    extra = sorted(t.__name__ for t in table if t not in types)
    assert not missing and not extra, f"{what} routes: missing {missing}, unknown {extra}"


_check_covers(INPUT_ROUTES, get_args(Input), "input")
_check_covers(MESSAGE_ROUTES, get_args(Message), "message")
_check_covers(TIMER_ROUTES, TIMER_KINDS, "timer")
