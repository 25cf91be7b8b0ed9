"""chaos.realtrace: the chaos checkers over recorded traces, each invariant shown to fire.

The traces here are written by hand in the recorder's format from real core
records (so no processes run): a consistent one must pass, and each planted
fault must be named by the invariant it breaks. The real-process tests
(test_storm, test_failover_load) run the same checker on recorded traces.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import msgspec
import pytest

from chaos.realtrace import check_trace, read_trace, write_trace
from skulk.core.codec import to_wire
from skulk.core.events import (
    Carryover,
    IndexedEvent,
    InstanceCreated,
    NodeGatheredInfo,
    RunnerStatusUpdated,
    SessionStarted,
    TaskCreated,
    TaskDeleted,
    TaskStatusUpdated,
)
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, RunnerId, TaskId, derive_id
from skulk.core.instances import MlxRingInstance, PipelineShardMetadata, RunnerReady, ShardAssignments
from skulk.core.telemetry import Memory, MemoryInfo
from skulk.core.session import Session
from skulk.core.state import EMPTY_STATE, State, apply
from skulk.core.tasks import ChatMessage, GenerationParams, Task

pytestmark = pytest.mark.reliability

S1 = Session(clock=1, master=NodeId("a"))
S2 = Session(clock=2, master=NodeId("b"))
GIB = 1 << 30


def _instance() -> MlxRingInstance:
    shard = PipelineShardMetadata(model_id="m", device_rank=0, world_size=1, start_layer=0, end_layer=4, n_layers=4)
    return MlxRingInstance(
        instance_id=InstanceId("i1"),
        shard_assignments=ShardAssignments(model_id=ModelId("m"), runner_to_shard={"r1": shard}, node_to_runner={"n1": "r1"}),
        context_ceiling=4096,
    )


def _task(cid: str) -> Task:
    return Task(task_id=TaskId(derive_id("task", cid)), command_id=CommandId(cid), origin=NodeId("n1"),
                instance_id=InstanceId("i1"), model_id=ModelId("m"), kind="chat",
                params=GenerationParams(messages=(ChatMessage(role="user", content="hi"),), max_tokens=4))


class Trace:
    """A hand-written trace: a master's log and observations of the applied states."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = [{"kind": "meta", "t": 0.0, "nodes": ["a", "b", "n1"],
                                               "ramTotal": {"n1": 16 * GIB}}]
        self.states: dict[Session, list[State]] = {}
        self.t = 1.0

    def index(self, session: Session, *events: Any) -> None:
        log = self.states.setdefault(session, [])
        for event in events:
            self.t += 0.1
            indexed = IndexedEvent(index=len(log), event=event, at=self.t)
            log.append(apply(log[-1] if log else EMPTY_STATE, indexed))
            self.records.append({"kind": "append", "node": session.master, "t": self.t, "session": to_wire(session),
                                 "indexed": to_wire(indexed)})

    def observe(self, node: str, session: Session, index: int, *, is_master: bool = False) -> dict[str, Any]:
        self.t += 0.1
        rec = {"kind": "observe", "node": node, "t": self.t, "session": to_wire(session), "isMaster": is_master,
               "state": to_wire(self.states[session][index])}
        self.records.append(rec)
        return rec

    def note(self, kind: str, node: str, **fields: Any) -> None:
        self.t += 0.1
        self.records.append({"kind": kind, "node": node, "t": self.t, **fields})


def _healthy() -> Trace:
    """Master a places i1 on n1; n1 and b follow; two requests: one served, one abandoned."""
    tr = Trace()
    memory = MemoryInfo(ram_total=Memory(in_bytes=16 * GIB), ram_available=Memory(in_bytes=12 * GIB))
    tr.index(S1, SessionStarted(session=S1, carryover=Carryover()), NodeGatheredInfo(node_id=NodeId("n1"), memory=memory),
             InstanceCreated(instance=_instance()))
    tr.observe("a", S1, 2, is_master=True)
    tr.observe("n1", S1, 1)
    tr.observe("n1", S1, 2)
    tr.observe("b", S1, 2)
    tr.index(S1, TaskCreated(task=_task("c-served")), TaskStatusUpdated(task_id=_task("c-served").task_id, status="running"),
             TaskDeleted(task_id=_task("c-served").task_id), TaskCreated(task=_task("c-gone")),
             TaskDeleted(task_id=_task("c-gone").task_id, outcome="cancelled"))
    tr.note("abandoned", "b", commandId="c-gone")
    tr.observe("n1", S1, 7)
    tr.observe("a", S1, 7, is_master=True)
    return tr


def test_a_consistent_trace_passes_and_round_trips_through_a_file(tmp_path: Path) -> None:
    tr = _healthy()
    path = tmp_path / "trace.jsonl"
    assert write_trace(path, reversed(tr.records)) == len(tr.records)
    verdict = check_trace(read_trace(path))
    assert verdict.ok, verdict.line()
    assert verdict.checks["events_indexed"] == 8 and verdict.checks["state_digests_compared"] == 6
    assert verdict.checks["abandoned_requests"] == 1 and verdict.checks["max_events_per_abandoned_request"] == 2
    assert verdict.figures["final_master_index"] == 7


def test_a_second_master_in_one_session_is_invariant_1() -> None:
    tr = _healthy()
    tr.observe("b", S1, 7, is_master=True)  # b claims a's session
    verdict = check_trace(tr.records)
    assert not verdict.ok and verdict.invariant == 1, verdict.line()


def test_a_state_beyond_the_masters_log_is_invariant_2() -> None:
    tr = _healthy()
    rec = tr.observe("n1", S1, 7)
    rec["state"] = copy.deepcopy(rec["state"])
    rec["state"]["lastIndex"] = 9
    verdict = check_trace(tr.records)
    assert not verdict.ok and verdict.invariant == 2, verdict.line()


def test_a_state_that_differs_from_the_log_is_invariant_3() -> None:
    tr = _healthy()
    rec = tr.observe("b", S1, 7)  # (a position b was not seen at: the checker checks each once)
    rec["state"] = copy.deepcopy(rec["state"])
    rec["state"]["nodeMemory"]["n1"]["ramTotal"]["inBytes"] = 1
    verdict = check_trace(tr.records)
    assert not verdict.ok and verdict.invariant == 3, verdict.line()


def test_too_many_events_for_an_abandoned_request_is_invariant_6() -> None:
    tr = _healthy()
    task = _task("c-chatty")
    tr.index(S1, TaskCreated(task=task), *[TaskStatusUpdated(task_id=task.task_id, status="running") for _ in range(3)])
    tr.note("abandoned", "n1", commandId="c-chatty")
    verdict = check_trace(tr.records)
    assert not verdict.ok and verdict.invariant == 6 and "4 events" in verdict.message, verdict.line()


def test_a_request_left_open_on_a_dead_master_is_invariant_8() -> None:
    tr = _healthy()
    tr.note("crash", "a")
    tr.note("request", "n1", commandId="c-open", submitted=1.0, deadline=tr.t + 30.0, ended=tr.t + 5.0)
    assert check_trace(tr.records).ok, "a request that ended before its deadline is fine"
    tr.note("request", "n1", commandId="c-hung", submitted=1.0, deadline=tr.t + 30.0, ended=None)
    verdict = check_trace(tr.records)
    assert not verdict.ok and verdict.invariant == 8 and "c-hung" in verdict.message, verdict.line()


def test_a_placement_lost_in_a_failover_is_invariant_5() -> None:
    tr = _healthy()
    tr.note("crash", "a")
    # b's session forgets i1, although its host n1 applied it and never went down.
    tr.index(S2, SessionStarted(session=S2, carryover=Carryover()))
    tr.observe("b", S2, 0, is_master=True)
    tr.observe("n1", S2, 0)
    verdict = check_trace(tr.records)
    assert not verdict.ok and verdict.invariant == 5 and "i1" in verdict.message, verdict.line()
    # Carried over, it is kept.
    kept = _healthy()
    kept.note("crash", "a")
    kept.index(S2, SessionStarted(session=S2, carryover=Carryover(instances={InstanceId("i1"): _instance()})))
    kept.observe("b", S2, 0, is_master=True)
    assert check_trace(kept.records).ok


def test_an_instance_beyond_a_nodes_memory_is_invariant_4() -> None:
    tr = Trace()
    memory = MemoryInfo(ram_total=Memory(in_bytes=16 * GIB), ram_available=Memory(in_bytes=12 * GIB))
    big = msgspec.structs.replace(_instance(), memory_by_node={NodeId("n1"): 13 * GIB})
    tr.index(S1, SessionStarted(session=S1, carryover=Carryover()), NodeGatheredInfo(node_id=NodeId("n1"), memory=memory),
             InstanceCreated(instance=big))
    tr.observe("a", S1, 2, is_master=True)
    verdict = check_trace(tr.records)
    assert not verdict.ok and verdict.invariant == 4, verdict.line()


def test_ranks_enforcing_another_ceiling_is_invariant_7() -> None:
    tr = _healthy()
    tr.index(S1, RunnerStatusUpdated(runner_id=RunnerId("r1"), node_id=NodeId("n1"), instance_id=InstanceId("i1"),
                                     status=RunnerReady(context_ceiling=4096)))
    assert check_trace(tr.records).ok
    tr.index(S1, RunnerStatusUpdated(runner_id=RunnerId("r1"), node_id=NodeId("n1"), instance_id=InstanceId("i1"),
                                     status=RunnerReady(context_ceiling=1000)))
    verdict = check_trace(tr.records)
    assert not verdict.ok and verdict.invariant == 7, verdict.line()
