"""Auto-placement is master policy in the core: once per session, only when missing."""

from __future__ import annotations

from sim.manual import ManualCluster
from skulk.core.commands import DeleteInstance
from skulk.core.config import CoreConfig
from skulk.core.inputs import SubmitCommand
from skulk.modelcards import load_cards

MODEL = "skulk/tiny-qwen2"


def test_a_lone_node_places_its_auto_place_model_as_soon_as_it_knows_its_memory() -> None:
    c = ManualCluster(1, cards=load_cards(), config=CoreConfig(auto_place=(MODEL,)))
    c.boot_all()
    c.settle(until=10.0)
    (inst,) = c.node("n1").state.instances.values()
    assert inst.shard_assignments.model_id == MODEL


def test_every_node_asking_for_auto_place_still_yields_one_instance() -> None:
    c = ManualCluster(3, cards=load_cards(), config=CoreConfig(auto_place=(MODEL,)))
    c.boot_all()
    c.settle(until=30.0)
    models = [i.shard_assignments.model_id for i in c.node("n1").state.instances.values()]
    assert models == [MODEL]


def test_a_deleted_auto_placed_instance_is_not_re_placed_in_the_same_session() -> None:
    c = ManualCluster(1, cards=load_cards(), config=CoreConfig(auto_place=(MODEL,)))
    c.boot_all()
    c.settle(until=10.0)
    (iid,) = c.node("n1").state.instances
    c.submit("n1", SubmitCommand(command=DeleteInstance(command_id="del", instance_id=iid)))
    c.settle(until=c.now + 30.0)
    assert not c.node("n1").state.instances


def test_an_unknown_auto_place_model_is_reported_once_and_nothing_is_placed() -> None:
    c = ManualCluster(1, cards=load_cards(), config=CoreConfig(auto_place=("no/such-model",)))
    c.boot_all()
    c.settle(until=20.0)
    assert not c.node("n1").state.instances
    assert sum("cannot auto-place no/such-model" in m for _, _, m in c.log) == 1
