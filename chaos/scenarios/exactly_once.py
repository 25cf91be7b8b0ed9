"""exactly_once: retried and duplicated commands take effect once; streams arrive in order, once.

Targeted faults for the master's deduplication, which the other scenarios
rarely exercise (a lost answer, then a retry): here the network duplicates
a fifth to a half of all messages and holds many back so later ones overtake
them, and every node re-sends an unanswered command after a few
milliseconds (``core.command_retry_s``), so the master sees most commands
several times, often out of order. Then:

1. A model is placed, deleted and placed again, each command retried and
   duplicated: one instance per placement command (oracle O4), the deleted
   one gone, the new one serving.
2. Clients stream and walk away within milliseconds, so cancels race their
   submissions (and overtake them): a request cancelled before its
   submission reached the master is never created (O4), events per
   abandoned request stay bounded (invariant 6), and every stream reaches
   its API in order, each chunk once (O5), however often the network
   delivered it.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import msgspec

from skulk.core.commands import DeleteInstance
from skulk.core.ids import CommandId

from chaos.scenarios import Stage, scenario
from chaos.scenarios._support import expect, master_state
from sim.options import SimOptions

MODEL = "sim/qwen-1.5b"


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    n = rng.choice((3, 4, 5))
    return opts.with_(
        node_count=n,
        ram_total_gib=tuple(opts.ram_total_gib[i % len(opts.ram_total_gib)] for i in range(n)),
        model_id=MODEL,
        fault_kinds=(),
        duplicate_probability=rng.uniform(0.2, 0.5),
        reorder_probability=rng.uniform(0.1, 0.4),
        reorder_delay_ms_max=rng.uniform(5.0, 50.0),
        client_count=rng.choice((2, 3, 4)),
        client_abandon_probability=rng.uniform(0.3, 0.7),
        client_abandon_after_s_max=rng.uniform(0.0, 0.02),
        chaos_s=rng.uniform(15.0, 30.0),
        core=msgspec.structs.replace(opts.core, command_retry_s=rng.uniform(0.002, 0.03)),
    )


def _instances_of(stage: Stage) -> list[Any]:
    state = master_state(stage)
    return [] if state is None else [i for i in state.instances.values() if i.shard_assignments.model_id == MODEL]


@scenario(
    "exactly_once",
    "duplicated, reordered and retried commands take effect once; cancels that overtake their submit still cancel; "
    "streams arrive in order, once",
    adjust=_adjust,
)
def exactly_once(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    opts = stage.opts
    # 1. Place, delete, place again: each command many times over the wire, one effect each.
    first = yield from stage.place_and_wait(name="place-1")
    expect([i.instance_id for i in _instances_of(stage)] == [first], f"one instance of {MODEL} after placing it once")
    host = world.hosts[stage.rng.choice(list(world.host_ids))]
    req = world.clients.submit(host, DeleteInstance(command_id=CommandId("delete-1"), instance_id=first))
    yield req.done
    expect(req.outcome == "accepted", f"deleting {first} accepted, got {req.outcome} ({req.code}): {req.message}")
    gone = yield from stage.wait_until(lambda: not _instances_of(stage), timeout_s=30.0)
    expect(gone, f"{first} gone after its deletion")
    second = yield from stage.place_and_wait(name="place-2")
    expect([i.instance_id for i in _instances_of(stage)] == [second], f"one instance of {MODEL} after placing it again")

    # 2. Streams, and clients who walk away within milliseconds.
    until = world.env.now + opts.chaos_s
    stage.start_clients(until)
    yield stage.sleep(until - world.env.now)
    stage.metrics["duplicated"] = world.network.duplicated
