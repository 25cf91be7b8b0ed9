"""Clocks of the asyncio driver: the wall clock held monotone, and the hand-advanced one tests use."""

from __future__ import annotations

import asyncio

from skulk.runtime.clock import ManualClock, WallClock


def test_the_wall_clock_never_goes_back_when_the_system_clock_steps_back() -> None:
    async def main() -> None:
        system = [1_000.0]
        clock = WallClock(asyncio.get_running_loop(), source=lambda: system[0])
        assert clock.now() == 1_000.0
        system[0] = 900.0  # the system clock stepped back by 100 s
        assert clock.now() == 1_000.0, "held still until the system clock catches up"
        system[0] = 1_000.5
        assert clock.now() == 1_000.5
        fired = asyncio.Event()
        clock.call_at(system[0] - 5.0, fired.set)  # already due: runs on the next loop pass
        await asyncio.wait_for(fired.wait(), timeout=5)

    asyncio.run(main())


def test_the_manual_clock_runs_due_callbacks_in_time_order_and_skips_cancelled_ones() -> None:
    clock = ManualClock(start=10.0)
    seen: list[tuple[str, float]] = []
    clock.call_at(12.0, lambda: seen.append(("b", clock.now())))
    clock.call_at(11.0, lambda: seen.append(("a", clock.now())))
    clock.call_at(11.0, lambda: clock.call_at(11.5, lambda: seen.append(("a2", clock.now()))))
    clock.call_at(11.2, lambda: seen.append(("x", clock.now()))).cancel()
    assert clock.advance(1.0) == 2 and seen == [("a", 11.0)] and clock.now() == 11.0
    assert clock.advance(5.0) == 2 and seen == [("a", 11.0), ("a2", 11.5), ("b", 12.0)]
    assert clock.now() == 16.0 and clock.pending == 0
    clock.call_at(3.0, lambda: seen.append(("late", clock.now())))  # in the past: due at once
    clock.advance(0.0)
    assert seen[-1] == ("late", 16.0)
