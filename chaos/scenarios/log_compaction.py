"""log_compaction: the master's log is compacted often; restarted followers bootstrap from a snapshot.

The master keeps a snapshot every ``snapshot_every`` indexed events and only
``retain_before_snapshot`` events before it (DESIGN.md: bootstrap from a
snapshot plus the retained tail). With the defaults (10,000 and 10,000) no
other scenario indexes enough events to compact even once. Here both are
small (a few dozen), so while clients stream the log is compacted every few
seconds, and followers that restart (and bootstrap from index 0) or that
NACK an old gap are served from the snapshot and the tail, with its offset:

1. A model is placed and clients stream.
2. Followers crash-restart one after another, each after the log moved on
   by more than it retains: each comes back, bootstraps from a snapshot,
   and converges (checked after every step: its state must equal the
   master's at its index, invariants 2 and 3).
3. At least one bootstrap from a snapshot happened.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import msgspec

from skulk.core.inputs import Received
from skulk.core.messages import SyncResponse

from chaos.scenarios import Stage, scenario
from chaos.scenarios._support import expect
from sim.options import SimOptions


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    n = rng.choice((3, 4, 5))
    return opts.with_(
        node_count=n,
        ram_total_gib=tuple(opts.ram_total_gib[i % len(opts.ram_total_gib)] for i in range(n)),
        model_id="sim/qwen-1.5b",
        fault_kinds=(),
        client_count=rng.choice((3, 4, 6)),
        client_think_s_mean=rng.uniform(0.1, 0.5),
        chaos_s=rng.uniform(40.0, 80.0),
        core=msgspec.structs.replace(
            opts.core, snapshot_every=rng.randint(16, 96), retain_before_snapshot=rng.randint(4, 48)
        ),
    )


class _Snapshots:
    """Observer: bootstraps served from a snapshot (a ``SyncResponse`` carrying one)."""

    def __init__(self) -> None:
        self.installed = 0

    def after_step(self, host: str, node: Any, inp: Any, effects: list[Any]) -> None:
        if type(inp) is Received and type(inp.message) is SyncResponse and inp.message.snapshot is not None:
            self.installed += 1


@scenario(
    "log_compaction",
    "a master log compacted every few dozen events: restarted followers bootstrap from a snapshot plus the tail",
    adjust=_adjust,
)
def log_compaction(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    opts = stage.opts
    watch = _Snapshots()
    world.observers.append(watch)
    yield from stage.place_and_wait()
    until = world.env.now + opts.chaos_s
    stage.start_clients(until)
    every = opts.core.snapshot_every + opts.core.retain_before_snapshot
    restarts = 0
    while world.env.now < until - 10.0:
        master = stage.master_host()
        if master is None or master.node is None or master.node.master is None:
            yield stage.sleep(1.0)
            continue
        # Let the log move on by more than it retains, then restart a follower.
        mark = master.node.master.next_index
        moved = yield from stage.wait_until(
            lambda: master.node is not None and master.node.master is not None
            and master.node.master.next_index >= mark + every,
            timeout_s=until - world.env.now,
        )
        if not moved or world.env.now >= until - 10.0:
            break
        followers = [h for h in world.running_hosts() if h.id != master.id]
        if not followers:
            break
        host = stage.rng.choice(followers)
        world.faults.heal_after(world.faults.crash_restart(host), stage.rng.uniform(0.5, 3.0))
        restarts += 1
        yield stage.sleep(stage.rng.uniform(3.0, 8.0))
    yield stage.sleep(max(0.0, until - world.env.now))
    stage.metrics["restarts"] = restarts
    stage.metrics["snapshot_bootstraps"] = watch.installed
    expect(restarts == 0 or watch.installed > 0, f"a bootstrap from a snapshot after {restarts} restart(s)")
