"""The follower side of the event log: every node's replica of the state.

Theory of operation
-------------------
A replica follows exactly one session. It accepts ``GlobalEvent`` messages
only from that session's master, applies them strictly in index order, and
buffers anything that arrives early (bounded). A gap, or a master heartbeat
announcing a longer log, triggers a ``SyncRequest`` (a NACK) with bounded
exponential backoff (0.5 s x 2^n, capped at 10 s), reset whenever progress is
made. A new session bootstraps with a request from index 0; the master
answers with the events or, when they are no longer retained, a snapshot plus
the retained tail.

If an event arrives for an index already buffered with *different* content,
the buffered tail from that index is dropped and re-requested (the buffer must
never hold two histories).

Until the new session's first event is applied the replica keeps the old
session's state (``last_state``), so a node never acts on an empty state
during a failover; ``current`` is None in that window.

Invariants kept: ``state.last_index`` only grows within a session; every
applied event of a session comes from that session's master; the applied log
is a prefix of the master's.
"""

from __future__ import annotations

from skulk.core.config import CoreConfig
from skulk.core.effects import Effect, Log, Send
from skulk.core.events import IndexedEvent
from skulk.core.ids import NodeId
from skulk.core.messages import GlobalEvent, SyncRequest, SyncResponse
from skulk.core.output import Output
from skulk.core.session import Session
from skulk.core.state import State, apply, decode_state, digest
from skulk.core.timers import NackTimer, cancel_timer, set_timer

__all__ = ["Replica"]

# 2^60 x any sane base is far past any cap, and far from a float overflow.
_BACKOFF_EXPONENT_MAX = 60
# Attempts counted at most (beyond it the delay is the cap anyway).
_ATTEMPTS_COUNTED_MAX = 1_000
# What take_applied returns when nothing was applied (most inputs apply nothing).
_NOTHING_APPLIED: tuple[list[IndexedEvent], bool] = ([], False)  # never mutated: the callers only read it


class Replica:
    def __init__(self, node_id: NodeId, config: CoreConfig, last_state: State) -> None:
        self.node_id = node_id
        self.config = config
        self.session: Session | None = None
        # The state of the current session, once its first event is applied.
        self.current: State | None = None
        # The most recent applied state of any session (carryover source).
        self.last_state: State = last_state
        self._buffer: dict[int, IndexedEvent] = {}
        self._nack_attempt = 0
        self._nack_armed = False
        self._known_master_next = 0
        # Events applied since the last call to take_applied() (for observers),
        # and whether a snapshot replaced the state meanwhile.
        self._applied: list[IndexedEvent] = []
        self.installed_snapshot = False

    # --- queries ---------------------------------------------------------------

    @property
    def next_index(self) -> int:
        return 0 if self.current is None else self.current.last_index + 1

    @property
    def state(self) -> State:
        """The best state to act on: the current session's, else the last known."""
        return self.current if self.current is not None else self.last_state

    def take_applied(self) -> tuple[list[IndexedEvent], bool]:
        """Events applied (and whether a snapshot was installed) since the last call."""
        if not self._applied and not self.installed_snapshot:
            return _NOTHING_APPLIED
        applied, self._applied = self._applied, []
        jumped, self.installed_snapshot = self.installed_snapshot, False
        return applied, jumped

    # --- inputs ----------------------------------------------------------------

    def follow(self, now: float, session: Session) -> Output:
        """Switch to ``session`` (a new master). Bootstrap unless we are its master."""
        assert self.session is None or session.key() > self.session.key(), (self.session, session)
        self.session = session
        self.current = None
        self._buffer.clear()
        self._nack_attempt = 0
        self._known_master_next = 0
        effects: list[Effect] = [cancel_timer(NackTimer())]
        self._nack_armed = False
        if session.master != self.node_id:
            effects += self._request(now, 0, None)
        return Output(effects)

    def apply_own(self, indexed: IndexedEvent) -> State:
        """The master applies what it indexes, synchronously."""
        assert self.session is not None
        assert self.session.master == self.node_id or self.config.canary_double_master
        self._apply(indexed)
        assert self.current is not None
        return self.current

    def on_global_event(self, now: float, sender: NodeId, msg: GlobalEvent) -> Output:
        if self.session is None or msg.session != self.session or sender != self.session.master:
            return Output()
        indexed = msg.indexed
        if indexed.index < self.next_index:
            return Output()  # duplicate of something applied
        buffered = self._buffer.get(indexed.index)
        effects: list[Effect] = []
        if buffered is not None and buffered != indexed:
            for i in [i for i in self._buffer if i >= indexed.index]:
                del self._buffer[i]
            effects.append(Log(level="warning", message=f"conflicting event at index {indexed.index}; re-requesting"))
        if len(self._buffer) >= self.config.follower_buffer_max and indexed.index != self.next_index:
            return Output(effects)  # bounded: drop, the NACK will fetch it again
        self._buffer[indexed.index] = indexed
        self._known_master_next = max(self._known_master_next, indexed.index + 1)
        effects += self._drain(now)
        return Output(effects)

    def on_master_heartbeat(self, now: float, sender: NodeId, log_next: int) -> Output:
        if self.session is None or sender != self.session.master:
            return Output()
        if log_next > self._known_master_next:
            self._known_master_next = log_next
        return Output(self._maybe_nack(now))

    def on_sync_response(self, now: float, sender: NodeId, msg: SyncResponse) -> Output:
        if self.session is None or msg.session != self.session or sender != self.session.master:
            return Output()
        effects: list[Effect] = []
        snap = msg.snapshot
        if snap is not None and snap.index >= self.next_index:
            state = decode_state(snap.state)
            if digest(state) != snap.digest or state.session != self.session or state.last_index != snap.index:
                return Output([Log(level="error", message=f"rejected corrupt snapshot at index {snap.index}")])
            self.current = state
            self.last_state = state
            for i in [i for i in self._buffer if i <= snap.index]:
                del self._buffer[i]
            self.installed_snapshot = True
        for indexed in msg.events:
            if indexed.index < self.next_index:
                continue
            buffered = self._buffer.get(indexed.index)
            if buffered is not None and buffered != indexed:
                for i in [i for i in self._buffer if i >= indexed.index]:
                    del self._buffer[i]
            self._buffer[indexed.index] = indexed
            self._known_master_next = max(self._known_master_next, indexed.index + 1)
        effects += self._drain(now)
        return Output(effects)

    def on_nack_timer(self, now: float) -> Output:
        self._nack_armed = False
        if self._is_caught_up():
            self._nack_attempt = 0
            return Output()
        return Output(self._request(now, self.next_index, self._gap_end()))

    # --- internals ---------------------------------------------------------------

    def _apply(self, indexed: IndexedEvent) -> None:
        base = self.current if self.current is not None else self.last_state
        if self.current is None:
            assert indexed.index == 0, f"a session starts at index 0, got {indexed.index}"
        new = apply(base, indexed)
        assert new.session == self.session, (new.session, self.session)
        self.current = new
        self.last_state = new
        self._applied.append(indexed)

    def _drain(self, now: float) -> list[Effect]:
        progressed = False
        while self.next_index in self._buffer:
            self._apply(self._buffer.pop(self.next_index))
            progressed = True
        if progressed:
            # Progress resets the backoff, and so the NACK already armed: left as it
            # was, a timer armed after several unanswered NACKs (4 s, 8 s...) would
            # make the next gap wait for it instead of nack_base_s (found by the
            # simulator's efficiency invariant E3, master_failover --seed 53).
            self._nack_attempt = 0
            self._nack_armed = False
        return self._maybe_nack(now)

    def _is_caught_up(self) -> bool:
        return not self._buffer and self.next_index >= self._known_master_next

    def _gap_end(self) -> int | None:
        """End of the range a NACK asks for (None: everything from ``next_index``).

        One gap before a contiguous buffered run: just that gap. Several gaps:
        everything, so one round trip fills them all (the master bounds the
        batch); asking gap by gap costs a backoff per gap and, under steady
        loss, lets a follower fall behind for good.
        """
        if not self._buffer:
            return None
        lo, hi = min(self._buffer), max(self._buffer)
        if hi - lo + 1 == len(self._buffer) and hi + 1 >= self._known_master_next:
            return lo
        return None

    def _maybe_nack(self, now: float) -> list[Effect]:
        if self._is_caught_up() or self._nack_armed:
            return []
        # Give in-flight messages a moment before asking: wait the backoff first.
        delay = self._backoff_s()
        self._nack_armed = True
        return [set_timer(NackTimer(), now + delay)]

    def _backoff_s(self) -> float:
        """``nack_base_s x 2^attempt``, capped at ``nack_cap_s``.

        The exponent is capped before the power is taken: a follower cut off
        from its master for hours makes thousands of attempts, and 2^1024
        times a float overflows (``OverflowError``) long before the cap applies.
        """
        exponent = min(self._nack_attempt, _BACKOFF_EXPONENT_MAX)
        return min(self.config.nack_base_s * (2**exponent), self.config.nack_cap_s)

    def _request(self, now: float, start: int, end: int | None) -> list[Effect]:
        assert self.session is not None
        self._nack_attempt = min(self._nack_attempt + 1, _ATTEMPTS_COUNTED_MAX)
        delay = self._backoff_s()
        self._nack_armed = True
        req = SyncRequest(session=self.session, requester=self.node_id, from_index=start, to_index=end)
        return [Send(message=req, to=self.session.master), set_timer(NackTimer(), now + delay)]

