"""Run budgets: no simulated run may hang, whatever the code under test does.

Theory of operation
-------------------
A bug in the core can make a run spin instead of fail: two nodes trading
stale votes forever, a retry timer re-armed at its own deadline. Simulated
time still moves (messages take their latency), so nothing ever stops the
run; it eats memory until the machine does. Every run therefore gets a
``Budget`` and a ``BudgetGuard`` that enforces it:

- **Events** (tight): at most ``steps_max`` core steps in a run, and at most
  ``steps_per_sim_s_max`` steps per simulated second over any stretch of
  ``window_steps`` steps. A healthy cluster makes a few hundred steps per
  simulated second (tens of thousands in an abandonment storm's worst second,
  averaged over the window far fewer); a message storm makes millions. The
  window makes the verdict independent of the machine: the same seed exceeds
  the same budget at the same step, every time.
- **Time** (generous): at most ``wall_s_max`` seconds of wall time and
  ``cpu_s_max`` seconds of this process's CPU time. These only catch what
  the event budget cannot see (a loop that makes no core steps at all), so
  they are set far above the slowest healthy run on a slow, loaded machine
  (CPU time does not grow when other processes share the cores). The CPU
  budget is enforced by a ``SIGVTALRM`` interval timer when the run is on
  the main thread, so even a loop that never returns to the simulator is
  interrupted.

Exceeding a budget raises ``BudgetExceeded``, a ``BaseException`` (like
``KeyboardInterrupt``), so no ``except Exception`` in the code under test or
in simpy's processes can swallow it. The harness reports it as a liveness
failure (exit code 4) with the replay line and the last simulated seconds of
the trace (``trace_tail``).

Invariants kept: the event budget reads only step counts and simulated time
(deterministic); the time budgets read clocks only to stop a run, never to
change what it does.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sim.world import World

__all__ = ["Budget", "BudgetExceeded", "BudgetGuard", "DEFAULT_BUDGET", "trace_tail"]


@dataclass(frozen=True)
class Budget:
    """What one simulated run may spend (see the module docstring for why each)."""

    steps_max: int = 5_000_000  # core steps in one run
    steps_per_sim_s_max: float = 20_000.0  # steps per simulated second, over any window_steps
    window_steps: int = 200_000  # steps per rate window
    wall_s_max: float = 900.0  # wall seconds for one run
    cpu_s_max: float = 300.0  # CPU seconds of this process for one run
    check_every_steps: int = 2_048  # how often the guard looks (steps)

    def __post_init__(self) -> None:
        assert self.steps_max > 0 and self.steps_per_sim_s_max > 0, self
        assert self.window_steps >= self.check_every_steps > 0, self
        assert self.wall_s_max > 0 and self.cpu_s_max > 0, self

    def with_(self, **changes: Any) -> Budget:
        return replace(self, **changes)

    def describe(self) -> str:
        return (
            f"{self.steps_max:,} steps, {self.steps_per_sim_s_max:,.0f} steps per simulated second over "
            f"{self.window_steps:,} steps, {self.wall_s_max:g} s wall, {self.cpu_s_max:g} s CPU"
        )


DEFAULT_BUDGET = Budget()


class BudgetExceeded(BaseException):
    """A run spent more than its budget: a liveness failure, never a hang.

    A ``BaseException`` so that no ``except Exception`` between the guard and
    the harness can swallow it. ``kind`` is "steps", "rate", "wall" or "cpu".
    """

    def __init__(self, kind: str, message: str) -> None:
        # simpy re-raises what escapes a process as ``type(exc)(*exc.args)``.
        super().__init__(kind, message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"budget exceeded ({self.kind}): {self.message}"


class BudgetGuard:
    """Enforces a ``Budget`` on one ``World`` (install with ``guarding``)."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.started_wall = time.perf_counter()
        self.started_cpu = time.process_time()
        # (steps, simulated time) at each check, for the rate window.
        self._marks: deque[tuple[int, float]] = deque()
        self.peak_rate = 0.0  # the highest windowed rate seen (steps per simulated second)
        self.tripped: BudgetExceeded | None = None

    def check(self, world: World) -> None:
        """Called by the world every ``check_every_steps`` steps; raises ``BudgetExceeded``."""
        if self.tripped is not None:
            raise self.tripped
        b = self.budget
        steps, now = world.steps, world.env.now
        if steps > b.steps_max:
            self._trip("steps", f"{steps:,} core steps by t={now:.3f} (budget {b.steps_max:,})")
        marks = self._marks
        marks.append((steps, now))
        while len(marks) > 1 and steps - marks[1][0] >= b.window_steps:
            marks.popleft()
        first_steps, first_t = marks[0]
        span = steps - first_steps
        if span >= b.window_steps:
            elapsed = now - first_t
            rate = span / elapsed if elapsed > 0 else float("inf")
            if rate > self.peak_rate:
                self.peak_rate = rate
            if rate > b.steps_per_sim_s_max:
                self._trip(
                    "rate",
                    f"{span:,} core steps in {elapsed:.6f} simulated s (t={first_t:.3f}..{now:.3f}): "
                    f"{rate:,.0f} per simulated second, budget {b.steps_per_sim_s_max:,.0f}",
                )
        wall = time.perf_counter() - self.started_wall
        if wall > b.wall_s_max:
            self._trip("wall", f"{wall:.1f} s of wall time by t={now:.3f} ({steps:,} steps; budget {b.wall_s_max:g} s)")
        cpu = time.process_time() - self.started_cpu
        if cpu > b.cpu_s_max:
            self._trip("cpu", f"{cpu:.1f} s of CPU time by t={now:.3f} ({steps:,} steps; budget {b.cpu_s_max:g} s)")

    def _trip(self, kind: str, message: str) -> None:
        self.tripped = BudgetExceeded(kind, message)
        raise self.tripped

    def _on_alarm(self, signum: int, frame: Any) -> None:
        cpu = time.process_time() - self.started_cpu
        self._trip("cpu", f"{cpu:.1f} s of CPU time without returning to the simulator (budget {self.budget.cpu_s_max:g} s)")


@contextmanager
def guarding(world: World, budget: Budget) -> Iterator[BudgetGuard]:
    """Install a guard on ``world`` for the duration of the block (and a CPU alarm on the main thread)."""
    guard = BudgetGuard(budget)
    world.watch(guard.check, budget.check_every_steps)
    on_main = threading.current_thread() is threading.main_thread() and hasattr(signal, "ITIMER_VIRTUAL")
    previous: Any = None
    if on_main:
        previous = signal.signal(signal.SIGVTALRM, guard._on_alarm)
        # A little past the budget: the step checks normally trip first, with a better message.
        signal.setitimer(signal.ITIMER_VIRTUAL, budget.cpu_s_max * 1.05 + 1.0)
    try:
        yield guard
    finally:
        if on_main:
            signal.setitimer(signal.ITIMER_VIRTUAL, 0.0)
            signal.signal(signal.SIGVTALRM, previous if previous is not None else signal.SIG_DFL)
        world.watch(None, 0)


def trace_tail(world: World, *, sim_s: float = 2.0, records_max: int = 25) -> str:
    """The last ``sim_s`` simulated seconds of the trace, condensed: counts by host and kind, then the last records."""
    tracer = world.tracer
    records = tracer.records if tracer is not None else []
    if not records:
        return "(no trace: tracing was off)"
    end = records[-1][0]
    recent: list[tuple[float, str, str, Any]] = []
    for rec in reversed(records):
        if rec[0] < end - sim_s:
            break
        recent.append(rec)
    recent.reverse()
    counts = Counter((host, _kind(rec)) for rec in recent for host in (rec[1],))
    lines = [f"last {sim_s:g} simulated s of the trace (t={end - sim_s:.3f}..{end:.3f}): {len(recent):,} records"]
    for (host, kind), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:12]:
        lines.append(f"  {n:>9,}  {host} {kind}")
    lines.append(f"the last {min(records_max, len(recent))}:")
    for t, host, kind, payload in recent[-records_max:]:
        lines.append(f"  t={t:.6f} {host} {_kind((t, host, kind, payload))}")
    return "\n".join(lines)


def _kind(rec: tuple[float, str, str, Any]) -> str:
    """A record's kind, with the message type for ``Received`` and the key for ``TimerFired``."""
    _, _, kind, payload = rec
    if kind == "Received":
        return f"Received {type(payload.message).__name__} from {payload.sender}"
    if kind == "TimerFired":
        return "TimerFired " + ".".join(payload.key.split(".")[:2])
    if isinstance(payload, str):
        return f"{kind}: {payload[:60]}"
    return kind
