"""crash_loop: a runner crash loop trips the breaker exactly once; a wedged runner is never retried.

Three nodes each get their own single-node instance: node A and node C a 7B
model, node B a 1.5B model that clients stream from throughout.

1. Node A's runners crash while loading (``runner_crash_loop``: the live one
   exits with code 1, every new one crashes during its load). The worker's
   crash breaker restarts it twice (after 1 s, then 2 s: checked) and the third
   failure within 60 s trips it: exactly one "instance ... failed: crash
   loop" error, exactly one permanent failure indexed, and no runner of that
   instance is started again (checked 70 s later, past the breaker's window
   and re-arm period).
2. The instance is deleted, the loop healed, the model placed on A again and
   the loop injected again: the breaker trips exactly once for this loop
   too.
3. Node C's runner wedges: it goes silent and exits with code 86 after
   ``runner_wedge_exit_s``. It is given up at once, with one error, and never
   restarted (checked 70 s later).
4. Nobody else is disturbed: no runner starts or exits on any node but A and
   C, node B's runner never leaves ready/running, no error is logged
   elsewhere, no election happens, and every request to the 1.5B model that
   the client did not walk away from is served.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator
from typing import Any

from skulk.core.commands import DeleteInstance
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId
from skulk.core.instances import RUNNER_SERVING, RunnerFailed, RunnerReady

from chaos import oracles
from chaos.stage import ScenarioStuck
from chaos.scenarios import Stage, scenario
from chaos.scenarios._support import Ledger, expect, master_state, place_on, served_after
from sim.clients import chat_client
from sim.options import SimOptions

LOOPED = "sim/qwen-7b"
STEADY = "sim/qwen-1.5b"
# The breaker's documented numbers (chaos.oracles.BREAKER: 3 failures within 60 s, exit 86 a
# wedge), never the core's own BreakerPolicy(): a breaker whose default tripped on the first
# failure would otherwise be checked against itself, and pass.
FAILURES_TO_TRIP = int(oracles.BREAKER["failures_to_trip"])
WINDOW_S = float(oracles.BREAKER["window_s"])
WEDGE_EXIT_CODE = int(oracles.BREAKER["wedge_exit_code"])
BACKOFF_FIRST_S = float(oracles.BREAKER["backoff_first_s"])
BACKOFF_MAX_S = float(oracles.BREAKER["backoff_max_s"])
# After a trip or a wedge, watch this long for a restart that must not come.
QUIET_S = WINDOW_S + 10.0


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    n = rng.choice((3, 4, 5))
    return opts.with_(
        node_count=n,
        ram_total_gib=tuple(opts.ram_total_gib[i % len(opts.ram_total_gib)] for i in range(n)),
        model_id=STEADY,
        fault_kinds=(),
        runner_wedge_exit_s=rng.uniform(5.0, 30.0),
        client_count=max(2, min(opts.client_count, 4)),
        # A runner that crashes mid-generation fails its task: created, running, failed, deleted.
        abandoned_events_max=4,
    )


def _runner_on(stage: Stage, iid: InstanceId, host: NodeId) -> Any:
    state = master_state(stage)
    expect(state is not None and iid in state.instances, f"instance {iid} on {host} still placed")
    assert state is not None
    return state.instances[iid].shard_assignments.node_to_runner[host]


def _status(stage: Stage, runner_id: Any) -> Any:
    state = master_state(stage)
    return None if state is None else state.runners.get(runner_id)


def _given_up(stage: Stage, runner_id: Any) -> bool:
    status = _status(stage, runner_id)
    return isinstance(status, RunnerFailed) and status.permanent


def _place_serving(stage: Stage, model: str, host: NodeId, name: str) -> Generator[Any, Any, InstanceId]:
    others = tuple(h for h in stage.world.host_ids if h != host)
    iid = yield from place_on(stage, model, excluded=others, name=name)
    ok = yield from stage.wait_until(lambda: stage.instance_serving(iid), timeout_s=stage.opts.ready_deadline_s)
    if not ok:
        raise ScenarioStuck(f"{model} on {host} ({iid}) never served")
    return iid


def _crash_loop(stage: Stage, ledger: Ledger, iid: InstanceId, host: NodeId, loop: int) -> Generator[Any, Any, None]:
    """Inject a crash loop on ``host`` and check the breaker trips exactly once for it."""
    world = stage.world
    runner_id = _runner_on(stage, iid, host)
    fault = world.faults.runner_crash_loop(world.hosts[host])
    began = world.env.now
    ok = yield from stage.wait_until(lambda: _given_up(stage, runner_id), timeout_s=WINDOW_S)
    expect(ok, f"loop {loop}: the breaker to give up on {runner_id} within {WINDOW_S:g} s")
    tripped = world.env.now
    yield stage.sleep(QUIET_S)
    exits = ledger.exits_of({runner_id}, since=began)
    restarts = ledger.starts_of(iid, host=host, since=began)
    trips = [m for (t, h, m) in ledger.errors if h == host and m.startswith(f"instance {iid} failed: crash loop")]
    given_up = [f for (_, _, i, f) in ledger.failures if i == iid and f.permanent]
    n = FAILURES_TO_TRIP
    expect(len(exits) == n and all(e.exit_code != 0 for e in exits),
           f"loop {loop}: {n} crashes of {runner_id}, got exit codes {[e.exit_code for e in exits]}")
    expect(len(restarts) == n - 1, f"loop {loop}: {n - 1} restarts before the trip, got {len(restarts)}")
    expect(all(s.t <= tripped for s in restarts), f"loop {loop}: no restart after the trip at {tripped:.3f}")
    # Restarts back off as documented: 1 s after the first failure, doubled after each (at most 8 s).
    # The worker's timers run on its host's clock (drift up to clock_drift_ppm_max): a few ms of slack.
    delays = [round(s.t - e.t, 3) for e, s in zip(exits, restarts)]
    want = [min(BACKOFF_FIRST_S * 2**i, BACKOFF_MAX_S) for i in range(len(delays))]
    expect(all(abs(d - w) <= 0.01 for d, w in zip(delays, want)),
           f"loop {loop}: restarts {want} s after each crash (documented backoff), got {delays}")
    gaps = [round(b.t - a.t, 3) for a, b in itertools.pairwise(exits)]
    expect(all(g < WINDOW_S for g in gaps), f"loop {loop}: the crashes within one window, gaps {gaps}")
    expect(len(trips) == 1, f"loop {loop}: the breaker to trip exactly once, got {len(trips)}: {trips}")
    expect(len(given_up) == 1 and "crash loop" in given_up[0].error_message,
           f"loop {loop}: one permanent failure indexed for {iid}, got {given_up}")
    expect(_given_up(stage, runner_id), f"loop {loop}: {runner_id} still given up {QUIET_S:g} s after the trip")
    stage.metrics[f"loop{loop}_trip_after_s"] = round(tripped - began, 3)
    fault.heal()


@scenario(
    "crash_loop",
    "a crash loop trips the breaker exactly once per loop, a wedged runner is never retried, other nodes carry on",
    adjust=_adjust,
)
def crash_loop(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    opts = stage.opts
    ledger = Ledger(stage)
    a, b, c = stage.rng.sample(list(world.host_ids), 3)
    yield from stage.wait_until(stage.cluster_known, timeout_s=opts.settle_deadline_s)
    on_a = yield from _place_serving(stage, LOOPED, a, "place-a")
    on_b = yield from _place_serving(stage, STEADY, b, "place-b")
    on_c = yield from _place_serving(stage, LOOPED, c, "place-c")
    steady_runner = _runner_on(stage, on_b, b)
    for k in range(opts.client_count):
        world.process(chat_client(world, k, until=world.env.now + 10_000.0, model_id=ModelId(STEADY)))
    yield stage.sleep(stage.rng.uniform(2.0, 6.0))
    since = world.env.now
    sessions_before = len(world.session_log)

    # 1 and 2: two crash loops on A, each its own instance.
    yield from _crash_loop(stage, ledger, on_a, a, 1)
    host_a = world.hosts[a]
    req = world.clients.submit(host_a, DeleteInstance(command_id=CommandId("delete-a"), instance_id=on_a))
    yield req.done
    expect(req.outcome == "accepted", f"deleting {on_a} to be accepted, got {req.outcome}: {req.message}")
    again = yield from _place_serving(stage, LOOPED, a, "place-a2")
    yield from _crash_loop(stage, ledger, again, a, 2)

    # 3: a wedged runner on C is given up at once and never restarted.
    wedged_runner = _runner_on(stage, on_c, c)
    wedged_at = world.env.now
    world.faults.runner_wedge(world.hosts[c])
    ok = yield from stage.wait_until(lambda: _given_up(stage, wedged_runner), timeout_s=opts.runner_wedge_exit_s + 30.0)
    expect(ok, f"the wedged runner {wedged_runner} to be given up")
    yield stage.sleep(QUIET_S)
    exits = ledger.exits_of({wedged_runner}, since=wedged_at)
    expect([e.exit_code for e in exits] == [WEDGE_EXIT_CODE], f"one exit with code 86, got {exits}")
    expect(exits[0].t - wedged_at >= opts.runner_wedge_exit_s - 1e-6,
           f"the wedged runner silent for {opts.runner_wedge_exit_s:g} s before exiting, it took {exits[0].t - wedged_at:.3f}")
    expect(not ledger.starts_of(on_c, host=c, since=wedged_at), "the wedged runner never restarted")
    wedge_errors = [m for (t, h, m) in ledger.errors if h == c and t >= wedged_at]
    expect(len(wedge_errors) == 1 and "wedged" in wedge_errors[0], f"one wedge error on {c}, got {wedge_errors}")
    stage.metrics["wedge_exit_after_s"] = round(exits[0].t - wedged_at, 3)

    # 4: nobody else was disturbed.
    others = [h for h in world.host_ids if h not in (a, c)]
    expect(not [s for s in ledger.starts if s.host in others and s.t >= since],
           f"no runner started on {others} after the faults began")
    expect(not [e for e in ledger.exits if e.host in others], f"no runner exited on {others}")
    expect(len(ledger.starts_of(on_b)) == 1, f"{STEADY}'s runner on {b} started exactly once")
    after_ready = [r for r in ledger.reports if r.runner_id == steady_runner]
    first_ready = next(i for i, r in enumerate(after_ready) if type(r.status) is RunnerReady)
    odd = [r.status for r in after_ready[first_ready:] if not isinstance(r.status, RUNNER_SERVING)]
    expect(not odd, f"{b}'s runner to stay ready or running, it reported {odd}")
    expect(not [m for (_, h, m) in ledger.errors if h not in (a, c)], f"no error logged on {others}")
    expect(len(world.session_log) == sessions_before, f"no election: {world.session_log[sessions_before:]}")
    steady = [r for r in world.clients.requests.values() if r.kind == "SubmitTask" and r.ended_at is not None]
    # A chunk lost on a lossy network ends a stream as "stream_lost": the network's doing, not a runner's.
    failed = [(r.cid, r.outcome, r.code, r.message) for r in steady
              if r.outcome not in ("ok", "abandoned") and r.code != "stream_lost"]
    expect(not failed, f"every {STEADY} request served, walked away from or lost on the wire, got {failed[:3]}")
    stage.metrics["steady_streams_lost"] = sum(1 for r in steady if r.code == "stream_lost")
    served = served_after(steady, since)
    expect(served > 0, f"{STEADY} requests served while the faults ran")
    stage.metrics["steady_served"] = served
