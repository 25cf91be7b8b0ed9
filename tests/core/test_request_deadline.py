"""Regression: a request whose timer fires exactly at its deadline fails instead of spinning.

Found by the simulator (``python -m chaos run partition_heal --seed 96``):
the request tracker armed its last retry timer at ``submitted_at +
deadline`` but judged the deadline with ``now - submitted_at >= deadline``.
In floating point the two disagree by an ulp (30.54538900294016 + 15 ==
45.545389002940155, yet 45.545389002940155 - 30.54538900294016 <
15), so the timer fired, the request was "not yet" past its deadline, the
time left rounded to zero and the timer was armed again at ``now``, forever
(50,000 steps without simulated time moving). Both now use the same
expression.
"""

from __future__ import annotations

from skulk.core.commands import PlaceInstance
from skulk.core.config import CoreConfig
from skulk.core.effects import CommandCompleted, SetTimer
from skulk.core.ids import CommandId, ModelId, NodeId
from skulk.core.requests import REQUEST_TIMER_PREFIX, Requests

SUBMITTED = 30.54538900294016  # + 15 s rounds to a time whose distance back is < 15 s


def test_the_last_retry_timer_ends_the_request_at_its_deadline() -> None:
    config = CoreConfig(command_deadline_s=15.0, command_retry_s=1.0)
    assert (SUBMITTED + 15.0) - SUBMITTED < 15.0, "the float trap this test is about"
    r = Requests(NodeId("n1"), config)
    cid = CommandId("place-1")
    effects = r.submit(SUBMITTED, PlaceInstance(command_id=cid, model_id=ModelId("m")), None)  # no master yet
    key = REQUEST_TIMER_PREFIX + cid
    at = next(e.at for e in effects if isinstance(e, SetTimer) and e.key == key)
    for _ in range(40):  # fire each retry timer exactly when it is due, as a driver does
        effects = r.on_timer(at, key, None)
        timers = [e for e in effects if isinstance(e, SetTimer) and e.key == key]
        if not timers:
            break
        assert timers[0].at > at, f"a retry timer re-armed at its own firing time {at!r}: it would spin"
        at = timers[0].at
    done = [e for e in effects if isinstance(e, CommandCompleted)]
    assert done and done[0].result.code == "unavailable", "the request gives up at its deadline"
    assert not r.is_open(cid)
    assert at == SUBMITTED + 15.0
