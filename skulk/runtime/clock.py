"""Clocks for the asyncio driver: the wall clock, and a hand-advanced one for tests.

Theory of operation
-------------------
The driver asks a clock two things: ``now()`` (seconds, the core's ``now``)
and ``call_at(at, fn)`` (run ``fn`` once the clock reaches ``at``; the handle
can be cancelled). Production uses ``WallClock``: ``now`` is ``time.time()``
held monotone (a stepped-back system clock never moves the core's time
backwards), timers are ``loop.call_later`` handles. Tests use
``ManualClock``, as trio ships a mock clock with its runtime: time stands
still until ``advance(s)``, which runs every due callback in time order (ties
in scheduling order) with ``now`` set to its due time, so a test of timers
needs no sleep and cannot be flaky.

Invariants kept: ``now()`` never decreases; a callback runs at most once, and
never before its time by the clock that scheduled it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Clock", "TimerHandle", "WallClock", "ManualClock"]


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float:
        """Seconds; never decreasing."""
        ...

    def call_at(self, at: float, fn: Callable[[], None]) -> TimerHandle:
        """Run ``fn`` once ``now()`` reaches ``at`` (at once if it has)."""
        ...


class WallClock:
    """The system clock, held monotone; timers on the running asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, source: Callable[[], float] = time.time) -> None:
        self.loop = loop
        self._source = source
        self._last = 0.0

    def now(self) -> float:
        t = self._source()
        if t < self._last:
            t = self._last  # the system clock stepped back: hold still until it catches up
        self._last = t
        return t

    def call_at(self, at: float, fn: Callable[[], None]) -> TimerHandle:
        return self.loop.call_later(max(0.0, at - self._source()), fn)


class _ManualHandle:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """Time that moves only when a test says so (``advance``)."""

    def __init__(self, start: float = 1_000.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._due: list[tuple[float, int, _ManualHandle, Callable[[], None]]] = []

    def now(self) -> float:
        return self._now

    def call_at(self, at: float, fn: Callable[[], None]) -> TimerHandle:
        handle = _ManualHandle()
        heapq.heappush(self._due, (max(at, self._now), next(self._seq), handle, fn))
        return handle

    @property
    def pending(self) -> int:
        """Callbacks scheduled and not cancelled."""
        return sum(1 for _, _, h, _ in self._due if not h.cancelled)

    def advance(self, seconds: float) -> int:
        """Move time forward by ``seconds``, running what falls due (also what those schedule); returns how many ran."""
        assert seconds >= 0.0, seconds
        until = self._now + seconds
        ran = 0
        while self._due and self._due[0][0] <= until:
            at, _, handle, fn = heapq.heappop(self._due)
            if handle.cancelled:
                continue
            self._now = at
            handle.cancelled = True  # ran: cancelling it now is a no-op
            fn()
            ran += 1
        self._now = until
        return ran
