"""``Stage``: what a scenario script plays on: the world, its rng, metrics and common steps.

Theory of operation
-------------------
``Stage`` bundles the run's ``World``, the safety checker, the scenario's
own random stream and a ``metrics`` dict that ends up in the run's result.
Its methods are the steps most scenarios share, written as simpy generators
(``yield from stage.place_and_wait()``): place a model and wait until every
rank serves, start clients, wait for a condition. Failing to reach a state
the scenario needs raises ``ScenarioStuck`` (a liveness failure) with the
reason.

Invariants kept: every wait is bounded by an explicit deadline; a context
draws randomness only from its own stream.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import simpy

from skulk.core.ids import InstanceId, ModelId, NodeId
from skulk.core.instances import RUNNER_SERVING

from sim.clients import PlacementFailed, chat_client, place_model

if TYPE_CHECKING:
    from chaos.checkers import SafetyChecker
    from sim.host import SimHost
    from sim.world import World

__all__ = ["Stage", "ScenarioStuck"]


class ScenarioStuck(Exception):
    """The cluster never reached a state the scenario waits for (a liveness failure)."""


class Stage:
    def __init__(self, world: World, checker: SafetyChecker, rng: random.Random) -> None:
        self.world = world
        self.env = world.env
        self.opts = world.opts
        self.checker = checker
        self.rng = rng
        self.metrics: dict[str, Any] = {}
        self.instance_id: InstanceId | None = None

    # --- waiting --------------------------------------------------------------------

    def wait_until(
        self, predicate: Callable[[], bool], *, timeout_s: float, poll_s: float = 0.25
    ) -> Generator[simpy.Event, Any, bool]:
        """Poll ``predicate`` every ``poll_s`` until true (returns True) or ``timeout_s`` (False)."""
        give_up = self.env.now + timeout_s
        while True:
            if predicate():
                return True
            if self.env.now >= give_up:
                return False
            yield self.env.timeout(min(poll_s, max(1e-6, give_up - self.env.now)))

    def sleep(self, seconds: float) -> simpy.Event:
        return self.env.timeout(max(0.0, seconds))

    # --- cluster queries --------------------------------------------------------------

    def master_host(self) -> SimHost | None:
        """The one running host acting as master, if exactly one does."""
        masters = self.world.masters()
        return self.world.hosts[masters[0]] if len(masters) == 1 else None

    def instance_serving(self, instance_id: InstanceId) -> bool:
        """The master's state has ``instance_id`` and every rank reports ready or running."""
        master = self.master_host()
        if master is None or master.node is None:
            return False
        state = master.node.replica.current
        if state is None:
            return False
        inst = state.instances.get(instance_id)
        if inst is None:
            return False
        return all(isinstance(state.runners.get(r), RUNNER_SERVING) for r in inst.shard_assignments.runner_to_shard)

    def serving_instance_of(self, model_id: str) -> InstanceId | None:
        master = self.master_host()
        if master is None or master.node is None or master.node.replica.current is None:
            return None
        state = master.node.replica.current
        for iid in sorted(state.instances):
            if state.instances[iid].shard_assignments.model_id == model_id and self.instance_serving(InstanceId(iid)):
                return InstanceId(iid)
        return None

    def cluster_known(self) -> bool:
        """The master's state lists every running host, with its memory (placement can see them all)."""
        master = self.master_host()
        if master is None or master.node is None or master.node.replica.current is None:
            return False
        state = master.node.replica.current
        running = {h.id for h in self.world.running_hosts()}
        return running <= set(state.topology.nodes) and running <= set(state.node_memory)

    # --- common steps -------------------------------------------------------------------------

    def place(
        self, model_id: str | None = None, *, excluded: tuple[NodeId, ...] = (), name: str = "place",
        min_nodes: int = 1,
    ) -> Generator[simpy.Event, Any, InstanceId]:
        """Place a model (default: the options' model); ``ScenarioStuck`` if it never is."""
        model = model_id or self.opts.model_id
        # Right after boot the master may not have indexed every node's telemetry
        # yet; placing then would see a smaller cluster than there is.
        yield from self.wait_until(self.cluster_known, timeout_s=self.opts.settle_deadline_s)
        try:
            iid = yield from place_model(self.world, model, deadline_s=self.opts.ready_deadline_s, excluded=excluded,
                                         name=name, min_nodes=min_nodes)
        except PlacementFailed as exc:
            raise ScenarioStuck(str(exc)) from exc
        self.world.trace_note("-", "placed", f"{model} as {iid}")
        self.instance_id = iid
        return iid

    def place_and_wait(
        self, model_id: str | None = None, *, excluded: tuple[NodeId, ...] = (), name: str = "place"
    ) -> Generator[simpy.Event, Any, InstanceId]:
        """Place a model and wait until every rank of its instance serves."""
        started = self.env.now
        iid = yield from self.place(model_id, excluded=excluded, name=name)
        ok = yield from self.wait_until(lambda: self.instance_serving(iid), timeout_s=self.opts.ready_deadline_s)
        if not ok:
            raise ScenarioStuck(f"instance {iid} of {model_id or self.opts.model_id} never served within "
                                f"{self.opts.ready_deadline_s:g} s of being placed")
        self.metrics["ready_after_s"] = round(self.env.now - started, 3)
        return iid

    def start_clients(self, until: float, *, count: int | None = None, prefix: str = "chat", **kw: Any) -> None:
        """Start ``count`` chat clients (default: the options') that run until ``until``."""
        n = self.opts.client_count if count is None else count
        for k in range(n):
            self.world.process(chat_client(self.world, k, until=until, prefix=prefix, model_id=ModelId(self.opts.model_id), **kw))
