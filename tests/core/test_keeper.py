"""Model files in the core (issue 14): what is fetched from whom, when runners start, stalls, failures, eviction.

Everything here runs the real ``CoreNode`` on the hand-stepped cluster
(``sim.manual``), whose disks hold verified copies and whose transfers finish
``transfer_s`` after they start (or never, or fail, from planted sources).
"""

from __future__ import annotations

from typing import Any

from skulk.core.commands import DeleteInstance, EvictModel, PlaceInstance, RequestStoreDownload, SubmitTask
from skulk.core.config import CoreConfig
from skulk.core.effects import DeleteFiles, StartRunner
from skulk.core.files import DiskInfo, covers, need_of
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId
from skulk.core.inputs import InfoObserved, SubmitCommand
from skulk.core.instances import RunnerFailed, RunnerReady
from skulk.core.tasks import GenerationParams
from sim.manual import ManualCluster
from tests.core.builders import GB, make_card

CARD = make_card(model_id="test/model", weight_bytes=8 * GB, n_layers=12)
OTHER = make_card(model_id="test/other", weight_bytes=4 * GB, n_layers=8)
MODEL = ModelId(CARD.model_id)


class StartWatch:
    """An observer: at every StartRunner, the starting node's state must show every rank's files verified."""

    def __init__(self) -> None:
        self.starts: list[tuple[str, Any]] = []

    def after_step(self, nid: str, node: Any, inp: Any, effects: list[Any]) -> None:
        for effect in effects:
            if isinstance(effect, StartRunner):
                inst = node.state.instances[effect.spec.instance_id]
                model = inst.shard_assignments.model_id
                for host, runner in inst.shard_assignments.node_to_runner.items():
                    copy = node.state.model_copies.get(host, {}).get(model)
                    need = need_of(inst.shard_assignments.runner_to_shard[runner])
                    assert copy is not None and copy.status == "verified" and covers(copy.coverage, need), (
                        f"{nid} started {effect.spec.runner_id} while {host}'s files were {copy}"
                    )
                self.starts.append((nid, effect.spec))


def _place(c: ManualCluster, cid: str = "p", **kw: Any) -> None:
    c.submit("n1", SubmitCommand(command=PlaceInstance(command_id=CommandId(cid), model_id=MODEL, **kw)))


def _ready(c: ManualCluster) -> bool:
    state = c.node("n1").state
    return bool(state.instances) and all(
        isinstance(state.runners.get(r), RunnerReady)
        for inst in state.instances.values() for r in inst.shard_assignments.runner_to_shard
    )


def test_nodes_without_the_files_copy_them_from_the_node_that_has_them_before_any_runner_starts() -> None:
    c = ManualCluster(3, cards={CARD.model_id: CARD}, disks={"n1": [CARD.model_id]}, transfer_s=5.0)
    watch = StartWatch()
    c.observers.append(watch)
    c.boot_all()
    c.settle(until=10.0)
    _place(c, min_nodes=3)
    c.settle(until=c.now + 60.0)
    assert c.completed["p"].result.status == "accepted"
    assert _ready(c)
    sources = {(nid, t.source) for _, nid, t in c.transfers_started}
    assert sources == {(NodeId("n2"), NodeId("n1")), (NodeId("n3"), NodeId("n1"))}
    # Each copied only its own stage's layers, over n1's address.
    inst = next(iter(c.node("n1").state.instances.values()))
    for _, nid, t in c.transfers_started:
        runner = inst.shard_assignments.node_to_runner[nid]
        assert t.need == need_of(inst.shard_assignments.runner_to_shard[runner]) and t.address == "10.0.0.1"
    copies = c.node("n1").state.model_copies
    assert copies["n2"][MODEL].status == copies["n3"][MODEL].status == "verified"
    assert not copies["n2"][MODEL].coverage.complete, "a pipeline stage holds only its layers"
    # No runner started before every copy landed (the observer checked each start against the state).
    assert len(watch.starts) == 3
    assert len(c.node("n1").state.instances) == 1, "never re-placed: no deadline ran during the copies"


def test_with_a_store_node_the_store_downloads_once_and_the_others_copy_from_it() -> None:
    config = CoreConfig(store_node="n1")
    c = ManualCluster(3, config=config, cards={CARD.model_id: CARD}, disks={}, transfer_s=5.0)
    c.boot_all()
    c.settle(until=10.0)
    _place(c, min_nodes=2, excluded_nodes=(NodeId("n1"),))
    c.settle(until=c.now + 2.0)
    # While the store downloads, the others wait for it instead of going to the hub themselves.
    state = c.node("n1").state
    assert state.model_copies["n2"][MODEL].source == state.model_copies["n3"][MODEL].source == "store"
    c.settle(until=c.now + 60.0)
    started = [(nid, t.source, t.need) for _, nid, t in c.transfers_started]
    assert [(nid, n.is_whole) for nid, src, n in started if src is None and n is not None] == [("n1", True)], (
        "the store downloads the whole model from the hub")
    assert {nid for nid, src, _ in started if src is None} == {NodeId("n1")}, "only the store goes to the hub"
    assert {(nid, src) for nid, src, _ in started if src is not None} == {("n2", "n1"), ("n3", "n1")}
    assert _ready(c)
    assert c.node("n2").state.model_copies["n1"][MODEL].coverage.complete


def test_a_stalled_source_is_given_up_after_the_stall_timeout_and_another_one_used() -> None:
    config = CoreConfig(transfer_stall_s=30.0)
    c = ManualCluster(2, config=config, cards={CARD.model_id: CARD}, disks={"n1": [CARD.model_id]})
    c.stalled_sources.add("n1")
    c.boot_all()
    c.settle(until=10.0)
    _place(c, min_nodes=2)
    c.settle(until=c.now + 25.0)
    assert [t.source for _, nid, t in c.transfers_started if nid == "n2"] == ["n1"]
    c.settle(until=c.now + 60.0)
    assert [t.source for _, nid, t in c.transfers_started if nid == "n2"] == ["n1", None], "re-sourced from the hub"
    assert any("no new byte from peer:n1 for 30 s" in m for _, _, m in c.log)
    assert _ready(c)


def test_a_transfer_that_fails_for_good_fails_the_runner_with_the_reason_and_requests_get_it() -> None:
    c = ManualCluster(2, cards={CARD.model_id: CARD}, disks={"n1": [CARD.model_id]})
    c.failing_sources["n1"] = "disk_full"
    c.boot_all()
    c.settle(until=10.0)
    _place(c, min_nodes=2)
    c.settle(until=c.now + 30.0)
    state = c.node("n1").state
    copy = state.model_copies["n2"][MODEL]
    assert copy.status == "failed" and copy.error.startswith("disk_full")
    failed = [s for s in state.runners.values() if isinstance(s, RunnerFailed)]
    assert failed and failed[0].permanent and failed[0].code == "files_disk_full"
    assert "not available on n2" in failed[0].error_message
    c.submit("n1", SubmitCommand(command=SubmitTask(command_id=CommandId("t"), model_id=MODEL,
                                                    params=GenerationParams(prompt="hi", max_tokens=4))))
    c.settle(until=c.now + 5.0)
    result = c.completed["t"].result
    assert result.status == "rejected" and "disk_full" in result.message
    # No runner of the instance was started anywhere: nothing half-copied is ever loaded.
    assert not c.hosts[NodeId("n1")].runners and not c.hosts[NodeId("n2")].runners


def test_eviction_is_refused_while_an_instance_uses_the_model_and_done_once_it_is_gone() -> None:
    c = ManualCluster(1, cards={CARD.model_id: CARD})
    c.boot_all()
    c.settle(until=10.0)
    _place(c)
    c.settle(until=c.now + 10.0)
    assert _ready(c)
    c.submit("n1", SubmitCommand(command=EvictModel(command_id=CommandId("e1"), model_id=MODEL)))
    c.settle(until=c.now + 2.0)
    refused = c.completed["e1"].result
    assert refused.status == "rejected" and refused.code == "model_in_use" and "delete the instance" in refused.message
    assert c.deleted == []
    (iid,) = c.node("n1").state.instances
    c.submit("n1", SubmitCommand(command=DeleteInstance(command_id=CommandId("d"), instance_id=InstanceId(iid))))
    c.settle(until=c.now + 5.0)
    c.submit("n1", SubmitCommand(command=EvictModel(command_id=CommandId("e2"), model_id=MODEL)))
    c.settle(until=c.now + 5.0)
    assert c.completed["e2"].result.status == "accepted"
    assert [(nid, m) for _, nid, m in c.deleted] == [("n1", MODEL)]
    assert MODEL not in c.node("n1").state.model_copies.get("n1", {})
    assert MODEL not in c.hosts[NodeId("n1")].disk


def test_over_its_disk_budget_a_node_evicts_the_least_recently_used_copy_no_instance_uses() -> None:
    cards = {CARD.model_id: CARD, OTHER.model_id: OTHER}
    c = ManualCluster(1, cards=cards)
    c.boot_all()
    c.settle(until=10.0)
    _place(c)  # test/model is in use from now on; test/other is not
    c.settle(until=c.now + 10.0)
    used = CARD.weight_bytes + OTHER.weight_bytes
    disk = DiskInfo(total_bytes=100 * GB, free_bytes=100 * GB - used, models_bytes=used, budget_bytes=10 * GB)
    c.submit("n1", InfoObserved(disk=disk))
    c.settle(until=c.now + 20.0)
    assert [(nid, m) for _, nid, m in c.deleted] == [("n1", OTHER.model_id)]
    copies = c.node("n1").state.model_copies["n1"]
    assert MODEL in copies and OTHER.model_id not in copies


def test_the_store_downloads_on_request_and_reports_it_in_the_state() -> None:
    c = ManualCluster(2, config=CoreConfig(store_node="n2"), cards={CARD.model_id: CARD}, disks={})
    c.boot_all()
    c.settle(until=10.0)
    c.submit("n1", SubmitCommand(command=RequestStoreDownload(command_id=CommandId("s"), model_id=MODEL,
                                                              node_id=NodeId("n2"))))
    c.settle(until=c.now + 2.0)
    assert c.completed["s"].result.status == "accepted"
    assert c.node("n1").state.model_copies["n2"][MODEL].status in ("requested", "downloading")
    c.settle(until=c.now + 20.0)
    copy = c.node("n1").state.model_copies["n2"][MODEL]
    assert copy.status == "verified" and copy.coverage.complete and copy.source == "local"
    assert [(nid, t.source) for _, nid, t in c.transfers_started] == [("n2", None)]
