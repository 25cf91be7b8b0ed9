"""zombie_master: a deposed master that has not heard of it answers first; its answer must not count.

A master frozen long enough for the others to elect a new one wakes up
still believing it leads: until its next campaign concludes (a slow one, 3 s
by default) it answers the commands it receives, in its dead session. The
origin must ignore an answer from any session but the one it sent the
command in (``Requests.on_result``), or a request accepted by the dead
master waits for a task no live master runs (the bug ``swarm --seed 13``
once found, after long sweeps: it needs the zombie's answer to arrive
first). This scenario makes that race the rule:

1. A model is placed on a follower F; a client streams through another
   follower X.
2. The master M freezes; while frozen, everything the others send it is
   lost, but what X sends it waits for it (X reaches M over a fast link).
   The others elect a new master M'.
3. M thaws: X's messages tell it there is a newer clock, so it starts a
   slow campaign, and meanwhile answers X's commands as the master of its
   dead session.
4. For a moment (well under the lease, so nobody's membership moves) what
   X sends M' is lost: X's commands reach only the zombie, which answers
   them. X must ignore those answers and keep retrying until M' answers;
   every request is served. (Had X taken the zombie's answer, it would stop
   retrying, and wait for a task no live master ever created.)

Metric ``zombie_answers``: answers from the dead session that reached X
after it had moved on (the race this scenario exists for; at least one).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from skulk.core.inputs import Received
from skulk.core.messages import CommandResultMessage

from chaos.scenarios import Stage, scenario
from chaos.scenarios._support import expect, place_on
from chaos.stage import ScenarioStuck
from skulk.core.commands import SubmitTask
from skulk.core.ids import CommandId, ModelId
from skulk.core.tasks import ChatMessage, GenerationParams

from sim.options import SimOptions

MODEL = "sim/qwen-1.5b"


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    n = rng.choice((4, 5))
    return opts.with_(
        node_count=n,
        ram_total_gib=tuple(opts.ram_total_gib[i % len(opts.ram_total_gib)] for i in range(n)),
        model_id=MODEL,
        fault_kinds=(),
            wifi_node_fraction=0.0,
        loss_probability=0.0,
        latency_tail_probability=0.0,
        client_count=0,
    )


class _ZombieAnswers:
    """Observer: command answers from ``old`` reaching ``host`` once it follows another session."""

    def __init__(self, host: str, old: Any) -> None:
        self.host = host
        self.old = old
        self.count = 0

    def after_step(self, host: str, node: Any, inp: Any, effects: list[Any]) -> None:
        if host != self.host or type(inp) is not Received or type(inp.message) is not CommandResultMessage:
            return
        if inp.message.session == self.old and node.session != self.old:
            self.count += 1


def _client(stage: Stage, host: Any) -> Generator[Any, Any, None]:
    """One client on ``host``: short streamed requests, one after another, until the clients stop."""
    world = stage.world
    rng = world.rngs("zombie-client")
    n = 0
    while not world.clients.stopping:
        yield world.env.timeout(rng.expovariate(1.0 / 0.05))
        n += 1
        params = GenerationParams(messages=(ChatMessage(role="user", content="p" * 64),), max_tokens=8, seed=0)
        req = world.clients.submit(host, SubmitTask(command_id=CommandId(f"zombie-{n}"), model_id=ModelId(MODEL),
                                                    params=params))
        yield req.done
        if not req.served:
            yield world.env.timeout(world.opts.client_retry_backoff_s)


@scenario(
    "zombie_master",
    "a deposed master that has not heard of it answers commands first, in its dead session: the origin ignores it",
    adjust=_adjust,
)
def zombie_master(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    opts = stage.opts
    rng = stage.rng
    net = world.network
    master = stage.master_host()
    if master is None or master.node is None or master.node.master is None:
        raise ScenarioStuck("no single master after boot")
    old = master.node.master.session
    # X, the client's node, is the lowest id: among equal candidates the highest id wins the
    # election, so X is never the new master (the race needs it to follow another).
    followers = sorted(h for h in world.host_ids if h != master.id)
    x = followers[0]
    f = rng.choice(followers[1:])
    yield from place_on(stage, MODEL, excluded=tuple(h for h in world.host_ids if h != f))
    ok = yield from stage.wait_until(lambda: stage.serving_instance_of(MODEL) is not None, timeout_s=opts.ready_deadline_s)
    expect(ok, f"{MODEL} serving on {f}")
    # X's client: quick requests, so some leave X just as M thaws.
    world.process(_client(stage, world.hosts[x]))
    yield stage.sleep(rng.uniform(1.0, 3.0))

    # 2. M freezes; the others' messages to it are lost from now on, X's wait for it.
    watch = _ZombieAnswers(x, old)
    world.observers.append(watch)
    frozen = world.faults.pause(master)
    others = [h for h in world.host_ids if h not in (master.id, x)]
    cuts = [world.faults.partition_oneway(o, master.id) for o in others]
    ok = yield from stage.wait_until(
        lambda: (m := stage.master_host()) is not None and m.id != master.id
        and all(world.hosts[h].node is not None and world.hosts[h].node.session == m.node.session  # type: ignore[union-attr]
                for h in world.host_ids if h != master.id),
        timeout_s=opts.settle_deadline_s)
    expect(ok, f"a new master elected while {master.id} is frozen")
    new_master = stage.master_host()
    assert new_master is not None
    yield stage.sleep(rng.uniform(0.5, 1.5))

    # 3 and 4. M thaws, and for a moment (well under the lease: nobody's membership moves)
    # what X sends the new master is lost: X's commands reach only the zombie, which answers.
    frozen.heal()
    lost = world.faults.partition_oneway(x, new_master.id)
    yield stage.sleep(0.75 * opts.lease_s)
    lost.heal()
    yield stage.sleep(opts.core.campaign_timeout_s + 1.0)
    for cut in cuts:
        cut.heal()
    stage.metrics["zombie_answers"] = watch.count
    yield stage.sleep(10.0)
    world.clients.stopping = True
