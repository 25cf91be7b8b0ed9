"""The asyncio driver of the core: inputs in, effects out, nothing decided here.

Theory of operation
-------------------
``Driver.feed(input)`` is the one entry into the core. It runs on the event
loop thread only (other threads use ``feed_threadsafe``) and serialises every
``CoreNode.handle`` call through a queue: an input fed while effects are
being carried out (a failed disk write becomes ``PersistFailed``, a runner
spawn error becomes ``RunnerExited``) is queued and handled after the current
one, never re-entrantly.

``now`` and timers come from a clock (``skulk.runtime.clock``): by default
the wall clock (``time.time()``) held monotone, so a stepped system clock
never moves timers or the master's event stamps backwards, with timers as
``loop.call_later`` handles; tests inject a ``ManualClock`` and advance it by
hand. Timers are keyed like the core's ``SetTimer``/``CancelTimer`` (a new
``SetTimer`` replaces the old one of the same key).

Effects are carried out in list order, each by the driver's ``carry_*``
method for its type (``skulk.core.effects.EffectCarrier``):

==================  ====================================================
Send                ``transport.send`` (zenoh put on the message's topic)
SetTimer            ``loop.call_later`` -> ``TimerFired``
CancelTimer         cancel the handle
PersistNode         atomic write of ``node.msgpack``; failure -> PersistFailed
AppendLog           ``eventlog.append`` (degraded mode -> PersistFailed)
WriteSnapshot       ``eventlog.write_snapshot``
StartRunner ...     the supervisor (start, stop, dispatch, cancel)
DeliverChunk        to the API request waiting on the command id
CommandCompleted    to the API request waiting on the command id
SessionChanged      to the listeners (the API bridge, auto-placement)
Log                 the ``skulk.core`` logger
StartTransfer ...   the node's file service (``skulk.runtime.filestore.NodeFiles``):
                    hub downloads and peer copies in threads, cancel, delete
==================  ====================================================

Write-ahead: an indexed event is handed to the OS (the event log's
``flush``) before anything leaves the process after it: a ``Send`` to a peer
or a ``CommandCompleted`` to the API. Otherwise a master killed between the
two (kill -9, an OOM kill) leaves followers applying an event its own log
never held, and a recorded trace shows a follower ahead of its master
(invariant 2; seen in the failover-under-load test). Power loss still needs
the fsync that archiving does; a process crash no longer loses a sent event.

If the core raises, that is a broken invariant: the driver logs it as
critical and stops the node (``fatal``) rather than serve on from a state it
can no longer trust; the service manager restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import msgspec

from skulk.core.codec import WireError, decode_msgpack, encode_msgpack
from skulk.core.commands import CommandResult
from skulk.core.effects import (
    AppendLog,
    CancelRunnerTask,
    CancelTimer,
    CancelTransfer,
    CommandCompleted,
    DeleteFiles,
    DeliverChunk,
    DispatchTask,
    EffectCarrier,
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
from skulk.core.ids import CommandId
from skulk.core.inputs import FilesGone, Input, PersistFailed, Shutdown, TimerFired, TransferEnded
from skulk.core.node import CoreNode
from skulk.core.session import Session
from skulk.core.tasks import TokenChunk
from skulk.runtime.clock import Clock, TimerHandle, WallClock

__all__ = ["Driver", "ApiSink", "load_node_record", "write_node_record", "NODE_RECORD_FILENAME"]

log = logging.getLogger("skulk.driver")
core_log = logging.getLogger("skulk.core")

NODE_RECORD_FILENAME = "node.msgpack"
_LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class ApiSink(Protocol):
    """Where results for the local API go (implemented by ``skulk.runtime.api_bridge``)."""

    def deliver_chunk(self, chunk: TokenChunk) -> None: ...

    def command_completed(self, command_id: CommandId, result: CommandResult) -> None: ...

    def session_changed(self, session: Session, is_master: bool) -> None: ...


class _Transport(Protocol):
    def send(self, message: object, to: object) -> None: ...


class FileService(Protocol):
    """What carries out the core's file effects (``skulk.runtime.filestore.NodeFiles``)."""

    def start(self, effect: StartTransfer) -> None: ...

    def cancel(self, transfer_id: str) -> None: ...

    def delete(self, model_id: str) -> None: ...


def load_node_record(path: Path, node_id: str) -> NodeRecord | None:
    """The persisted record of ``node_id`` at ``path``; None when absent or unreadable.

    A record of another node (a copied data dir with a new id) is ignored.
    """
    if not path.is_file():
        return None
    try:
        record = decode_msgpack(NodeRecord, path.read_bytes())
    except (OSError, WireError) as exc:
        log.error("ignoring unreadable node record %s: %s", path, exc)
        return None
    if record.node_id != node_id:
        log.warning("ignoring node record of %s in %s (this node is %s)", record.node_id, path, node_id)
        return None
    return record


def write_node_record(path: Path, record: NodeRecord) -> None:
    """Atomically replace ``path`` with ``record`` (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    data = encode_msgpack(record)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Driver(EffectCarrier):
    """Runs one ``CoreNode`` on the running asyncio loop."""

    def __init__(
        self,
        core: CoreNode,
        *,
        transport: _Transport,
        supervisor: object,
        eventlog: object,
        record_path: Path,
        api: ApiSink | None = None,
        fatal: Callable[[BaseException], None] | None = None,
        clock: Clock | None = None,
        files: FileService | None = None,
    ) -> None:
        self.core = core
        self.files = files
        self.transport = transport
        self.supervisor = supervisor
        self.eventlog = eventlog
        self.record_path = record_path
        self.api = api
        self.fatal = fatal
        self.session_listeners: list[Callable[[Session, bool], None]] = []
        self.loop = asyncio.get_running_loop()
        self.clock: Clock = clock if clock is not None else WallClock(self.loop)
        self._queue: deque[Input] = deque()
        self._draining = False
        self._timers: dict[str, TimerHandle] = {}
        # Appends buffered since the event log was last handed to the OS. Nothing
        # leaves the process (a message to a peer, an answer to the API) while an
        # indexed event is only in this process's buffer: a kill -9 between the two
        # would leave followers with an event their master's log never held.
        self._log_unflushed = False
        self._carry = self.effect_table()
        self.failed: BaseException | None = None
        # Metrics.
        self.inputs: Counter[str] = Counter()
        self.effects: Counter[str] = Counter()
        self.handle_seconds_total = 0.0
        self.handle_seconds_max = 0.0
        self.persist_failures = 0
        # Wall time of event 0 of the last session this node indexed as master.
        self.master_session_started_at: float | None = None

    # --- time ----------------------------------------------------------------------

    def now(self) -> float:
        """The core's ``now``: the clock's seconds, never decreasing."""
        return self.clock.now()

    # --- inputs --------------------------------------------------------------------

    def feed(self, inp: Input) -> None:
        """Hand ``inp`` to the core and carry out its effects (loop thread only)."""
        if self.failed is not None:
            return
        self._queue.append(inp)
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue and self.failed is None:
                item = self._queue.popleft()
                self.inputs[type(item).__name__] += 1
                started = time.perf_counter()
                try:
                    effects = self.core.handle(self.now(), item)
                except Exception as exc:  # a broken invariant: stop, do not limp on
                    self.failed = exc
                    log.critical("the core raised on %s: %r; stopping this node", type(item).__name__, exc,
                                 exc_info=True)
                    if self.fatal is not None:
                        self.fatal(exc)
                    return
                elapsed = time.perf_counter() - started
                self.handle_seconds_total += elapsed
                self.handle_seconds_max = max(self.handle_seconds_max, elapsed)
                for effect in effects:
                    self.effects[type(effect).__name__] += 1
                    try:
                        self._carry[type(effect)](effect)
                    except (OverflowError, msgspec.EncodeError) as exc:
                        # The core produced something the wire cannot carry. For the
                        # ordered log that means followers would stall behind this
                        # index forever: stop (a new master takes over) instead.
                        if isinstance(effect, (AppendLog, Send)):
                            self.failed = exc
                            log.critical("cannot encode %s: %r; stopping this node", type(effect).__name__, exc)
                            if self.fatal is not None:
                                self.fatal(exc)
                            return
                        log.exception("could not carry out %s", type(effect).__name__)
                    except Exception:  # one effect failing must not lose the others
                        log.exception("could not carry out %s", type(effect).__name__)
            self._flush_log()
        finally:
            self._draining = False

    def _flush_log(self) -> None:
        """Hand the event log's buffered appends to the OS (write-ahead of anything sent)."""
        self._log_unflushed = False
        flush = getattr(self.eventlog, "flush", None)
        if flush is not None:
            flush()

    def feed_threadsafe(self, inp: Input) -> None:
        """``feed`` from any thread."""
        self.loop.call_soon_threadsafe(self.feed, inp)

    # --- effects (one method per effect type; see skulk.core.effects.EffectCarrier) ----

    def carry_send(self, effect: Send) -> None:
        if self._log_unflushed:
            self._flush_log()
        self.transport.send(effect.message, effect.to)

    def carry_set_timer(self, effect: SetTimer) -> None:
        key = effect.key
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        self._timers[key] = self.clock.call_at(effect.at, lambda: self._fire(key))

    def carry_cancel_timer(self, effect: CancelTimer) -> None:
        handle = self._timers.pop(effect.key, None)
        if handle is not None:
            handle.cancel()

    def carry_persist_node(self, effect: PersistNode) -> None:
        self._persist(effect.record)

    def carry_append_log(self, effect: AppendLog) -> None:
        if effect.indexed.index == 0:
            self.master_session_started_at = effect.indexed.at
        self.eventlog.append(effect.session, effect.indexed)  # type: ignore[attr-defined]
        self._log_unflushed = True

    def carry_write_snapshot(self, effect: WriteSnapshot) -> None:
        self.eventlog.write_snapshot(effect.snapshot)  # type: ignore[attr-defined]

    def carry_start_runner(self, effect: StartRunner) -> None:
        self.supervisor.start(effect.spec)  # type: ignore[attr-defined]

    def carry_stop_runner(self, effect: StopRunner) -> None:
        self.supervisor.stop(effect.runner_id, effect.reason)  # type: ignore[attr-defined]

    def carry_dispatch_task(self, effect: DispatchTask) -> None:
        self.supervisor.dispatch(effect.runner_id, effect.task)  # type: ignore[attr-defined]

    def carry_cancel_runner_task(self, effect: CancelRunnerTask) -> None:
        self.supervisor.cancel(effect.runner_id, effect.task_id)  # type: ignore[attr-defined]

    def carry_deliver_chunk(self, effect: DeliverChunk) -> None:
        if self.api is not None:
            self.api.deliver_chunk(effect.chunk)

    def carry_command_completed(self, effect: CommandCompleted) -> None:
        if self._log_unflushed:
            self._flush_log()
        if self.api is not None:
            self.api.command_completed(effect.command_id, effect.result)

    def carry_session_changed(self, effect: SessionChanged) -> None:
        if self.api is not None:
            self.api.session_changed(effect.session, effect.is_master)
        for listener in list(self.session_listeners):
            listener(effect.session, effect.is_master)

    def carry_log(self, effect: Log) -> None:
        core_log.log(_LOG_LEVELS[effect.level], effect.message)

    def carry_start_transfer(self, effect: StartTransfer) -> None:
        if self.files is None:
            self.feed(TransferEnded(transfer_id=effect.transfer_id, model_id=effect.model_id, ok=False,
                                    code="internal", message="this node has no file service"))
            return
        self.files.start(effect)

    def carry_cancel_transfer(self, effect: CancelTransfer) -> None:
        if self.files is not None:
            self.files.cancel(effect.transfer_id)

    def carry_delete_files(self, effect: DeleteFiles) -> None:
        if self.files is None:
            self.feed(FilesGone(model_id=effect.model_id))
            return
        core_log.info("deleting the files of %s: %s", effect.model_id, effect.reason)
        self.files.delete(effect.model_id)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.feed(TimerFired(key=key))

    def _persist(self, record: NodeRecord) -> None:
        try:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            write_node_record(self.record_path, record)
        except OSError as exc:
            self.persist_failures += 1
            self._queue.append(PersistFailed(what="node record", error=str(exc)))

    def on_log_failure(self, error: str) -> None:
        """The disk log turned degraded: tell the core (it logs the one critical line)."""
        self.persist_failures += 1
        self.feed(PersistFailed(what="event log", error=error))  # queued when called mid-drain

    # --- shutdown ------------------------------------------------------------------

    def stop_runners(self) -> None:
        """The node is going away: stop every runner as the core's worker asks.

        The core's ``Shutdown`` input marks each runner as stopping (so the
        exits that follow are not crashes to restart) and returns the
        ``StopRunner`` effects carried out here.
        """
        self.carry_out(self.core.handle(self.now(), Shutdown()))

    def cancel_timers(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    @property
    def pending_timers(self) -> list[str]:
        return sorted(self._timers)
