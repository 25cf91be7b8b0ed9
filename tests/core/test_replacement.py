"""Re-placement after a failed group connect (DESIGN.md section 2, "Ring formation").

The master re-places the instance on a fresh port and avoids the link the
failing hop used when another ring exists.
"""

from __future__ import annotations

from skulk.core import placement
from skulk.core.commands import PlaceInstance
from skulk.core.events import InstanceCreated, RunnerStatusUpdated
from skulk.core.ids import CommandId, ModelId, NodeId
from skulk.core.instances import GROUP_CONNECT_TIMEOUT, RunnerFailed
from skulk.core.master import Master
from skulk.core.messages import LocalEventMessage
from skulk.core.session import Incarnation
from skulk.core.state import apply
from tests.core.test_placement import CONFIG, apply_events, build_state, cards_of, full_mesh, make_card, mem

GB = 10**9


def _master_with_instance(links):
    state = build_state({"a": mem(64 * GB), "b": mem(64 * GB)}, links)
    card = make_card(weight_bytes=GB)
    cmd = PlaceInstance(command_id=CommandId("p"), model_id=ModelId("test/model"), min_nodes=2)
    inst = placement.place(state, cmd, cards_of(card), CONFIG)
    assert isinstance(inst, placement.Placed)
    state = apply_events(state, [InstanceCreated(instance=inst.instance)])
    session = state.session
    assert session is not None
    holder = {"state": state}

    def apply_own(indexed):
        holder["state"] = apply(holder["state"], indexed)
        return holder["state"]

    master = Master(NodeId(session.master), CONFIG, session, cards_of(card), apply_own)
    master.state = state
    master.next_index = state.last_index + 1
    return master, inst.instance, holder


def _fail_connect(master: Master, inst, reporter: str):
    runner = inst.shard_assignments.node_to_runner[reporter]
    failed = RunnerFailed(error_message="group connect timed out", code=GROUP_CONNECT_TIMEOUT)
    event = RunnerStatusUpdated(runner_id=runner, node_id=NodeId(reporter), instance_id=inst.instance_id, status=failed)
    msg = LocalEventMessage(
        origin=NodeId(reporter),
        session=master.session,
        origin_idx=0,
        event=event,
        incarnation=Incarnation(number=1, boot_at=0.0),
    )
    return master.on_local_event(0.0, msg)


def test_a_failed_hop_is_avoided_when_another_link_exists() -> None:
    links = full_mesh(["a", "b"], "thunderbolt", "169.254.0") + full_mesh(["a", "b"], "ethernet", "192.168.1")
    master, inst, holder = _master_with_instance(links)
    assert {h.kind for h in inst.ring} == {"thunderbolt"}
    _fail_connect(master, inst, reporter=inst.ring[0].node_id)
    state = holder["state"]
    assert inst.instance_id not in state.instances
    (new,) = state.instances.values()
    assert new.generation == inst.generation + 1 and new.ephemeral_port != inst.ephemeral_port
    hop_to_rank1 = new.ring[1]
    # The hop that failed (rank 0 -> rank 1 over thunderbolt) now runs over ethernet.
    assert hop_to_rank1.kind == "ethernet", new.ring


def test_when_the_failed_link_is_the_only_one_a_fresh_port_alone_is_tried() -> None:
    master, inst, holder = _master_with_instance(full_mesh(["a", "b"], "ethernet", "192.168.1"))
    _fail_connect(master, inst, reporter=inst.ring[0].node_id)
    (new,) = holder["state"].instances.values()
    assert new.generation == inst.generation + 1 and new.ephemeral_port != inst.ephemeral_port
    assert {h.kind for h in new.ring} == {"ethernet"}


