"""A worker's outbox of local events for the current master.

Theory of operation
-------------------
Each local event gets an ``origin_idx``, dense from 0 within a session, and is
sent to the session's master. It counts as delivered when the node applies a
global event stamped with its own ``origin``/``origin_idx`` at or beyond it
(the master processes an origin's events in order), or when the master sends a
``LocalEventAck``. Undelivered events are re-sent with bounded exponential
backoff (first after 5 s, then x2) and given up after a fixed number of sends.
When the master reports a gap (it holds later events and lacks one), that
event is sent again at once: the master handles an origin's events in order,
so one lost event holds back every later one until it arrives.

A new session starts a fresh outbox: what was pending for the old master is
dropped, because the worker re-reports its current facts (telemetry, runner
statuses, hosted instances) to the new master instead.

Invariants kept: at most ``local_outbox_max`` events pending; every event is
sent at most ``local_retry_max_attempts`` times by the retry timer, plus once
per gap report (the master reports a gap at 1, 2, 4, 8... events held, so at
most log2(``local_outbox_max``) + 1 times).
"""

from __future__ import annotations

from skulk.core.config import CoreConfig
from skulk.core.effects import Effect, Log, Send
from skulk.core.events import Event
from skulk.core.ids import NodeId
from skulk.core.messages import LocalEventAck, LocalEventMessage
from skulk.core.output import Output
from skulk.core.session import Incarnation, Session
from skulk.core.timers import OutboxTimer, cancel_timer, set_timer

__all__ = ["Outbox"]


class _Pending:
    __slots__ = ("msg", "sends", "due")

    def __init__(self, msg: LocalEventMessage, due: float) -> None:
        self.msg = msg
        self.sends = 1
        self.due = due


class Outbox:
    def __init__(self, node_id: NodeId, config: CoreConfig) -> None:
        self.node_id = node_id
        self.incarnation: Incarnation | None = None  # set at boot
        self.config = config
        self.session: Session | None = None
        self._next_idx = 0
        self._pending: dict[int, _Pending] = {}
        self._timer_at: float | None = None
        self.given_up = 0

    def boot(self, incarnation: Incarnation) -> None:
        """This life of the node: local events are numbered within it."""
        assert self.incarnation is None, "booted twice"
        self.incarnation = incarnation

    def reset(self, session: Session) -> Output:
        self.session = session
        self._next_idx = 0
        self._pending.clear()
        self._timer_at = None
        return Output([cancel_timer(OutboxTimer())])

    def add(self, now: float, event: Event) -> tuple[LocalEventMessage, list[Effect]]:
        """Number ``event``; returns the message (the caller routes it) and timer effects.

        Not an input of its own: the node's plumbing for raising a local event.
        """
        assert self.session is not None, "no session to send local events to"
        assert self.incarnation is not None, "local events before boot"
        msg = LocalEventMessage(
            origin=self.node_id,
            session=self.session,
            origin_idx=self._next_idx,
            event=event,
            incarnation=self.incarnation,
        )
        self._next_idx += 1
        effects: list[Effect] = []
        if len(self._pending) >= self.config.local_outbox_max:
            oldest = min(self._pending)
            del self._pending[oldest]
            self.given_up += 1
            effects.append(Log(level="warning", message="local event outbox full; dropped the oldest event"))
        due = now + self.config.local_retry_first_s
        self._pending[msg.origin_idx] = _Pending(msg, due)
        effects += self._arm(due)
        return msg, effects

    def delivered_below(self, next_idx: int) -> None:
        """Everything below ``next_idx`` was processed by the master."""
        for idx in [i for i in self._pending if i < next_idx]:
            del self._pending[idx]

    def on_ack(self, ack: LocalEventAck) -> Output:
        """The master processed this life's events below ``ack.next_idx`` (and, on a gap, lacks that one)."""
        if ack.origin != self.node_id or ack.session != self.session or ack.incarnation != self.incarnation:
            return Output()  # for another node, an old session or an earlier life of this one
        self.delivered_below(ack.next_idx)
        if not ack.gap:
            return Output()
        # The master lacks event ``next_idx`` (it holds later ones): send it again now, if still pending.
        pending = self._pending.get(ack.next_idx)
        if pending is None:
            return Output()
        return Output([Send(message=pending.msg, to=ack.session.master)])

    def on_timer(self, now: float) -> Output:
        self._timer_at = None
        effects: list[Effect] = []
        for idx in sorted(self._pending):
            pending = self._pending[idx]
            if pending.due > now:
                continue
            if pending.sends >= self.config.local_retry_max_attempts:
                del self._pending[idx]
                self.given_up += 1
                effects.append(
                    Log(
                        level="warning",
                        message=f"gave up on local event {idx} ({type(pending.msg.event).__name__}) after {pending.sends} sends",
                    )
                )
                continue
            pending.sends += 1
            pending.due = now + self.config.local_retry_first_s * (2 ** (pending.sends - 1))
            assert self.session is not None
            effects.append(Send(message=pending.msg, to=self.session.master))
        if self._pending:
            effects += self._arm(min(p.due for p in self._pending.values()))
        return Output(effects)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def _arm(self, due: float) -> list[Effect]:
        if self._timer_at is not None and self._timer_at <= due:
            return []
        self._timer_at = due
        return [set_timer(OutboxTimer(), due)]
