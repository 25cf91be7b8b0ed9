"""The wire codec: camelCase keys, single-key tagged unions, lossless round trips."""

from __future__ import annotations

import pytest

from skulk.core.codec import WireError, decode_json, encode_json, from_wire, to_wire
from skulk.core.events import Event, IndexedEvent, InstanceCreated, NodeGatheredInfo
from skulk.core.instances import (
    Instance,
    MlxRingInstance,
    PipelineShardMetadata,
    RunnerFailed,
    RunnerReady,
    RunnerStatus,
    ShardAssignments,
)
from skulk.core.messages import ElectionMessage, Message
from skulk.core.telemetry import Memory, MemoryInfo


def _instance() -> MlxRingInstance:
    shard = PipelineShardMetadata(model_id="m", device_rank=0, world_size=1, start_layer=0, end_layer=4, n_layers=4)
    return MlxRingInstance(
        instance_id="i1",
        shard_assignments=ShardAssignments(model_id="m", runner_to_shard={"r1": shard}, node_to_runner={"n1": "r1"}),
        context_ceiling=4096,
    )


def test_tagged_unions_are_single_key_objects_with_camel_case_fields() -> None:
    wire = to_wire(_instance())
    assert list(wire) == ["MlxRingInstance"]
    body = wire["MlxRingInstance"]
    assert body["shardAssignments"]["nodeToRunner"] == {"n1": "r1"}
    shard = body["shardAssignments"]["runnerToShard"]["r1"]
    assert list(shard) == ["PipelineShardMetadata"]
    assert shard["PipelineShardMetadata"]["startLayer"] == 0
    assert to_wire(RunnerReady()) == {"RunnerReady": {"contextCeiling": 0}}


def test_round_trip_through_json_is_lossless() -> None:
    event = IndexedEvent(index=3, event=InstanceCreated(instance=_instance()), at=1.5, origin="n2", origin_idx=7)
    assert decode_json(IndexedEvent, encode_json(event)) == event
    info = NodeGatheredInfo(
        node_id="n1", memory=MemoryInfo(ram_total=Memory(in_bytes=10), ram_available=Memory(in_bytes=5))
    )
    assert from_wire(Event, to_wire(info)) == info


def test_unknown_variant_and_wrong_types_name_the_path() -> None:
    with pytest.raises(WireError, match="unknown variant 'Nope'"):
        from_wire(RunnerStatus, {"Nope": {}})
    with pytest.raises(WireError, match=r"\$\.RunnerFailed\.errorMessage: expected string"):
        from_wire(RunnerStatus, {"RunnerFailed": {"errorMessage": 3}})
    with pytest.raises(WireError, match="missing required field 'errorMessage'"):
        from_wire(RunnerStatus, {"RunnerFailed": {}})
    with pytest.raises(WireError, match="invalid JSON"):
        decode_json(Instance, b"{not json")


def test_sets_encode_sorted_so_bytes_never_depend_on_hash_order() -> None:
    assert to_wire(frozenset({"b", "c", "a"})) == ["a", "b", "c"]


def test_messages_round_trip() -> None:
    from skulk.core.messages import Candidate, Vote
    from skulk.core.session import Session

    msg = ElectionMessage(
        clock=4,
        campaigning=True,
        votes=(Vote(candidate=Candidate(clock=4, seniority=0, commands_seen=2, node_id="n1"), session=Session(clock=3, master="n2")),),
    )
    assert from_wire(Message, to_wire(msg)) == msg
    assert RunnerFailed(error_message="x") == from_wire(RunnerStatus, to_wire(RunnerFailed(error_message="x")))
