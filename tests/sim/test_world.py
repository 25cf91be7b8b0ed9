"""The simpy driver: seeds, membership, crashes, pauses, disks, clocks and runners.

Each test builds a small ``sim.world.World`` of real core nodes and checks one
behaviour of the driver that the chaos scenarios rely on.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from chaos.checkers import SafetyChecker
from chaos.stage import Stage
from chaos.harness import convergence
from sim.options import SimOptions, apply_overrides, draw_options, render
from sim.rng import derive
from skulk.core.runner_policy import WEDGE_EXIT_CODE
from sim.world import World
from skulk.core.inputs import RunnerExited
from skulk.core.instances import RunnerFailed, RunnerLoading, RunnerReady


def _options(**kw: Any) -> SimOptions:
    base = dict(
        seed=7,
        scenario="test",
        node_count=3,
        ram_total_gib=(64, 64, 64),
        loss_probability=0.0,
        duplicate_probability=0.0,
        reorder_probability=0.0,
        latency_tail_probability=0.0,
        lease_s=2.0,
        crash_detect_s=0.05,
        discovery_s=0.05,
    )
    base.update(kw)
    return SimOptions(**base).validate()


def _world(**kw: Any) -> tuple[World, SafetyChecker]:
    checker = SafetyChecker(clock=lambda: 0.0)
    world = World(_options(**kw), observers=[checker])
    checker.clock = lambda: world.env.now
    world.boot_all()
    return world, checker


def test_a_seed_expands_to_the_same_options_every_time() -> None:
    a = draw_options(11, "x", derive(11, "options"))
    b = draw_options(11, "x", derive(11, "options"))
    c = draw_options(12, "x", derive(12, "options"))
    assert a == b and a != c
    text = render(a)
    assert "lease_s = " in text and "[s]" in text and "core.campaign_timeout_s = 3" in text
    changed = apply_overrides(a, {"lease_s": "4.5", "core.campaign_timeout_s": "2", "fault_kinds": "pause,clog"})
    assert changed.lease_s == 4.5 and changed.core.campaign_timeout_s == 2.0 and changed.fault_kinds == ("pause", "clog")


def test_the_same_seed_gives_the_same_trace_and_another_seed_another() -> None:
    def digest(seed: int) -> str:
        world = World(_options(seed=seed))
        world.boot_all()
        world.env.run(until=60.0)
        assert world.tracer is not None
        return world.tracer.digest()

    assert digest(3) == digest(3)
    assert digest(3) != digest(4)


def test_an_idle_cluster_elects_one_master_and_converges() -> None:
    world, checker = _world()
    world.env.run(until=20.0)
    assert len(world.masters()) == 1
    # Telemetry keeps the log moving; within a few polls every node is at the master's index.
    for _ in range(40):
        if convergence(world) is None:
            break
        world.env.run(until=world.env.now + 0.25)
    assert convergence(world) is None
    assert checker.events_indexed > 0 and checker.state_digests > 0


def test_a_partition_is_felt_only_after_the_lease() -> None:
    world, _ = _world(lease_s=2.0)
    world.env.run(until=10.0)
    n1, n2 = world.host_ids[0], world.host_ids[1]
    fault = world.faults.partition([[n1], [n2, world.host_ids[2]]])
    world.env.run(until=11.5)
    assert n1 in world.network.view[n2], "still within the lease: nothing noticed yet"
    world.env.run(until=12.2)
    assert n1 not in world.network.view[n2], "past the lease the peer is gone"
    fault.heal()
    world.env.run(until=12.4)
    assert n1 in world.network.view[n2], "healed: rediscovered after discovery_s"


def test_a_crash_is_noticed_fast_and_a_restart_is_the_same_node() -> None:
    world, _ = _world(crash_detect_s=0.05)
    world.env.run(until=10.0)
    host = world.hosts[world.host_ids[2]]
    clock = host.node.election.clock  # type: ignore[union-attr]
    fault = world.faults.crash_restart(host)
    world.env.run(until=10.1)
    assert host.id not in world.network.view[world.host_ids[0]]
    fault.heal()
    assert host.node is not None and host.node.node_id == host.id
    assert host.node.election.clock >= clock, "the restarted node kept its persisted clock"
    world.env.run(until=20.0)
    assert len(world.masters()) == 1


def test_a_paused_host_queues_inputs_and_catches_up_on_resume() -> None:
    world, _ = _world()
    world.env.run(until=10.0)
    host = world.hosts[world.host_ids[0]]
    fault = world.faults.pause(host)
    world.env.run(until=14.0)
    assert host.backlog, "messages and observations queued while frozen"
    steps = world.steps
    fault.heal()
    assert not host.backlog and world.steps > steps
    world.env.run(until=30.0)
    assert len(world.masters()) == 1


def test_a_full_disk_turns_persistence_into_persist_failed() -> None:
    world, _ = _world()
    world.env.run(until=5.0)
    host = world.hosts[world.host_ids[0]]
    record = host.record
    world.faults.disk_full(host)
    world.faults.isolate(host)  # forces campaigns, which persist the election clock
    world.env.run(until=15.0)
    assert host.persist_failures > 0 and host.record == record, "nothing was written"
    assert any(level == "critical" and "cannot persist" in msg for _, h, level, msg in world.logs if h == host.id)


def test_a_clock_step_forward_makes_pending_timers_fire_earlier() -> None:
    world, _ = _world()
    world.env.run(until=5.0)
    host = world.hosts[world.host_ids[0]]
    key, (at, _) = min(host.timers.items(), key=lambda kv: kv[1][0])
    before_s = (at - host.now()) / host.clock_rate
    world.faults.clock_step(host, 1.0)
    after_s = (at - host.now()) / host.clock_rate
    assert abs((before_s - after_s) - 1.0 / host.clock_rate) < 1e-6
    world.env.run(until=world.env.now + max(0.0, after_s) + 1e-3)
    assert host.timers.get(key, (None, None))[0] != at, f"timer {key} fired at the host's clock"


def test_runners_load_serve_and_a_wedged_one_exits_with_86() -> None:
    world, checker = _world()
    seen: list[tuple[str, object]] = []

    class Watch:
        def after_step(self, host: str, node: Any, inp: Any, effects: Any) -> None:
            if type(inp).__name__ in ("RunnerStatusObserved", "RunnerExited"):
                seen.append((host, inp))

    world.observers.append(Watch())
    stage = Stage(world, checker, derive(1, "test"))

    def script() -> Generator[Any, Any, None]:
        yield world.env.timeout(10.0)
        yield from stage.place_and_wait("sim/qwen-7b")

    world.env.run(until=world.process(script()))
    statuses = [type(inp.status) for _, inp in seen if hasattr(inp, "status")]
    assert RunnerLoading in statuses and RunnerReady in statuses
    assert statuses.index(RunnerLoading) < statuses.index(RunnerReady)
    host = next(world.hosts[h] for h in world.host_ids if world.hosts[h].runners)
    world.faults.runner_wedge(host)
    world.env.run(until=world.env.now + world.opts.runner_wedge_exit_s + 1.0)
    exits = [inp.exit_code for h, inp in seen if isinstance(inp, RunnerExited) and h == host.id]
    assert exits == [WEDGE_EXIT_CODE]
    state = host.node.replica.current  # type: ignore[union-attr]
    assert state is not None
    world.env.run(until=world.env.now + 5.0)
    failed = [s for s in host.node.replica.current.runners.values() if isinstance(s, RunnerFailed)]  # type: ignore[union-attr]
    assert failed and all(f.permanent for f in failed), "a wedge is never retried"
