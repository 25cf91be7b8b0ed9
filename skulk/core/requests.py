"""The origin side of commands: what this node's API submitted, until it ends.

Theory of operation
-------------------
A command from the local API is broadcast on the commands topic (every node
counts it for the election; only the master acts). Until the master answers,
it is re-sent every ``command_retry_s``; a ``pending`` answer (placement
information not yet known) keeps it retrying until ``command_deadline_s``,
after which it fails with a 503-class error. A command submitted while no
master is known waits for one, within the same deadline.

A task request stays *open* after acceptance: its chunks arrive on the data
topic and are handed to the API, until the chunk with a ``finish_reason``.
It also ends, with an error chunk, when:

- the session changes while it is open (invariant 8: requests open on a dead
  master end with a clear error, never hang);
- the replicated state says its task failed or was deleted and the last chunk
  does not follow within ``request_linger_s``;
- this node caught up from a snapshot (``on_state_jumped``) taken at or after
  an index at which the task existed (``CommandResult.task_index``), and the
  task is gone from it: it ended in the events the snapshot stands for, so
  whether it failed or completed is not known here; the last chunk gets
  ``request_linger_s`` to arrive, then the request ends with ``stream_lost``.
- this node has not had its session's master among its peers for
  ``master_lost_grace_s`` (``on_master_lost``): a partial mesh in which the
  others still reach the master, so no election follows, but neither this
  node's chunks nor its events can arrive.

Abandoning a request sends a ``CancelTask`` and closes it at once.
"""

from __future__ import annotations

from skulk.core.commands import CancelTask, Command, CommandResult, SubmitTask
from skulk.core.config import CoreConfig
from skulk.core.effects import CommandCompleted, DeliverChunk, Effect, Send
from skulk.core.events import IndexedEvent, TaskDeleted, TaskFailed
from skulk.core.ids import CommandId, NodeId, TaskId, derive_id
from skulk.core.messages import CommandMessage
from skulk.core.output import Output
from skulk.core.session import Incarnation, Session
from skulk.core.state import State
from skulk.core.tasks import ChunkError, TokenChunk
from skulk.core.timers import RequestTimer, cancel_timer, set_timer

__all__ = ["Requests", "SESSION_CHANGED", "MASTER_UNREACHABLE"]

SESSION_CHANGED = "session_changed"
MASTER_UNREACHABLE = "master_unreachable"


class _Open:
    __slots__ = ("command", "submitted_at", "sent_session", "accepted", "next_seq", "retry_at", "linger", "epoch",
                 "task_index", "ended_unseen")

    def __init__(self, command: Command, now: float) -> None:
        self.command = command
        self.submitted_at = now
        self.sent_session: Session | None = None
        self.accepted = False
        self.next_seq = 0
        self.retry_at: float | None = None
        self.linger = False
        self.epoch: Incarnation | None = None  # incarnation of the node streaming the chunks
        self.task_index: int | None = None  # an index at which the task exists (from the accepted answer)
        self.ended_unseen = False  # its task ended in events a snapshot skipped


class Requests:
    def __init__(self, node_id: NodeId, config: CoreConfig) -> None:
        self.node_id = node_id
        self.config = config
        self._open: dict[CommandId, _Open] = {}
        self._by_task: dict[TaskId, CommandId] = {}

    @property
    def open_count(self) -> int:
        return len(self._open)

    def is_open(self, command_id: CommandId) -> bool:
        return command_id in self._open

    # --- from the API ----------------------------------------------------------------

    def submit(self, now: float, command: Command, session: Session | None) -> Output:
        """Track and send ``command``. Returns the effects (the caller routes to the master)."""
        cid = command.command_id
        if cid in self._open:
            return Output()  # a duplicate submission of something in flight
        entry = _Open(command, now)
        self._open[cid] = entry
        if isinstance(command, SubmitTask):
            self._by_task[TaskId(derive_id("task", cid))] = cid
        effects: list[Effect] = []
        if session is not None:
            effects += self._send(now, entry, session)
        effects.append(self._arm(entry, self._next_try(entry, now)))
        return Output(effects)

    def abandon(self, now: float, command_id: CommandId, session: Session | None) -> Output:
        entry = self._open.get(command_id)
        if entry is None:
            return Output()
        effects = self._close(command_id)
        if isinstance(entry.command, SubmitTask) and session is not None:
            cancel = CancelTask(command_id=CommandId(derive_id("cancel", command_id)), target=command_id)
            # Fire and forget: the master also remembers cancelled ids, so a
            # cancel overtaking its submit still cancels it.
            effects.append(Send(message=CommandMessage(origin=self.node_id, command=cancel)))
        return Output(effects)

    # --- from the master --------------------------------------------------------------

    def on_result(
        self, now: float, result: CommandResult, session: Session | None, answered_in: Session | None = None
    ) -> Output:
        """The master of ``answered_in`` answered a command; only the master it was sent to counts.

        A deposed master that has not heard of its deposition (paused, cut
        off) still acts on broadcast commands; its answer must not settle a
        request this node sent in a newer session, or the request would wait
        forever for a task no live master runs.
        """
        entry = self._open.get(result.command_id)
        if entry is None:
            return Output()
        if answered_in is not None and answered_in != entry.sent_session:
            return Output()
        if result.status == "pending":
            if self._past_deadline(entry, now):
                return Output(self._fail(result.command_id, self._deadline_result(entry, result.message)))
            entry.retry_at = now + self.config.command_retry_s
            return Output([self._arm(entry, entry.retry_at)])
        if result.status == "rejected" or not isinstance(entry.command, SubmitTask):
            effects = self._close(result.command_id)
            effects.append(CommandCompleted(command_id=result.command_id, result=result))
            return Output(effects)
        if entry.accepted:
            return Output()
        entry.accepted = True
        entry.task_index = result.task_index
        return Output([
            cancel_timer(RequestTimer(result.command_id)),
            CommandCompleted(command_id=result.command_id, result=result),
        ])

    def on_chunk(self, now: float, chunk: TokenChunk, epoch: Incarnation) -> Output:
        """A chunk from the node (in its incarnation ``epoch``) running the request's task."""
        entry = self._open.get(chunk.command_id)
        if entry is None:
            return Output()  # abandoned or finished
        if entry.epoch is None or (entry.epoch != epoch and entry.next_seq == 0):
            entry.epoch = epoch
        elif entry.epoch != epoch:
            # The node streaming this request restarted and runs the task again
            # from the start: the client already has part of the old output.
            return Output(self._error(
                chunk.command_id,
                entry,
                "the node generating this response restarted mid-stream; retry the request",
                "runner_restarted",
            ))
        if chunk.seq < entry.next_seq:
            return Output()  # a duplicate
        entry.next_seq = chunk.seq + 1
        effects: list[Effect] = [DeliverChunk(chunk=chunk)]
        if chunk.finish_reason is not None:
            effects += self._close(chunk.command_id)
        return Output(effects)

    # --- from the replicated state ------------------------------------------------------

    def on_applied(self, now: float, indexed: IndexedEvent) -> Output:
        event = indexed.event
        if not isinstance(event, (TaskFailed, TaskDeleted)):
            return Output()
        cid = self._by_task.get(event.task_id)
        if cid is None or cid not in self._open:
            return Output()
        entry = self._open[cid]
        if isinstance(event, TaskFailed):
            # The runner's own code and type when it gave them (a refusal is the
            # client's error, not the server's), however the race with its chunk went.
            return Output(self._error(
                cid, entry, event.error_message, event.code or "task_failed", error_type=event.error_type or "server_error",
                retry_after_s=event.retry_after_s,
            ))  # fmt: skip
        if event.outcome == "completed":
            # The last chunk travels separately and may still be on its way.
            entry.linger = True
            return Output([self._arm(entry, now + self.config.request_linger_s)])
        return Output(self._error(cid, entry, f"the request was {event.outcome}", event.outcome))

    def on_state_jumped(self, now: float, state: State) -> Output:
        """This node installed a snapshot: end the accepted requests whose task it shows ended.

        The snapshot stands for events this node never applied one by one; a
        ``TaskFailed`` or ``TaskDeleted`` among them would otherwise never reach
        ``on_applied``, and the request would stay open for good.
        """
        effects: list[Effect] = []
        for cid in sorted(self._open):
            entry = self._open[cid]
            if not (isinstance(entry.command, SubmitTask) and entry.accepted) or entry.linger:
                continue
            if entry.task_index is None or state.last_index < entry.task_index:
                continue  # the snapshot may predate the task
            if TaskId(derive_id("task", cid)) in state.tasks:
                continue
            entry.linger = True
            entry.ended_unseen = True
            effects.append(self._arm(entry, now + self.config.request_linger_s))
        return Output(effects)

    def on_session_changed(self, now: float, old: Session | None, new: Session) -> Output:
        effects: list[Effect] = []
        for cid in sorted(self._open):
            entry = self._open[cid]
            if entry.sent_session is None:
                effects += self._send(now, entry, new)
                continue
            if entry.sent_session == new:
                continue
            message = (
                f"the cluster's master changed (session {entry.sent_session} -> {new}) while this "
                "request was in flight; retry the request"
            )
            if isinstance(entry.command, SubmitTask) and entry.accepted:
                effects += self._error(cid, entry, message, SESSION_CHANGED)
            else:
                effects += self._fail(
                    cid, CommandResult(command_id=cid, status="rejected", code=SESSION_CHANGED, message=message)
                )
        return Output(effects)

    def on_master_lost(self, now: float, session: Session, lost_for_s: float) -> Output:
        """End the accepted task requests sent in ``session``: this node cannot reach its master.

        Requests not yet accepted keep retrying until their own deadline (an
        election may still bring a reachable master).
        """
        effects: list[Effect] = []
        message = (
            f"this node has not reached the master of session {session} for {lost_for_s:.1f} s while the request "
            "was in flight; retry the request (on another node if this one stays cut off)"
        )
        for cid in sorted(self._open):
            entry = self._open[cid]
            if not (isinstance(entry.command, SubmitTask) and entry.accepted and entry.sent_session == session):
                continue
            cancel = CancelTask(command_id=CommandId(derive_id("cancel", cid)), target=cid)
            effects.append(Send(message=CommandMessage(origin=self.node_id, command=cancel)))
            effects += self._error(cid, entry, message, MASTER_UNREACHABLE)
        return Output(effects)

    # --- timers --------------------------------------------------------------------------

    def on_timer(self, now: float, timer: RequestTimer, session: Session | None) -> Output:
        cid = timer.command_id
        entry = self._open.get(cid)
        if entry is None:
            return Output()
        if entry.linger:
            if entry.ended_unseen:
                return Output(self._error(
                    cid, entry, "the request's task ended while this node was catching up on the cluster's state, "
                    "and its last chunk never arrived; retry the request", "stream_lost"))
            return Output(self._error(cid, entry, "the request completed but its last chunk never arrived", "stream_lost"))
        if entry.accepted:
            return Output()
        if self._past_deadline(entry, now):
            return Output(self._fail(cid, self._deadline_result(entry, "")))
        effects: list[Effect] = []
        if session is not None:
            effects += self._send(now, entry, session)
        effects.append(self._arm(entry, self._next_try(entry, now)))
        return Output(effects)

    # --- internals ---------------------------------------------------------------------------

    def _deadline(self, entry: _Open) -> float:
        return entry.submitted_at + self.config.command_deadline_s

    def _past_deadline(self, entry: _Open, now: float) -> bool:
        # The same expression as the timer armed for it (_next_try), so a timer
        # that fires exactly at the deadline always sees it passed.
        return now >= self._deadline(entry)

    def _next_try(self, entry: _Open, now: float) -> float:
        """When to re-send: after ``command_retry_s``, but never past the deadline."""
        return min(now + self.config.command_retry_s, self._deadline(entry))

    def _deadline_result(self, entry: _Open, detail: str) -> CommandResult:
        cid = entry.command.command_id
        what = "no master answered" if entry.sent_session is None or not detail else detail
        return CommandResult(
            command_id=cid,
            status="rejected",
            code="unavailable",
            message=f"gave up after {self.config.command_deadline_s:g} s: {what}",
        )

    def _send(self, now: float, entry: _Open, session: Session) -> list[Effect]:
        entry.sent_session = session
        return [Send(message=CommandMessage(origin=self.node_id, command=entry.command))]

    def _arm(self, entry: _Open, at: float) -> Effect:
        return set_timer(RequestTimer(entry.command.command_id), at)

    def _close(self, cid: CommandId) -> list[Effect]:
        entry = self._open.pop(cid, None)
        if entry is not None and isinstance(entry.command, SubmitTask):
            self._by_task.pop(TaskId(derive_id("task", cid)), None)
        return [cancel_timer(RequestTimer(cid))]

    def _fail(self, cid: CommandId, result: CommandResult) -> list[Effect]:
        effects = self._close(cid)
        effects.append(CommandCompleted(command_id=cid, result=result))
        return effects

    def _error(
        self, cid: CommandId, entry: _Open, message: str, code: str, *, error_type: str = "server_error",
        retry_after_s: int | None = None,
    ) -> list[Effect]:
        chunk = TokenChunk(
            command_id=cid,
            task_id=TaskId(derive_id("task", cid)),
            seq=entry.next_seq,
            finish_reason="error",
            error=ChunkError(message=message, type=error_type, code=code, retry_after_s=retry_after_s),
        )
        effects = self._close(cid)
        if not entry.accepted:
            # The API still waits for the command's answer; give it one.
            effects.append(
                CommandCompleted(
                    command_id=cid, result=CommandResult(command_id=cid, status="rejected", code=code, message=message)
                )
            )
            return effects
        effects.append(DeliverChunk(chunk=chunk))
        return effects
