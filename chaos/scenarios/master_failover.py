"""master_failover: lose the master while requests stream; measure the failover.

A model is placed away from the master (so its instance survives), clients
stream chat requests, and then the master is lost: crashed for good, crashed
and restarted, paused, or cut off by a partition (``master_loss_mode``;
"mixed" picks one per seed). Requests in flight on the old master must end
with an error (invariant 8), the instance must survive (invariant 5) and
requests must be served again under the new master.

Metric ``failover_s``: from the master's loss to the first request served
under a session other than the lost master's (the figure ``chaos bench``
reports as p50/p99).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from chaos.stage import ScenarioStuck
from chaos.scenarios import Stage, scenario
from sim.options import SimOptions

MODES = ("crash", "crash_restart", "pause", "isolate")


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    return opts.with_(
        model_id="sim/qwen-7b",
        chaos_s=rng.uniform(30.0, 60.0),
        client_count=max(3, opts.client_count),
        client_abandon_probability=min(0.1, opts.client_abandon_probability),
        fault_kinds=(),
    )


class _FirstServed:
    """Observer: the first request served in a session other than ``old``, after ``since``."""

    def __init__(self, old: Any, since: float) -> None:
        self.old = old
        self.since = since
        self.at: float | None = None

    def request_ended(self, req: Any) -> None:
        if self.at is not None or not req.served or req.ended_at < self.since:
            return
        if req.accepted_session is not None and req.accepted_session != self.old:
            self.at = req.ended_at

    def after_step(self, *args: Any) -> None:  # the world calls every observer on every step
        return


@scenario("master_failover", "kill the master while requests stream; requests end, placements survive, service resumes", adjust=_adjust)
def master_failover(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    master = stage.master_host()
    if master is None:
        raise ScenarioStuck("no single master after boot")
    excluded = (master.id,) if len(world.host_ids) > 1 else ()
    yield from stage.place_and_wait(excluded=excluded)
    until = world.env.now + stage.opts.chaos_s
    stage.start_clients(until)
    yield stage.sleep(stage.rng.uniform(3.0, 8.0))
    master = stage.master_host()
    if master is None or master.node is None or master.node.master is None:
        raise ScenarioStuck("no single master while requests stream")
    mode = stage.opts.master_loss_mode
    if mode == "mixed":
        mode = stage.rng.choice(MODES)
    old = master.node.master.session
    watch = _FirstServed(old, world.env.now)
    world.observers.append(watch)
    lost_at = world.env.now
    # Long enough that the others notice (a pause or a cut shorter than the
    # membership lease is invisible, and rightly changes nothing).
    down_s = stage.opts.lease_s + stage.rng.uniform(2.0, 15.0)
    if mode == "crash":
        world.faults.crash_stop(master)
    elif mode == "crash_restart":
        world.faults.heal_after(world.faults.crash_restart(master), down_s)
    elif mode == "pause":
        world.faults.heal_after(world.faults.pause(master), down_s)
    else:
        world.faults.heal_after(world.faults.isolate(master), down_s)
    stage.metrics["master_loss_mode"] = mode
    ok = yield from stage.wait_until(lambda: watch.at is not None, timeout_s=max(60.0, until - world.env.now))
    if not ok:
        raise ScenarioStuck(f"no request was served under a new master within 60 s of losing {master.id} ({mode})")
    assert watch.at is not None
    stage.metrics["failover_s"] = round(watch.at - lost_at, 6)
    world.observers.remove(watch)
    yield stage.sleep(until - world.env.now)
