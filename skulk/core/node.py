"""``CoreNode``: one node's whole protocol, as a single sans-I/O state machine.

Theory of operation
-------------------
``handle(now, input) -> list[Effect]`` is the only entry point. The node
composes the election, the replica (follower log), the master (while this
node is master), the worker, the outbox of local events and the origin-side
request tracker, and routes inputs between them:

- messages and timers go to the component that owns them;
- whatever the replica applied is then shown to the request tracker and the
  worker, whose local events go through the outbox to the master (directly,
  without the network, when this node is the master);
- messages a node would send to itself are looped back in place.

A session change (from the election) deposes or creates the master, points
the replica at the new session (bootstrap), resets the outbox and fails
requests that were in flight on the old master. Once the new session's first
event is applied the node re-reports its facts (telemetry, links, models,
runner statuses, hosted instances) to the new master.

The driver supplies time, transport, timers, disk and processes; nothing here
reads a clock or does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from skulk.core.cards import ModelCard
from skulk.core.config import CoreConfig
from skulk.core.effects import (
    CancelTimer,
    Effect,
    Log,
    NodeRecord,
    PersistNode,
    Send,
    SessionChanged,
    SetTimer,
)
from skulk.core.election import CAMPAIGN_TIMER, HEARTBEAT_TIMER, SETTLE_TIMER, Election
from skulk.core.events import (
    ConnectionLost,
    ConnectionObserved,
    DownloadCompleted,
    Event,
    NodeGatheredInfo,
)
from skulk.core.ids import ModelId, NodeId
from skulk.core.inputs import (
    AbandonRequest,
    Boot,
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
)
from skulk.core.instances import LinkKind
from skulk.core.master import PRUNE_TIMER, Master
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
from skulk.core.nodes import Connection, MemoryInfo
from skulk.core.outbox import OUTBOX_TIMER, Outbox
from skulk.core.replica import NACK_TIMER, Replica
from skulk.core.requests import REQUEST_TIMER_PREFIX, Requests
from skulk.core.session import Incarnation, Session
from skulk.core.state import EMPTY_STATE, State, decode_state, encode_state
from skulk.core.worker import DEADLINE_TIMER_PREFIX, RESTART_TIMER_PREFIX, Worker

__all__ = ["CoreNode", "TELEMETRY_TIMER"]

TELEMETRY_TIMER = "node.telemetry"
MASTER_LOST_TIMER = "node.master_lost"
# Report memory again only when available memory moved by more than this share of total.
_MEMORY_REPORT_FRACTION = 0.02
_MEMORY_REPORT_MIN_BYTES = 64 * 1024 * 1024
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
        self.cards = cards
        last_state = EMPTY_STATE
        if record is not None and record.state is not None:
            last_state = decode_state(record.state)
        self.election = Election(
            node_id,
            config,
            clock=record.election_clock if record else 0,
            seniority=self._seniority,
            persist=self._persist_effect,
        )
        self.election.on_session_change = self._on_session_change
        self.election.log_next = lambda: self.master.next_index if self.master is not None else None
        self.replica = Replica(node_id, config, last_state)
        self.master: Master | None = None
        self.outbox = Outbox(node_id, config)
        self.worker = Worker(node_id, config)
        self.requests = Requests(node_id, config)
        self._info = InfoObserved()
        self._reported = InfoObserved()
        self._links: dict[tuple[NodeId, str], tuple[LinkKind, bool]] = {}
        self._models: set[ModelId] = set()
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
        effects = self._dispatch(now, inp)
        effects = self._loopback(now, effects)
        return effects

    def _dispatch(self, now: float, inp: Input) -> list[Effect]:
        if isinstance(inp, Received):
            return self._on_message(now, inp.sender, inp.message)
        if isinstance(inp, TimerFired):
            return self._on_timer(now, inp.key)
        if isinstance(inp, PeersChanged):
            effects = self.election.on_peers_changed(now, inp.peers)
            return effects + self._watch_master(now) + self._after_state(now)
        if isinstance(inp, Boot):
            assert not self.booted, "Boot twice"
            self.booted = True
            self.incarnation = Incarnation(number=self._last_incarnation + 1, boot_at=now)
            self.outbox.incarnation = self.incarnation
            effects = self.election.on_boot(now)
            effects.append(SetTimer(key=TELEMETRY_TIMER, at=now + self.config.telemetry_interval_s))
            return effects
        if isinstance(inp, SubmitCommand):
            return self.requests.submit(now, inp.command, self.session)
        if isinstance(inp, AbandonRequest):
            return self.requests.abandon(now, inp.command_id, self.session)
        if isinstance(inp, RunnerOutput):
            return self._on_runner_output(now, inp)
        if isinstance(inp, RunnerStatusObserved):
            effects, events = self.worker.on_status(now, inp.runner_id, inp.status)
            return effects + self._raise(now, events) + self._after_state(now)
        if isinstance(inp, RunnerExited):
            effects, events = self.worker.on_exit(now, inp.runner_id, inp.exit_code)
            return effects + self._raise(now, events) + self._after_state(now)
        if isinstance(inp, InfoObserved):
            return self._on_info(now, inp)
        if isinstance(inp, LinkProbed):
            return self._on_link(now, inp)
        if isinstance(inp, ModelAvailable):
            model = ModelId(inp.model_id)
            self._models.add(model)
            if self._session_applied and model not in self.state.downloads.get(self.node_id, ()):
                return self._raise(now, [DownloadCompleted(node_id=self.node_id, model_id=model)])
            return []
        if isinstance(inp, Shutdown):
            return self.worker.stop_all()
        if isinstance(inp, PersistFailed):
            count = self._persist_failures.get(inp.what, 0)
            self._persist_failures[inp.what] = count + 1
            if count == 0:
                return [
                    Log(
                        level="critical",
                        message=f"cannot persist {inp.what} ({inp.error}); serving on without it",
                    )
                ]
            return []
        raise AssertionError(f"unknown input {type(inp).__name__}")

    # --- messages ------------------------------------------------------------------------

    def _on_message(self, now: float, sender: NodeId, msg: Message) -> list[Effect]:
        if isinstance(msg, GlobalEvent):
            return self.replica.on_global_event(now, sender, msg) + self._after_state(now)
        if isinstance(msg, LocalEventMessage):
            if self.is_master:
                assert self.master is not None
                return self.master.on_local_event(now, msg) + self._after_state(now)
            return []
        if isinstance(msg, ElectionMessage):
            effects = self.election.on_message(now, sender, msg)
            if msg.log_next is not None and not msg.campaigning:
                effects += self.replica.on_master_heartbeat(now, sender, msg.log_next)
            return effects + self._after_state(now)
        if isinstance(msg, CommandMessage):
            self.election.on_command_seen()
            if self.is_master:
                assert self.master is not None
                return self.master.on_command(now, msg.origin, msg.command) + self._after_state(now)
            return []
        if isinstance(msg, CommandResultMessage):
            return self.requests.on_result(now, msg.result, self.session, msg.session)
        if isinstance(msg, LocalEventAck):
            if (
                msg.origin == self.node_id
                and msg.session == self.outbox.session
                and msg.incarnation == self.outbox.incarnation
            ):
                self.outbox.delivered_below(msg.next_idx)
                if msg.gap:
                    return self.outbox.resend(msg.next_idx)
            return []
        if isinstance(msg, SyncRequest):
            if self.is_master:
                assert self.master is not None
                return self.master.on_sync_request(now, msg)
            return []
        if isinstance(msg, SyncResponse):
            return self.replica.on_sync_response(now, sender, msg) + self._after_state(now)
        if isinstance(msg, ChunkMessage):
            if msg.destination == self.node_id:
                return self.requests.on_chunk(now, msg.chunk, msg.incarnation)
            return []
        raise AssertionError(f"unknown message {type(msg).__name__}")

    # --- timers --------------------------------------------------------------------------

    def _on_timer(self, now: float, key: str) -> list[Effect]:
        if key == CAMPAIGN_TIMER:
            return self.election.on_campaign_timeout(now) + self._after_state(now)
        if key == SETTLE_TIMER:
            return self.election.on_settle(now) + self._after_state(now)
        if key == HEARTBEAT_TIMER:
            return self.election.on_heartbeat(now)
        if key == NACK_TIMER:
            return self.replica.on_nack_timer(now)
        if key == OUTBOX_TIMER:
            return self.outbox.on_timer(now)
        if key == PRUNE_TIMER:
            if self.is_master:
                assert self.master is not None
                return self.master.on_prune_timer(now) + self._after_state(now)
            return []
        if key == TELEMETRY_TIMER:
            effects: list[Effect] = [SetTimer(key=TELEMETRY_TIMER, at=now + self.config.telemetry_interval_s)]
            if self._session_applied:
                effects += self._raise(now, [self._info_event(force=True)])
            return effects + self._after_state(now)
        if key == MASTER_LOST_TIMER:
            return self._on_master_lost(now)
        if key.startswith(REQUEST_TIMER_PREFIX):
            return self.requests.on_timer(now, key, self.session)
        if key.startswith(RESTART_TIMER_PREFIX):
            self.worker.on_restart_timer(now, key[len(RESTART_TIMER_PREFIX) :])  # type: ignore[arg-type]
            return self._reconcile(now)
        if key.startswith(DEADLINE_TIMER_PREFIX):
            effects, events = self.worker.on_deadline(now, key[len(DEADLINE_TIMER_PREFIX) :])  # type: ignore[arg-type]
            return effects + self._raise(now, events) + self._after_state(now)
        return [Log(level="debug", message=f"stale timer {key}")]

    # --- session changes -----------------------------------------------------------------

    def _on_session_change(self, now: float, old: Session | None, new: Session) -> list[Effect]:
        effects: list[Effect] = []
        deposed = self.master is not None and self.master.session != new
        if self.master is not None and self.master.session != new:
            self.master.stop()
            self.master = None
            effects.append(CancelTimer(key=PRUNE_TIMER))
        self._session_applied = False
        self._reported = InfoObserved()
        effects += self.replica.follow(now, new)
        effects += self.outbox.reset(new)
        effects += self.requests.on_session_changed(now, old, new)
        canary = self.config.canary_double_master and deposed and new.master != self.node_id
        if new.master == self.node_id or canary:
            # CANARY (config.canary_double_master): a deposed master that lost the
            # campaign also acts as master of the winner's session. The checkers
            # must catch this planted bug (two masters in one session).
            self.master = Master(self.node_id, self.config, new, self.cards, self.replica.apply_own)
            effects += self.master.start(now, self.replica.last_state)
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
            return [CancelTimer(key=MASTER_LOST_TIMER)]
        if self._master_lost_since is not None:
            return []
        self._master_lost_since = now
        return [SetTimer(key=MASTER_LOST_TIMER, at=now + self.config.master_lost_grace_s)]

    def _on_master_lost(self, now: float) -> list[Effect]:
        since, session = self._master_lost_since, self.session
        if since is None or session is None:
            return []
        lost_for = now - since
        effects = self.requests.on_master_lost(now, session, lost_for)
        # Still cut off: look again after another grace (a request accepted meanwhile).
        effects.append(SetTimer(key=MASTER_LOST_TIMER, at=now + self.config.master_lost_grace_s))
        if len(effects) > 1:
            effects.append(Log(level="warning", message=(
                f"master {session.master} of session {session} not among this node's peers for {lost_for:.1f} s; "
                "ended its in-flight requests (master_unreachable)")))
        return effects

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
                effects += self.requests.on_applied(now, indexed)
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
                effects += self._raise(now, self._rebuild_events(state))
            if self._since_persist >= self.config.persist_state_every:
                self._since_persist = 0
                effects.append(self._persist_effect(self.election.clock))
            effects += self._reconcile(now)
        raise AssertionError("state kept changing: a feedback loop between the worker and the master")

    def _reconcile(self, now: float) -> list[Effect]:
        if self.replica.current is None:
            return []  # a failover is in progress: never act on a half-known state
        effects, events = self.worker.reconcile(now, self.replica.current)
        return effects + self._raise(now, events)

    def _rebuild_events(self, state: State) -> list[Event]:
        events: list[Event] = [self._info_event(force=True, full=True)]
        mine = {c for c in state.topology.connections if c.source == self.node_id}
        live = set()
        for (sink, address), (kind, reachable) in sorted(self._links.items()):
            if reachable:
                conn = Connection(source=self.node_id, sink=sink, address=address, kind=kind)
                live.add(conn)
                if conn not in mine:
                    events.append(ConnectionObserved(connection=conn))
        for conn in sorted(mine - live, key=lambda c: (c.sink, c.address, c.kind)):
            events.append(ConnectionLost(connection=conn))
        have = state.downloads.get(self.node_id, ())
        for model in sorted(self._models):
            if model not in have:
                events.append(DownloadCompleted(node_id=self.node_id, model_id=model))
        events += self.worker.rebuild(state)
        return events

    # --- local events ----------------------------------------------------------------------

    def _raise(self, now: float, events: list[Event]) -> list[Effect]:
        """Send local events to the master (or index them, if we are it)."""
        effects: list[Effect] = []
        if self.outbox.session is None:
            return effects  # no master yet; the rebuild after election re-reports
        for event in events:
            msg, timer_effects = self.outbox.add(now, event)
            effects += timer_effects
            if self.is_master and msg.session == self.master.session:  # type: ignore[union-attr]
                assert self.master is not None
                effects += self.master.on_local_event(now, msg)
            else:
                effects.append(Send(message=msg, to=msg.session.master))
        return effects

    # --- telemetry and links -------------------------------------------------------------------

    def _on_info(self, now: float, inp: InfoObserved) -> list[Effect]:
        changes = {
            f: getattr(inp, f) for f in ("identity", "memory", "network", "system", "runner_kv") if getattr(inp, f) is not None
        }
        self._info = msgspec.structs.replace(self._info, **changes)
        if inp.memory is not None:
            self.worker.memory = inp.memory
        if not self._session_applied:
            return []
        event = self._info_event(force=False)
        if event.identity is None and event.memory is None and event.network is None and event.system is None:
            return []
        return self._raise(now, [event]) + self._after_state(now)

    def _info_event(self, *, force: bool, full: bool = False) -> NodeGatheredInfo:
        """Telemetry that changed since it was last reported in this session.

        Runners' KV ledgers change with every request, so they ride only on
        the periodic (``force``) report: at most one update per telemetry
        interval, and never an event of their own.
        """
        info, rep = self._info, self._reported
        identity = info.identity if (full or info.identity != rep.identity) else None
        network = info.network if (full or info.network != rep.network) else None
        system = info.system if (full or info.system != rep.system) else None
        memory = info.memory if (full or _memory_moved(rep.memory, info.memory)) else None
        runner_kv = info.runner_kv if (force or full) and info.runner_kv != rep.runner_kv else None
        changes = {
            k: v
            for k, v in (
                ("identity", identity), ("network", network), ("system", system), ("memory", memory), ("runner_kv", runner_kv),
            )
            if v is not None
        }  # fmt: skip
        if changes:
            self._reported = msgspec.structs.replace(self._reported, **changes)
        return NodeGatheredInfo(
            node_id=self.node_id, identity=identity, memory=memory, network=network, system=system, runner_kv=runner_kv
        )

    def _on_link(self, now: float, inp: LinkProbed) -> list[Effect]:
        self._links[(inp.sink, inp.address)] = (inp.kind, inp.reachable)
        if not self._session_applied:
            return []
        state = self.state
        conn = Connection(source=self.node_id, sink=inp.sink, address=inp.address, kind=inp.kind)
        events: list[Event] = []
        for old in state.topology.connections:
            if old.source == self.node_id and old.sink == inp.sink and old.address == inp.address:
                if old != conn or not inp.reachable:
                    events.append(ConnectionLost(connection=old))
        if inp.reachable and conn not in state.topology.connections:
            events.append(ConnectionObserved(connection=conn))
        if not events:
            return []
        return self._raise(now, events) + self._after_state(now)

    # --- runners ---------------------------------------------------------------------------------

    def _on_runner_output(self, now: float, inp: RunnerOutput) -> list[Effect]:
        chunk = inp.chunk
        effects: list[Effect] = []
        task = self.state.tasks.get(chunk.task_id)
        if task is not None:
            if task.origin == self.node_id:
                effects += self.requests.on_chunk(now, chunk, self.incarnation)
            else:
                effects.append(Send(
                        message=ChunkMessage(destination=task.origin, chunk=chunk, incarnation=self.incarnation),
                        to=task.origin,
                    ))
        events = self.worker.on_output(now, inp.runner_id, chunk)
        return effects + self._raise(now, events) + self._after_state(now)

    # --- persistence -------------------------------------------------------------------------------

    def _seniority(self) -> int:
        if self.is_master and self.master is not None and self.master.state is not None:
            return 1 + len(self.master.state.topology.nodes)
        return 0

    def _persist_effect(self, clock: int) -> PersistNode:
        state = self.replica.last_state
        raw = encode_state(state) if state.session is not None else None
        return PersistNode(
            record=NodeRecord(
                node_id=self.node_id, election_clock=clock, state=raw, incarnation=self.incarnation.number
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
        out: list[Effect] = []
        queue = list(effects)
        steps = 0
        while queue:
            steps += 1
            assert steps < _LOOP_LIMIT * 10, "loopback did not settle"
            effect = queue.pop(0)
            if isinstance(effect, Send):
                msg = effect.message
                if effect.to == self.node_id:
                    queue.extend(self._on_message(now, self.node_id, msg))
                    continue
                if effect.to is None and isinstance(msg, CommandMessage) and msg.origin == self.node_id:
                    out.append(effect)
                    queue.extend(self._on_message(now, self.node_id, msg))
                    continue
            out.append(effect)
        return out


def _memory_moved(old: MemoryInfo | None, new: MemoryInfo | None) -> bool:
    if new is None:
        return False
    if old is None or old.ram_total != new.ram_total:
        return True
    delta = abs(old.ram_available.in_bytes - new.ram_available.in_bytes)
    return delta > max(_MEMORY_REPORT_MIN_BYTES, int(new.ram_total.in_bytes * _MEMORY_REPORT_FRACTION))
