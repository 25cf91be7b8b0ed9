"""Running one scenario with one seed: phases, checks, result.

Theory of operation
-------------------
``run_scenario(name, seed)`` expands the seed into options (printed in full
unless quiet), builds a ``World`` with a ``SafetyChecker`` watching every
step, and runs four phases in one simpy environment:

1. **boot**: every host boots; a master must be elected and every node
   converge within ``settle_deadline_s``;
2. **scenario**: the scenario's script (placements, clients, faults);
3. **heal**: clients stop, every fault heals, crash-restarted hosts come back;
4. **liveness**: within ``liveness_bound_s`` there must be exactly one
   master, every running node in its session at the same index with the same
   state digest, and every request that is not abandoned must have ended.
   Then invariant 5 (no placement lost) is checked against the converged
   state.

The run ends with a ``RunResult``: status (ok, safety, liveness, error), the
exit code of its class, the trace digest, figures and metrics. A failure
writes the trace and the timeline picture under the artifacts directory and
the result carries the one-line command that replays it.

Invariants kept: a run is a pure function of (scenario, seed, overrides);
nothing here reads the wall clock except to report wall time.
"""

from __future__ import annotations

import gc
import os
import time
import traceback
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import simpy

from skulk.core.ids import NodeId
from skulk.core.state import digest as core_digest

from chaos import exitcodes
from chaos.budget import DEFAULT_BUDGET, Budget, BudgetExceeded, guarding, trace_tail
from chaos.checkers import SafetyChecker, SafetyViolation
from chaos.efficiency import EfficiencyBounds, EfficiencyChecker, EfficiencyViolation
from chaos.oracles import OracleChecker, OracleViolation
from chaos.stage import Stage, ScenarioStuck
from chaos.scenarios import Scenario, get
from sim.options import SimOptions, apply_overrides, draw_options, render
from sim.rng import derive
from sim.world import CoreFailure, Livelock, World

__all__ = ["RunResult", "LivenessFailure", "build_options", "run_scenario", "convergence", "replay_command"]


class LivenessFailure(Exception):
    """After faults healed the cluster did not elect a master and converge in time."""


@dataclass
class RunResult:
    scenario: str
    seed: int
    status: str  # ok | safety | liveness | error
    exit_code: int
    message: str
    digest: str
    steps: int
    sim_s: float
    wall_s: float
    canary: bool = False
    overrides: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    replay: str = ""
    # What caught a failure: "invariant 3", "core assertion", "budget (rate)", "expectation", ...
    caught_by: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def line(self) -> str:
        head = f"{self.scenario} seed={self.seed}: {self.status.upper()}"
        figures = f"sim {self.sim_s:.1f}s, {self.steps} steps, wall {self.wall_s:.2f}s, digest {self.digest[:16]}"
        return f"{head} ({figures})" + (f"\n  {self.message}" if self.message else "")


def build_options(scenario: Scenario, seed: int, overrides: Mapping[str, str] | None = None, *, canary: bool = False) -> SimOptions:
    """The full options of (scenario, seed): the draw, the scenario's narrowing, then overrides."""
    opts = draw_options(seed, scenario.name, derive(seed, "options"))
    opts = scenario.adjust(opts, derive(seed, "options:" + scenario.name)).validate()
    over = dict(overrides or {})
    if canary:
        over["core.canary_double_master"] = "true"
    if over:
        opts = apply_overrides(opts, over)
    return opts.validate()


def replay_command(scenario: str, seed: int, overrides: Mapping[str, str], canary: bool) -> str:
    parts = ["python -m chaos run", scenario, "--seed", str(seed)]
    if canary:
        parts.append("--canary")
    for key in sorted(overrides):
        parts += ["--set", f"{key}={overrides[key]}"]
    return " ".join(parts)


def convergence(world: World) -> str | None:
    """None when the cluster is converged; else what is still missing (for the report)."""
    running = world.running_hosts()
    if not running:
        return "no host is running"
    masters = [h for h in running if h.node is not None and h.node.is_master]
    if len(masters) != 1:
        return f"{len(masters)} masters ({', '.join(h.id for h in masters)})"
    master = masters[0]
    assert master.node is not None and master.node.master is not None
    session = master.node.master.session
    mstate = master.node.replica.current
    if mstate is None:
        return f"master {master.id} has not applied its own session"
    for host in running:
        node = host.node
        assert node is not None
        if node.session != session:
            return f"{host.id} follows {node.session}, master {master.id} leads {session}"
        state = node.replica.current
        if state is None:
            return f"{host.id} is still bootstrapping session {session}"
        if state.last_index != mstate.last_index:
            return f"{host.id} is at index {state.last_index}, the master at {mstate.last_index}"
        if state != mstate:
            return f"{host.id} has a different state from the master's at index {state.last_index}"
    return None


def _requests_open(world: World) -> str | None:
    open_reqs = [r for r in world.clients.open_requests() if not r.abandoned]
    if open_reqs:
        first = open_reqs[0]
        return f"{len(open_reqs)} request(s) still open (first: {first.cid} on {first.host}, since {first.submitted_at:.2f})"
    return None


def _main(world: World, scenario: Scenario, stage: Stage, checker: SafetyChecker) -> Generator[simpy.Event, Any, None]:
    opts = world.opts
    world.phase("boot")
    world.boot_all()
    ok = yield from stage.wait_until(lambda: convergence(world) is None, timeout_s=opts.settle_deadline_s)
    if not ok:
        raise LivenessFailure(f"boot: no convergence within {opts.settle_deadline_s:g} s: {convergence(world)}")
    stage.metrics["boot_converged_s"] = round(world.env.now, 3)
    world.phase("scenario")
    yield from scenario.script(stage)
    world.phase("heal")
    world.clients.stopping = True
    world.faults.heal_all()
    healed_at = world.env.now
    world.phase("liveness")
    deadline = healed_at + opts.liveness_bound_s
    last = "not checked"
    while True:
        checker.check_deadlines()
        last = convergence(world) or _requests_open(world) or ""
        if not last:
            break
        if world.env.now >= deadline:
            raise LivenessFailure(f"no convergence within {opts.liveness_bound_s:g} s after faults healed: {last}")
        yield world.env.timeout(opts.liveness_poll_s)
    stage.metrics["converged_after_heal_s"] = round(world.env.now - healed_at, 3)
    # Final checks on the converged cluster.
    master = world.hosts[world.masters()[0]]
    assert master.node is not None and master.node.replica.current is not None
    final = master.node.replica.current
    digests = {core_digest(h.node.replica.current) for h in world.running_hosts()}  # type: ignore[union-attr]
    if len(digests) != 1:
        raise SafetyViolation(3, f"converged nodes disagree on the core's state digest: {sorted(digests)}", t=world.env.now, host=None)
    alive = {h.id for h in world.live_hosts()}
    checker.check_placements_kept(final, alive)
    stage.metrics["final_digest"] = next(iter(digests))[:16]
    stage.metrics["final_index"] = final.last_index


def run_scenario(
    name: str,
    seed: int,
    *,
    overrides: Mapping[str, str] | None = None,
    canary: bool = False,
    tracing: bool = True,
    artifacts_dir: Path | None = None,
    quiet: bool = False,
    print_options: bool = True,
    hashes_out: Path | None = None,
    write_trace: bool = False,
    budget: Budget | None = DEFAULT_BUDGET,
    efficiency: EfficiencyBounds | None = EfficiencyBounds(),
) -> RunResult:
    """Run scenario ``name`` with ``seed``; report what happened (never raises for a failed run).

    ``budget`` bounds the run in core steps and in time (``chaos.budget``;
    None: unbounded, for benchmarks that must not be cut short).

    A run makes next to no cyclic garbage, while it keeps hundreds of thousands
    of objects alive (the trace's inputs, the states): the cyclic collector's
    passes over them were a third of a run's time. It pauses for the whole run
    and resumes only once the run's world is unreachable, so its next pass frees
    the world from the youngest generation; resumed while the world still lived,
    it moved all of it to an older generation, to be walked again by a costlier
    pass later (memory is bounded by the budget's step count either way).
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _run(name, seed, overrides=overrides, canary=canary, tracing=tracing, artifacts_dir=artifacts_dir,
                    quiet=quiet, print_options=print_options, hashes_out=hashes_out, write_trace=write_trace,
                    budget=budget, efficiency=efficiency)
    finally:
        if collecting:
            gc.enable()


def _run(
    name: str,
    seed: int,
    *,
    overrides: Mapping[str, str] | None,
    canary: bool,
    tracing: bool,
    artifacts_dir: Path | None,
    quiet: bool,
    print_options: bool,
    hashes_out: Path | None,
    write_trace: bool,
    budget: Budget | None,
    efficiency: EfficiencyBounds | None,
) -> RunResult:
    """``run_scenario``'s body, with the cyclic collector paused by the caller."""
    scenario = get(name)
    over = dict(overrides or {})
    opts = build_options(scenario, seed, over, canary=canary)
    if print_options and not quiet:
        print(f"# {name} seed {seed}: options")
        print(render(opts), flush=True)
    checker = SafetyChecker(clock=lambda: 0.0, abandoned_events_max=opts.abandoned_events_max)
    world = World(opts, tracing=tracing, observers=[checker])
    checker.clock = lambda: world.env.now
    checker.ram_total_bytes = {h: world.hosts[h].ram_total_bytes for h in world.host_ids}
    checker.host_paused = lambda h: world.hosts[h].paused  # type: ignore[index]
    checker.master_reachable = lambda h, s: _master_reachable(world, h, s)
    checker.files_verified = lambda h, m, need: world.hosts[NodeId(h)].disk.covers(m, need)
    checker.runners_using = lambda h, m: sum(
        1 for r in world.hosts[NodeId(h)].runners.values() if r.alive and r.spec.model_id == m
    )
    oracles = OracleChecker(world, checker)
    world.observers.append(oracles)
    efficient = EfficiencyChecker(world, checker, efficiency) if efficiency is not None else None
    if efficient is not None:
        world.observers.append(efficient)
    stage = Stage(world, checker, derive(seed, "scenario:" + name))
    started = time.perf_counter()
    status, code, message, caught_by = "ok", exitcodes.OK, "", ""
    proc = world.process(_main(world, scenario, stage, checker))
    try:
        if budget is None:
            world.env.run(until=proc)
        else:
            with guarding(world, budget):
                world.env.run(until=proc)
    except BudgetExceeded as exc:
        status, code, caught_by = "liveness", exitcodes.LIVENESS, f"budget ({exc.kind})"
        message = f"{exc}\n{trace_tail(world)}"
    except Exception as exc:
        status, code, message, caught_by = _classify(exc)
    wall = time.perf_counter() - started
    tracer = world.tracer
    result = RunResult(
        scenario=name,
        seed=seed,
        status=status,
        exit_code=code,
        message=message,
        digest=tracer.digest() if tracer is not None else "",
        steps=world.steps,
        sim_s=world.env.now,
        wall_s=wall,
        canary=canary,
        overrides=over,
        metrics=dict(stage.metrics),
        checks={**checker.summary(), **oracles.summary(), **(efficient.summary() if efficient is not None else {})},
        replay=replay_command(name, seed, over, canary),
        caught_by=caught_by,
    )
    result.metrics.update(_world_figures(world))
    if hashes_out is not None and tracer is not None:
        tracer.write_hashes(hashes_out)
    if (status != "ok" or write_trace) and artifacts_dir is not None:
        from chaos.report import write_artifacts

        result.artifacts = write_artifacts(world, result, opts, artifacts_dir)
    return result


def _master_reachable(world: World, host_id: str, session: Any) -> bool:
    """``host_id`` still follows ``session`` and hears its master, who still leads it."""
    host = world.hosts[host_id]  # type: ignore[index]
    if host.node is None or session is None or host.node.session != session:
        return False
    master = world.hosts.get(session.master)
    if master is None or master.node is None or master.paused:
        return False
    mnode = master.node
    if not (mnode.is_master and mnode.master is not None and mnode.master.session == session):
        return False
    return host_id == session.master or world.network.hears(host_id, session.master)


def _classify(exc: Exception) -> tuple[str, int, str, str]:
    """(status, exit code, message, caught by) of the exception that ended a run."""
    if isinstance(exc, SafetyViolation):
        return "safety", exitcodes.SAFETY, str(exc), f"invariant {exc.invariant}"
    if isinstance(exc, OracleViolation):
        return "safety", exitcodes.SAFETY, str(exc), f"oracle {exc.oracle}"
    if isinstance(exc, EfficiencyViolation):
        return "liveness", exitcodes.LIVENESS, str(exc), f"efficiency {exc.invariant}"
    if isinstance(exc, CoreFailure):
        what = "core assertion" if isinstance(exc.error, AssertionError) else f"core {type(exc.error).__name__}"
        return "safety", exitcodes.SAFETY, f"{exc}\n{_short_tb(exc.error)}", what
    for kind, what in ((LivenessFailure, "liveness"), (ScenarioStuck, "stuck"), (Livelock, "livelock")):
        if isinstance(exc, kind):
            caught = "expectation" if str(exc).startswith("expected") else what
            return "liveness", exitcodes.LIVENESS, str(exc), caught
    origin = _raised_in_core(exc)
    if origin is not None:
        # Raised by core code the simulator called directly (a runner's admission,
        # a checker's apply): a failure of the code under test, never the harness's.
        what = "core assertion" if isinstance(origin, AssertionError) else f"core {type(origin).__name__}"
        return "safety", exitcodes.SAFETY, f"{what} outside a step: {origin}\n{_short_tb(origin)}", what
    # A harness bug: report it as such, with the traceback.
    return "error", exitcodes.ERROR, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", "harness error"


_CORE_DIR = f"{os.sep}skulk{os.sep}core{os.sep}"


def _raised_in_core(exc: BaseException) -> BaseException | None:
    """The exception (``exc`` or a cause: simpy re-raises copies) whose innermost frame is in ``skulk/core``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = traceback.extract_tb(current.__traceback__)
        if frames and _CORE_DIR in frames[-1].filename:
            return current
        current = current.__cause__ or current.__context__
    return None


def _short_tb(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)[-4:]
    return "".join(traceback.format_list(frames)).rstrip()


def _world_figures(world: World) -> dict[str, Any]:
    net = world.network
    hub = world.clients
    return {
        "messages_sent": net.sent,
        "messages_lost": net.lost,
        "messages_overflowed": net.overflowed,
        "messages_duplicated": net.duplicated,
        "requests": hub.submitted,
        "requests_served": hub.served,
        "requests_abandoned": hub.abandoned,
        "requests_failed": hub.failed,
        "faults": len(world.faults.history),
        "runners_started": world.runners_started,
        "masters_elected": len({s for (_, _, s, m) in world.session_log if m}),
    }
