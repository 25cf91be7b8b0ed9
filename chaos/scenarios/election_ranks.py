"""election_ranks: elections among candidates of skewed rank pick the documented winner, once.

The candidate order is ``(election clock, seniority, commands seen, node
id)``, highest wins, and a sitting master that wins again keeps its session
(DESIGN.md section 2). Most scenarios elect among equal candidates, where
the node id alone decides and a wrong order goes unnoticed. This one skews
the ranks on purpose and checks each election against that order, computed
here from each node's figures:

1. A model is placed and clients stream (every command is broadcast: every
   node counts it). The follower with the highest id among those that will
   survive is crash-restarted mid-stream: it comes back having seen fewer
   commands than the others, so the highest id is *not* the best candidate.
2. A flap that restores the same peer set within the settle delay (a
   follower cut off just past the lease, back a moment later) starts no
   campaign: every election clock is unchanged.
3. Clients stop (the counts freeze) and the master is crashed. Every
   survivor adopts exactly one new session, and its master is the survivor
   with the most commands seen (then the highest id).
4. The old master (the highest id of all, with no commands seen since its
   restart) comes back: the sitting master keeps its session.

The network is lossless here (no lost vote may excuse a split decision);
reordering and latency still vary by seed.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from chaos.scenarios import Stage, scenario
from chaos.scenarios._support import expect
from chaos.stage import ScenarioStuck
from sim.options import SimOptions


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    n = rng.choice((3, 4, 5, 6))
    return opts.with_(
        node_count=n,
        ram_total_gib=tuple(opts.ram_total_gib[i % len(opts.ram_total_gib)] for i in range(n)),
        model_id="sim/qwen-1.5b",
        fault_kinds=(),
        loss_probability=0.0,
        duplicate_probability=0.0,
        latency_tail_probability=0.0,
        client_count=max(2, min(opts.client_count, 4)),
        client_abandon_probability=0.0,
        # A rejoin is seen well within the settle delay of a leave (step 2).
        discovery_s=min(opts.discovery_s, 0.08),
    )


def _sessions(stage: Stage) -> dict[str, Any]:
    return {h.id: h.node.session for h in stage.world.running_hosts() if h.node is not None}


def _settled(stage: Stage) -> bool:
    sessions = set(_sessions(stage).values())
    return len(sessions) == 1 and None not in sessions and not any(
        h.node is not None and h.node.election.campaigning for h in stage.world.running_hosts()
    )


@scenario(
    "election_ranks",
    "skewed candidates: each election picks the documented winner once, a sitting master keeps its session, "
    "a flap that restores the peer set starts no campaign",
    adjust=_adjust,
)
def election_ranks(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    opts = stage.opts
    rng = stage.rng
    master = stage.master_host()
    if master is None:
        raise ScenarioStuck("no single master after boot")
    yield from stage.place_and_wait(excluded=(master.id,) if len(world.host_ids) > 2 else ())
    until = world.env.now + 10_000.0
    stage.start_clients(until)
    yield stage.sleep(rng.uniform(3.0, 6.0))

    # 1. Skew: the highest-id survivor restarts and misses the commands sent meanwhile.
    master = stage.master_host()
    expect(master is not None, "one master while clients stream")
    assert master is not None
    survivors = sorted(h for h in world.host_ids if h != master.id)
    lagging = world.hosts[survivors[-1]]
    world.faults.heal_after(world.faults.crash_restart(lagging), rng.uniform(1.0, 3.0))
    ok = yield from stage.wait_until(lambda: lagging.running and _settled(stage), timeout_s=30.0)
    expect(ok, f"{lagging.id} back and the cluster settled after its restart")
    yield stage.sleep(rng.uniform(3.0, 6.0))  # more commands, seen by everyone: the lag stays

    # 2. A flap past the lease that is back within the settle delay: no campaign anywhere.
    yield stage.sleep(opts.lease_s + opts.discovery_s + opts.core.settle_delay_s + opts.core.campaign_timeout_s)
    clocks = {h.id: h.node.election.clock for h in world.running_hosts() if h.node is not None}
    flapper = world.hosts[rng.choice(survivors)]
    fault = world.faults.isolate(flapper)
    # The others see it leave after the lease; healed right after, it is back after discovery_s,
    # well before the settle timer fires: the peer set is the same as at the last campaign.
    yield stage.sleep(opts.lease_s + rng.uniform(0.01, 0.05))
    fault.heal()
    yield stage.sleep(opts.discovery_s + opts.core.settle_delay_s + opts.core.campaign_timeout_s)
    after = {h.id: h.node.election.clock for h in world.running_hosts() if h.node is not None}
    expect(after == clocks, f"a flap of {flapper.id} that restored every peer set started no campaign: "
                            f"election clocks {clocks} -> {after}")

    # 3. Counts frozen, the master crashes: one new session, the documented winner.
    world.clients.stopping = True
    ok = yield from stage.wait_until(lambda: not world.clients.open_requests(), timeout_s=60.0)
    expect(ok, "the clients' requests ended before the master is crashed")
    yield stage.sleep(1.0)
    master = stage.master_host()
    expect(master is not None and master.node is not None, "one master before the crash")
    assert master is not None and master.node is not None
    old_session = master.node.session
    ranks = {h.id: (h.node.election.commands_seen, h.id) for h in world.running_hosts()
             if h.node is not None and h.id != master.id}
    want = max(ranks, key=lambda h: ranks[h])
    stage.metrics["ranks"] = ",".join(f"{h}={ranks[h][0]}" for h in sorted(ranks))
    stage.metrics["expected_winner"] = want
    crashed_at = world.env.now
    crash = world.faults.crash_restart(master)
    ok = yield from stage.wait_until(lambda: _settled(stage) and set(_sessions(stage).values()) != {old_session},
                                     timeout_s=opts.settle_deadline_s)
    expect(ok, f"the survivors {sorted(ranks)} agree on a new master after {master.id} crashed")
    stage.metrics["new_master_within_s"] = round(world.env.now - crashed_at, 3)
    new_session = next(iter(_sessions(stage).values()))
    adopted = sorted({s for (t, h, s, _) in world.session_log if t >= crashed_at and h in ranks and s})
    expect(adopted == [str(new_session)], f"every survivor adopted one new session after the crash, got {adopted}")
    expect(new_session.master == want, f"the survivor with the most commands seen, then the highest id, to win: "
                                       f"{want} of {ranks}, got {new_session.master}")

    # 4. The old master comes back: the sitting master keeps its session.
    crash.heal()
    ok = yield from stage.wait_until(lambda: master.running and _settled(stage), timeout_s=opts.settle_deadline_s)
    expect(ok, f"{master.id} back and the cluster settled")
    yield stage.sleep(opts.core.settle_delay_s + opts.core.campaign_timeout_s + 1.0)
    sessions = set(_sessions(stage).values())
    expect(sessions == {new_session}, f"the sitting master {new_session.master} kept its session {new_session} when "
                                      f"{master.id} rejoined, got {sessions}")
