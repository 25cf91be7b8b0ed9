"""Timers: typed keys in the core, the same strings drivers and traces have always seen."""

from __future__ import annotations

import pytest

from skulk.core.ids import CommandId, RunnerId
from skulk.core.timers import (
    TIMER_KINDS,
    CampaignTimer,
    MasterLostTimer,
    RequestTimer,
    RunnerDeadlineTimer,
    RunnerRestartTimer,
    Timer,
    TransferRetryTimer,
    TransferStallTimer,
    cancel_timer,
    key,
    parse,
    set_timer,
)

EVERY_KIND: list[Timer] = [
    kind(CommandId("cmd.with.dots")) if kind is RequestTimer
    else kind(RunnerId("runner-1.a")) if kind in (RunnerRestartTimer, RunnerDeadlineTimer)
    else kind("org.x/model-1.5b") if kind in (TransferStallTimer, TransferRetryTimer)
    else kind()
    for kind in TIMER_KINDS
]


@pytest.mark.parametrize("timer", EVERY_KIND, ids=lambda t: type(t).__name__)
def test_every_timer_survives_its_key(timer: Timer) -> None:
    assert parse(key(timer)) == timer
    assert set_timer(timer, 2.5).key == key(timer) == cancel_timer(timer).key


def test_the_keys_are_the_strings_drivers_and_traces_have_always_seen() -> None:
    # A trace digest hashes TimerFired(key=...): these strings are part of every recorded run.
    assert key(CampaignTimer()) == "election.campaign"
    assert key(MasterLostTimer()) == "node.master_lost"
    assert key(RequestTimer(CommandId("c1"))) == "request.c1"
    assert key(RunnerRestartTimer(RunnerId("r1"))) == "worker.restart.r1"
    assert key(RunnerDeadlineTimer(RunnerId("r1"))) == "worker.deadline.r1"


def test_a_key_no_kind_owns_is_none_not_a_guess() -> None:
    for stale in ("", "election", "election.campaign.extra", "request.", "worker.restart.", "sim.runner.ready.r1"):
        assert parse(stale) is None, stale


def test_a_handler_gets_a_typed_id() -> None:
    timer = parse("worker.deadline.r-7")
    assert isinstance(timer, RunnerDeadlineTimer) and timer.runner_id == "r-7"
