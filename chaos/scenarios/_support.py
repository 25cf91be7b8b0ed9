"""What issue 3's scenarios share: a ledger of runners and placements, and common steps.

Theory of operation
-------------------
The scenarios ``interconnect_selection``, ``oversized_placement``,
``ring_deadline``, ``crash_loop``, ``context_admission`` and
``heterogeneous_cluster`` check specific expectations on top of the safety
invariants, so they need to see more than the safety checker keeps:

- ``Ledger`` is an observer (``World.observers``): after every step it
  records the runners started (``StartRunner`` effects), the runner exits
  (``RunnerExited`` inputs), error logs, every instance indexed by a master
  (with the memory budgets placement saw, taken from the master's state at
  that very step), every instance deletion and every indexed runner failure;
  through the ``runner_reported`` hook, every status a simulated runner
  reported. It only records; the scripts judge.
- ``Expectation`` is raised when a scenario's own expectation does not hold.
  It is a ``ScenarioStuck`` (the harness reports it as a liveness failure,
  exit code 4), with a message that starts with "expected".
- The steps: wait until the master observed every link the simulated network
  has (so placement sees the whole topology), place a model with
  ``min_nodes``/``excluded_nodes``, find the serving instance of a model.

Invariants kept: the ledger draws no randomness and iterates nothing
unordered; a step's records are taken before its effects are carried out.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import simpy

from skulk.core.commands import SubmitTask
from skulk.core.effects import AppendLog, Log, StartRunner
from skulk.core.events import InstanceCreated, InstanceDeleted, RunnerStatusUpdated
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, RunnerId
from skulk.core.inputs import RunnerExited
from skulk.core.instances import RUNNER_SERVING, Instance, RunnerFailed, RunnerSpec, RunnerStatus
from skulk.core.memory import NodeBudget, node_budget
from skulk.core.state import State
from skulk.core.tasks import ChatMessage, GenerationParams

from chaos.stage import Stage, ScenarioStuck
from sim.clients import PlacementFailed, Request, place_model

__all__ = [
    "Expectation",
    "expect",
    "Ledger",
    "Started",
    "Exited",
    "Created",
    "Report",
    "master_state",
    "links_observed",
    "wait_links_observed",
    "place_on",
    "serving_instances",
    "wait_serving",
    "served_after",
    "submit_chat",
]


class Expectation(ScenarioStuck):
    """A scenario's own expectation did not hold (reported as a liveness failure, exit 4)."""


def expect(condition: bool, message: str) -> None:
    """Raise ``Expectation("expected " + message)`` unless ``condition``."""
    if not condition:
        raise Expectation(f"expected {message}")


@dataclass(frozen=True)
class Started:
    t: float
    host: NodeId
    spec: RunnerSpec


@dataclass(frozen=True)
class Exited:
    t: float
    host: NodeId
    runner_id: RunnerId
    exit_code: int


@dataclass(frozen=True)
class Created:
    """An instance a master indexed, with the budgets placement saw for its hosting nodes."""

    t: float
    master: NodeId
    instance: Instance
    budgets: dict[NodeId, NodeBudget]


@dataclass(frozen=True)
class Report:
    t: float
    host: NodeId
    instance_id: InstanceId
    runner_id: RunnerId
    status: RunnerStatus


class Ledger:
    """Observer recording runners, placements and failures (see the module docstring)."""

    def __init__(self, stage: Stage) -> None:
        self.env = stage.env
        self.starts: list[Started] = []
        self.exits: list[Exited] = []
        self.errors: list[tuple[float, NodeId, str]] = []
        self.created: dict[InstanceId, Created] = {}
        self.deleted: dict[InstanceId, tuple[float, str]] = {}
        # (time, reporting node, instance, failure) for every RunnerFailed a master indexed.
        self.failures: list[tuple[float, NodeId, InstanceId, RunnerFailed]] = []
        self.reports: list[Report] = []
        stage.world.observers.append(self)

    # --- hooks ----------------------------------------------------------------------------

    def after_step(self, host: NodeId, node: Any, inp: Any, effects: list[Any]) -> None:
        t = self.env.now
        if type(inp) is RunnerExited:
            self.exits.append(Exited(t, host, inp.runner_id, inp.exit_code))
        for effect in effects:
            kind = type(effect)
            if kind is StartRunner:
                self.starts.append(Started(t, host, effect.spec))
            elif kind is Log and effect.level in ("error", "critical"):
                self.errors.append((t, host, effect.message))
            elif kind is AppendLog:
                self._indexed(t, host, node, effect)

    def _indexed(self, t: float, host: NodeId, node: Any, effect: AppendLog) -> None:
        event = effect.indexed.event
        if type(event) is InstanceCreated:
            inst = event.instance
            if inst.instance_id in self.created:
                return  # re-adopted after a failover: the first placement is the one that counts
            state = node.master.state if node.master is not None else None
            budgets: dict[NodeId, NodeBudget] = {}
            if state is not None:
                for n in sorted(inst.shard_assignments.node_to_runner):
                    # The instance is in the state already; ignoring it gives what placement saw.
                    b = node_budget(state, n, ignore={inst.instance_id})
                    if b is not None:
                        budgets[n] = b
            self.created[inst.instance_id] = Created(t, host, inst, budgets)
        elif type(event) is InstanceDeleted:
            self.deleted.setdefault(event.instance_id, (t, event.reason))
        elif type(event) is RunnerStatusUpdated and type(event.status) is RunnerFailed:
            self.failures.append((t, event.node_id, event.instance_id, event.status))

    def runner_reported(
        self, host: NodeId, instance_id: InstanceId, runner_id: RunnerId, status: RunnerStatus, spec_ceiling: int
    ) -> None:
        self.reports.append(Report(self.env.now, host, instance_id, runner_id, status))

    # --- queries --------------------------------------------------------------------------------

    def starts_of(self, instance_id: InstanceId, *, host: NodeId | None = None, since: float = -1.0) -> list[Started]:
        return [
            s for s in self.starts
            if s.spec.instance_id == instance_id and (host is None or s.host == host) and s.t >= since
        ]

    def exits_of(self, runner_ids: set[RunnerId], *, since: float = -1.0) -> list[Exited]:
        return [e for e in self.exits if e.runner_id in runner_ids and e.t >= since]

    def of_model(self, model_id: str) -> list[Created]:
        """Instances of ``model_id`` in the order they were indexed."""
        return sorted((c for c in self.created.values() if c.instance.shard_assignments.model_id == model_id),
                      key=lambda c: c.t)


# --- steps ------------------------------------------------------------------------------------


def master_state(stage: Stage) -> State | None:
    """The current master's applied state (None without exactly one master)."""
    master = stage.master_host()
    if master is None or master.node is None:
        return None
    return master.node.replica.current


def links_observed(stage: Stage) -> bool:
    """The master's topology holds every link of the simulated network that is up, both ways."""
    state = master_state(stage)
    if state is None:
        return False
    have = {(c.source, c.sink, c.address) for c in state.topology.connections}
    net = stage.world.network
    ids = stage.world.host_ids
    for a in ids:
        for b in ids:
            if a == b:
                continue
            for link in net.links_between(a, b):
                if link.up and (a, b, link.address_of(b)) not in have:
                    return False
    return True


def wait_links_observed(stage: Stage) -> Generator[simpy.Event, Any, None]:
    """Wait (up to two probe rounds past the settle deadline) until the master knows every link."""
    ok = yield from stage.wait_until(
        lambda: stage.cluster_known() and links_observed(stage),
        timeout_s=stage.opts.settle_deadline_s + 2 * stage.opts.probe_interval_s,
    )
    if not ok:
        raise ScenarioStuck("the master never observed every link of the cluster")


def place_on(
    stage: Stage,
    model_id: str,
    *,
    min_nodes: int = 1,
    excluded: tuple[NodeId, ...] = (),
    name: str = "place",
) -> Generator[simpy.Event, Any, InstanceId]:
    """Place ``model_id`` (retrying what is pending); ``ScenarioStuck`` if it never is."""
    yield from stage.wait_until(stage.cluster_known, timeout_s=stage.opts.settle_deadline_s)
    try:
        iid = yield from place_model(
            stage.world, model_id, deadline_s=stage.opts.ready_deadline_s, excluded=excluded, min_nodes=min_nodes, name=name
        )
    except PlacementFailed as exc:
        raise ScenarioStuck(str(exc)) from exc
    stage.world.trace_note("-", "placed", f"{model_id} as {iid}")
    return iid


def serving_instances(stage: Stage, model_id: str) -> list[Instance]:
    """Instances of ``model_id`` in the master's state whose every rank serves (by instance id)."""
    state = master_state(stage)
    if state is None:
        return []
    out = []
    for iid in sorted(state.instances):
        inst = state.instances[iid]
        if inst.shard_assignments.model_id != model_id:
            continue
        if all(isinstance(state.runners.get(r), RUNNER_SERVING) for r in inst.shard_assignments.runner_to_shard):
            out.append(inst)
    return out


def wait_serving(
    stage: Stage, model_id: str, *, timeout_s: float, min_generation: int = 0, what: str = ""
) -> Generator[simpy.Event, Any, Instance]:
    """Wait until an instance of ``model_id`` of at least ``min_generation`` serves; return it."""

    def found() -> Instance | None:
        ready = [i for i in serving_instances(stage, model_id) if i.generation >= min_generation]
        return ready[0] if ready else None

    ok = yield from stage.wait_until(lambda: found() is not None, timeout_s=timeout_s)
    inst = found()
    if not ok or inst is None:
        raise ScenarioStuck(
            f"no instance of {model_id} (generation >= {min_generation}) served within {timeout_s:g} s"
            + (f" {what}" if what else "")
        )
    return inst


def served_after(requests: list[Request], t: float) -> int:
    """How many of ``requests`` were served (stop or length) after simulated time ``t``."""
    return sum(1 for r in requests if r.served and r.ended_at is not None and r.ended_at >= t)


def submit_chat(
    stage: Stage, host: Any, cid: str, model_id: str, *, prompt_tokens: int, max_tokens: int | None
) -> Request:
    """Send one chat request of ``prompt_tokens`` tokens (4 characters each) to ``host``'s API."""
    assert prompt_tokens >= 1
    params = GenerationParams(
        messages=(ChatMessage(role="user", content="p" * (4 * prompt_tokens)),), max_tokens=max_tokens, seed=0
    )
    return stage.world.clients.submit(host, SubmitTask(command_id=CommandId(cid), model_id=ModelId(model_id), params=params))
