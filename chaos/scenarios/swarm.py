"""swarm: a random mix of every fault, TigerBeetle style.

Each seed enables a random subset of the fault kinds (swarm testing: rare
combinations get a chance because common ones are sometimes switched off),
then faults of those kinds arrive at random while clients stream, some of
them against a second, larger model. Abandonment storms join in when
enabled. At the end every fault heals and the cluster must converge.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from chaos.scenarios import Stage, scenario
from sim.options import FAULT_KINDS, SimOptions


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    kinds = tuple(k for k in FAULT_KINDS if rng.random() < 0.5)
    if not kinds:
        kinds = (rng.choice(FAULT_KINDS),)
    return opts.with_(
        model_id=rng.choice(("sim/qwen-1.5b", "sim/qwen-7b")),
        fault_kinds=kinds,
        chaos_s=rng.uniform(60.0, 240.0),
        fault_mean_interval_s=rng.uniform(3.0, 15.0),
        fault_duration_s_max=rng.uniform(5.0, 30.0),
        crash_stop_max=rng.choice((0, 1)),
        runner_crash_mid_task_probability=rng.choice((0.0, 0.0, 0.02)),
        storm_clients=rng.randint(10, 60),
        storm_duration_s=rng.uniform(3.0, 10.0),
        abandoned_events_max=4,
    )


@scenario("swarm", "a random mix of every fault kind while clients stream; converge after healing", adjust=_adjust)
def swarm(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    opts = stage.opts
    rng = stage.rng
    yield from stage.place_and_wait()
    until = world.env.now + opts.chaos_s
    stage.start_clients(until)
    world.process(world.faults.swarm(until, world.rngs("swarm")))
    storms = 0
    while world.env.now < until:
        yield stage.sleep(min(until - world.env.now, rng.uniform(10.0, 40.0)))
        if "abandon_storm" in opts.fault_kinds and world.env.now < until - 1.0:
            storms += 1
            stage.start_clients(
                min(until, world.env.now + opts.storm_duration_s),
                count=opts.storm_clients,
                prefix=f"storm{storms}",
                abandon_probability=1.0,
                abandon_after_s_max=2.0,
                think_s_mean=0.3,
            )
    stage.metrics["faults_enabled"] = ",".join(opts.fault_kinds)
    stage.metrics["storms"] = storms
