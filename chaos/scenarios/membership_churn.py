"""membership_churn: nodes come and go, restart, freeze and flap; the cluster keeps one master.

While clients stream, random nodes are crash-restarted (same identity, what
they persisted), paused for a moment, or cut off for less than the membership
lease (a flap nobody should notice). A flap shorter than the lease must not
start a campaign: the election clock of every node is compared across it.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from chaos.stage import ScenarioStuck
from chaos.scenarios import Stage, scenario
from sim.options import SimOptions

ACTIONS = ("restart", "restart", "pause", "flap", "flap")


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    return opts.with_(
        model_id="sim/qwen-7b",
        chaos_s=rng.uniform(60.0, 150.0),
        fault_kinds=(),
        lease_s=max(1.0, opts.lease_s),
    )


@scenario("membership_churn", "nodes restart, pause and flap while requests stream; flaps start no campaign", adjust=_adjust)
def membership_churn(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    rng = stage.rng
    opts = stage.opts
    yield from stage.place_and_wait()
    until = world.env.now + opts.chaos_s
    stage.start_clients(until)
    counts = {"restart": 0, "pause": 0, "flap": 0}
    while world.env.now < until - 2.0:
        yield stage.sleep(rng.uniform(2.0, 8.0))
        up = world.running_hosts()
        if len(up) < 2:
            continue
        host = rng.choice(up)
        action = rng.choice(ACTIONS)
        counts[action] += 1
        if action == "restart":
            world.faults.heal_after(world.faults.crash_restart(host), rng.uniform(0.5, opts.restart_delay_s_max))
        elif action == "pause":
            world.faults.heal_after(world.faults.pause(host), rng.uniform(0.1, 3.0 * opts.lease_s))
        else:
            # Cut for well under the lease: membership must not change, so no campaign.
            if world.faults.active or any(h.node is None or h.paused for h in world.hosts.values()):
                continue  # only judge a flap on an otherwise quiet cluster
            # ... quiet for long enough that the last heal's membership change and
            # campaign are over (a resumed node reappearing does start one).
            quiet_s = opts.lease_s + opts.discovery_s + opts.core.settle_delay_s + opts.core.campaign_timeout_s + 1.0
            last_heal = max((f.ended_at or 0.0 for f in world.faults.history), default=0.0)
            if world.env.now - last_heal < quiet_s:
                yield stage.sleep(quiet_s - (world.env.now - last_heal))
                if world.faults.active or any(h.node is None or h.paused for h in world.hosts.values()):
                    continue
            clocks = {h.id: h.node.election.clock for h in world.running_hosts()}  # type: ignore[union-attr]
            fault = world.faults.isolate(host)
            yield stage.sleep(rng.uniform(0.05, 0.5) * opts.lease_s)
            fault.heal()
            yield stage.sleep(opts.lease_s + opts.core.settle_delay_s + 0.5)
            after = {h.id: h.node.election.clock for h in world.running_hosts() if h.id in clocks}  # type: ignore[union-attr]
            if after != {h: c for h, c in clocks.items() if h in after}:
                raise ScenarioStuck(f"a {host.id} flap shorter than the lease started a campaign: clocks {clocks} -> {after}")
    stage.metrics["churn"] = ",".join(f"{k}={v}" for k, v in sorted(counts.items()))
    yield stage.sleep(max(0.0, until - world.env.now))
