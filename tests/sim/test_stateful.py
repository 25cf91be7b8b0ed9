"""Hypothesis stateful tests: simulator actions as rules, safety checked after every step.

The rules are ``ManualCluster`` actions (deliver, drop or duplicate a message
in flight, fire the next timer, partition, heal, crash, restart, submit and
abandon a chat request). ``chaos.checkers.SafetyChecker`` watches every step
the nodes take, so a broken invariant fails the rule that broke it, and
Hypothesis shrinks the schedule to a minimal one. At the end every fault
heals and the cluster must converge (liveness).

Scale with ``SKULK_SIM_EXAMPLES`` (examples per test, default 40) and
``SKULK_SIM_STEPS`` (rules per example, default 40); the default run is
derandomized so CI is repeatable.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from chaos.checkers import SafetyChecker, SafetyViolation
from sim.manual import ManualCluster
from skulk.core.commands import PlaceInstance, SubmitTask
from skulk.core.config import CoreConfig
from skulk.core.ids import CommandId, ModelId
from skulk.core.inputs import AbandonRequest, SubmitCommand
from skulk.core.state import digest
from skulk.core.tasks import ChatMessage, GenerationParams
from skulk.cards import load_cards

MODEL = ModelId("skulk/tiny-qwen2")
EXAMPLES = int(os.environ.get("SKULK_SIM_EXAMPLES", "40"))
STEPS = int(os.environ.get("SKULK_SIM_STEPS", "40"))
CARDS = load_cards()


def _checked_cluster(n: int, config: CoreConfig | None = None) -> tuple[ManualCluster, SafetyChecker]:
    c = ManualCluster(n, cards=CARDS, config=config)
    checker = SafetyChecker(
        clock=lambda: c.now,
        abandoned_events_max=4,
        ram_total_bytes={nid: h.ram_total for nid, h in c.hosts.items()},
    )
    c.observers.append(checker)
    return c, checker


class ClusterMachine(RuleBasedStateMachine):
    """A three-node cluster with a placed model, driven one action at a time."""

    @initialize()
    def boot(self) -> None:
        self.c, self.checker = _checked_cluster(3)
        self.c.boot_all()
        self.c.settle(until=10.0)
        self.c.submit("n1", SubmitCommand(command=PlaceInstance(command_id=CommandId("place-1"), model_id=MODEL, min_nodes=2)))
        self.c.settle(until=self.c.now + 10.0)
        assert self.c.completed["place-1"].result.status == "accepted"
        self.requests = 0
        self.open: list[tuple[str, CommandId]] = []

    # --- messages and time --------------------------------------------------------

    @precondition(lambda self: bool(self.c.inflight))
    @rule(i=st.integers(min_value=0, max_value=10_000))
    def deliver(self, i: int) -> None:
        self.c.deliver(i % len(self.c.inflight))

    @precondition(lambda self: bool(self.c.inflight))
    @rule(i=st.integers(min_value=0, max_value=10_000))
    def drop(self, i: int) -> None:
        self.c.drop(i % len(self.c.inflight))

    @precondition(lambda self: bool(self.c.inflight))
    @rule(i=st.integers(min_value=0, max_value=10_000))
    def duplicate(self, i: int) -> None:
        self.c.duplicate(i % len(self.c.inflight))

    @rule()
    def fire_timer(self) -> None:
        self.c.fire_next_timer()

    @rule(rounds=st.integers(min_value=1, max_value=30))
    def run_a_while(self, rounds: int) -> None:
        """Deliver everything in order and fire timers for a little simulated time."""
        self.c.settle(until=self.c.now + 0.1 * rounds)

    # --- faults -------------------------------------------------------------------------

    @rule(mask=st.integers(min_value=1, max_value=6))
    def partition(self, mask: int) -> None:
        names = sorted(self.c.hosts)
        left = [n for i, n in enumerate(names) if mask >> i & 1]
        right = [n for n in names if n not in left]
        self.c.partition(left, right)

    @rule()
    def heal(self) -> None:
        self.c.heal()

    @precondition(lambda self: len(self.c.alive()) > 1)
    @rule(i=st.integers(min_value=0, max_value=2))
    def crash(self, i: int) -> None:
        alive = self.c.alive()
        self.c.crash(alive[i % len(alive)])

    @precondition(lambda self: len(self.c.alive()) < len(self.c.hosts))
    @rule(i=st.integers(min_value=0, max_value=2))
    def restart(self, i: int) -> None:
        down = [n for n in sorted(self.c.hosts) if self.c.hosts[n].node is None]
        self.c.boot(down[i % len(down)])

    # --- clients ------------------------------------------------------------------------------

    @rule(i=st.integers(min_value=0, max_value=2), max_tokens=st.integers(min_value=1, max_value=8))
    def submit(self, i: int, max_tokens: int) -> None:
        alive = self.c.alive()
        origin = alive[i % len(alive)]
        cid = CommandId(f"chat-{self.requests}")
        self.requests += 1
        params = GenerationParams(messages=(ChatMessage(role="user", content="hello"),), max_tokens=max_tokens)
        self.c.submit(origin, SubmitCommand(command=SubmitTask(command_id=cid, model_id=MODEL, params=params)))
        self.open.append((origin, cid))

    @precondition(lambda self: bool(self.open))
    @rule(i=st.integers(min_value=0, max_value=100))
    def abandon(self, i: int) -> None:
        origin, cid = self.open.pop(i % len(self.open))
        if self.c.hosts[origin].node is None:
            return
        self.checker.request_abandoned(SimpleNamespace(kind="SubmitTask", cid=cid, host=origin))
        self.c.submit(origin, AbandonRequest(command_id=cid))

    # --- checks ----------------------------------------------------------------------------------

    @invariant()
    def at_most_one_master_per_session(self) -> None:
        sessions = [self.c.node(n).master.session for n in self.c.alive() if self.c.node(n).is_master]  # type: ignore[union-attr]
        assert len(sessions) == len(set(sessions)), f"two masters in one session: {sessions}"

    def teardown(self) -> None:
        if not hasattr(self, "c"):
            return
        # Liveness: heal everything, bring everyone back, and the cluster converges.
        self.c.heal()
        for name in sorted(self.c.hosts):
            if self.c.hosts[name].node is None:
                self.c.boot(name)
        self.c.settle(until=self.c.now + 120.0)
        masters = self.c.masters()
        assert len(masters) == 1, f"after healing: masters {masters}"
        assert len({self.c.node(n).session for n in self.c.alive()}) == 1, "after healing: nodes disagree on the session"
        assert len({digest(self.c.node(n).state) for n in self.c.alive()}) == 1, "after healing: states differ"


ClusterMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize="SKULK_SIM_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestCluster = ClusterMachine.TestCase


def test_the_checkers_catch_the_double_master_canary() -> None:
    """A planted bug (a deposed master also acts in the winner's session) is caught at once."""
    c, _ = _checked_cluster(3, CoreConfig(canary_double_master=True))
    c.boot_all()
    c.settle(until=10.0)
    master = c.masters()[0]
    others = [n for n in sorted(c.hosts) if n != master]
    c.partition([master], others)  # the master loses the majority, which elects another
    c.settle(until=c.now + 10.0)
    c.heal()
    with pytest.raises(SafetyViolation) as caught:
        c.settle(until=c.now + 20.0)
    assert caught.value.invariant == 1
