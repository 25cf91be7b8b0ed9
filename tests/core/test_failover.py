"""Failover carryover, request failure on a dead master, the ingest cap.

DESIGN.md section 2 ("Failover carryover", "Event log") and invariants 5, 6
and 8, on real core nodes driven by hand (sim.manual.ManualCluster).
"""

from __future__ import annotations

from sim.manual import ManualCluster
from skulk.core.commands import PlaceInstance, SubmitTask
from skulk.core.events import SessionStarted, TaskCreated, TaskDeleted
from skulk.core.inputs import AbandonRequest, SubmitCommand
from skulk.core.instances import RunnerReady
from skulk.core.state import digest
from skulk.core.tasks import ChatMessage, GenerationParams
from skulk.modelcards import load_cards

MODEL = "skulk/tiny-qwen2"


def _cluster(n: int = 3) -> ManualCluster:
    c = ManualCluster(n, cards=load_cards())
    c.boot_all()
    c.settle(until=10.0)
    return c


def _place(c: ManualCluster, via: str, min_nodes: int) -> str:
    c.submit(via, SubmitCommand(command=PlaceInstance(command_id="place-1", model_id=MODEL, min_nodes=min_nodes)))
    c.settle(until=c.now + 10.0)
    done = c.completed["place-1"]
    assert done.result.status == "accepted", done.result
    assert done.result.instance_id is not None
    return done.result.instance_id


def _chat(c: ManualCluster, via: str, cid: str) -> None:
    params = GenerationParams(messages=(ChatMessage(role="user", content="hi"),), max_tokens=3)
    c.submit(via, SubmitCommand(command=SubmitTask(command_id=cid, model_id=MODEL, params=params)))


def _converged(c: ManualCluster) -> None:
    digests = {digest(c.node(n).state) for n in c.alive()}
    assert len(digests) == 1, "live nodes disagree on the state digest"


def test_a_placed_model_serves_a_request_through_any_node() -> None:
    c = _cluster(3)
    iid = _place(c, "n1", min_nodes=3)
    state = c.node("n1").state
    inst = state.instances[iid]
    assert sorted(inst.shard_assignments.node_to_runner) == ["n1", "n2", "n3"]
    assert all(isinstance(s, RunnerReady) for s in state.runners.values()) and len(state.runners) == 3
    _chat(c, "n2", "chat-1")
    c.settle(until=c.now + 10.0)
    chunks = c.delivered["chat-1"]
    assert [ch.text for ch in chunks] == ["t0", "t1", "t2"] and chunks[-1].finish_reason == "stop"
    assert not c.node("n2").state.tasks  # the task left the state once done
    _converged(c)


def test_failover_keeps_placements_whose_hosts_survive_and_never_restarts_their_runners() -> None:
    c = _cluster(3)
    iid = _place(c, "n1", min_nodes=2)
    hosts = sorted(c.node("n1").state.instances[iid].shard_assignments.node_to_runner)
    master = c.masters()[0]
    if master in hosts:
        # Make the master a non-host: re-place on the other two nodes.
        others = [n for n in c.alive() if n != master]
        c.submit("n1", SubmitCommand(command=PlaceInstance(command_id="place-2", model_id=MODEL, min_nodes=2, excluded_nodes=(master,))))
        c.settle(until=c.now + 10.0)
        iid = c.completed["place-2"].result.instance_id
        hosts = others
    started_before = {n: dict(c.hosts[n].runners) for n in hosts}
    c.crash(master)
    c.settle(until=c.now + 15.0)
    (new_master,) = c.masters()
    state = c.node(new_master).state
    assert iid in state.instances, "a failover lost a placement whose hosts survived (invariant 5)"
    first = [e for e in c.node(new_master).replica.last_state.instances]
    assert iid in first
    for n in hosts:
        assert c.hosts[n].runners == started_before[n], "a runner was restarted by a master change"
    assert all(isinstance(state.runners[r], RunnerReady) for r in state.instances[iid].shard_assignments.runner_to_shard)
    _chat(c, hosts[0], "after")
    c.settle(until=c.now + 10.0)
    assert c.delivered["after"][-1].finish_reason == "stop"
    _converged(c)


def test_requests_open_on_a_dead_master_end_with_a_clear_error() -> None:
    c = _cluster(3)
    _place(c, "n1", min_nodes=1)
    master = c.masters()[0]
    via = next(n for n in c.alive() if n != master)
    _chat(c, via, "inflight")
    # Deliver just enough for the master to accept, then kill it before tokens flow.
    for _ in range(200):
        if "inflight" in c.completed:
            break
        if c.inflight:
            c.deliver(0)
        else:
            c.fire_next_timer()
    assert c.completed["inflight"].result.status == "accepted"
    c.crash(master)
    c.settle(until=c.now + 15.0)
    chunks = c.delivered.get("inflight", [])
    assert chunks, "the request was left hanging"
    last = chunks[-1]
    assert last.finish_reason in ("stop", "error")
    if last.finish_reason == "error":
        assert last.error is not None and "retry" in last.error.message


def test_abandoned_requests_against_a_loading_model_index_at_most_two_events_each() -> None:
    c = ManualCluster(3, cards=load_cards(), runner_load_s=1_000.0)  # the model never finishes loading
    c.boot_all()
    c.settle(until=10.0)
    _place(c, "n1", min_nodes=1)
    master = c.masters()[0]
    start = c.node(master).master.next_index
    n = 50
    for i in range(n):
        _chat(c, "n2", f"storm-{i}")
    c.settle(until=c.now + 2.0)
    for i in range(n):
        c.submit("n2", AbandonRequest(command_id=f"storm-{i}"))
    c.settle(until=c.now + 30.0)
    log = c.node(master).master._log
    task_events = [e for e in log if e.index >= start and isinstance(e.event, (TaskCreated, TaskDeleted))]
    assert len(task_events) <= 2 * n
    assert not c.node(master).state.tasks, "abandoned tasks leaked"
    assert len({s for _, _, s in c.session_changes if s.is_master}) == 1, "the storm caused an election"


def test_every_session_starts_with_session_started_at_index_zero() -> None:
    c = _cluster(3)
    master = c.masters()[0]
    first = c.node(master).master._log[0]
    assert first.index == 0 and isinstance(first.event, SessionStarted)


def test_a_task_running_on_a_node_that_restarts_fails_instead_of_streaming_twice() -> None:
    # Found by chaos membership_churn seeds 60 and 154: the restarted worker ran
    # the task again from seq 0 and the client's node, already past it, dropped
    # every chunk including the last, so the request never ended.
    c = _cluster(3)
    master = c.masters()[0]
    host, origin = [n for n in c.alive() if n != master][:2]
    others = tuple(n for n in c.alive() if n != host)
    c.submit(origin, SubmitCommand(command=PlaceInstance(command_id="p", model_id=MODEL, excluded_nodes=others)))
    c.settle(until=c.now + 10.0)
    _chat(c, origin, "long")
    # Deliver until the host's runner has the task, then crash the host.
    for _ in range(500):
        if c.hosts[host].tasks:
            break
        if c.inflight:
            c.deliver(0)
        else:
            c.fire_next_timer()
    assert c.hosts[host].tasks, "the task was never dispatched"
    c.settle(until=c.now + 0.2)  # the running status reaches the master
    c.crash(host)
    c.boot(host)
    c.settle(until=c.now + 30.0)
    chunks = c.delivered.get("long", [])
    assert chunks and chunks[-1].finish_reason == "error", chunks
    assert "restarted" in chunks[-1].error.message
    assert not c.node(origin).requests.is_open("long")
