"""The replicated cluster state and the pure, strict ``apply``.

Theory of operation
-------------------
``State`` is an immutable record. ``apply(state, indexed)`` returns a new state
and asserts that ``indexed.index`` is exactly ``state.last_index + 1`` (event 0
of a session must be ``SessionStarted``, which resets the state from the
master's carryover). Every node that applied the same prefix of a session's log
holds an identical state; ``digest(state)`` (SHA-256 over a canonical,
key-sorted msgpack encoding) makes that checkable byte for byte.

``apply`` never reads a clock: times in the state (``last_seen``) come from the
``at`` stamp the master put on the indexed event.
"""

from __future__ import annotations

import hashlib

import msgspec

from skulk.core.codec import from_wire, to_wire
from skulk.core.events import (
    ConnectionLost,
    ConnectionObserved,
    DownloadCompleted,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    InstanceStillHosted,
    NodeGatheredInfo,
    NodeTimedOut,
    RunnerDeleted,
    RunnerStatusUpdated,
    SessionStarted,
    TaskCreated,
    TaskDeleted,
    TaskFailed,
    TaskStatusUpdated,
)
from skulk.core.ids import InstanceId, ModelId, NodeId, RunnerId, TaskId
from skulk.core.instances import Instance, KvUse, RunnerStatus
from skulk.core.nodes import Connection, MemoryInfo, NetworkInfo, NodeIdentity, SystemInfo, Topology
from skulk.core.records import Record
from skulk.core.session import Session
from skulk.core.tasks import Task

__all__ = ["State", "apply", "digest", "encode_state", "decode_state", "hosting_nodes", "EMPTY_STATE"]


class State(Record, frozen=True, kw_only=True):
    session: Session | None = None
    last_index: int = -1
    instances: dict[InstanceId, Instance] = {}
    runners: dict[RunnerId, RunnerStatus] = {}
    tasks: dict[TaskId, Task] = {}
    downloads: dict[NodeId, tuple[ModelId, ...]] = {}
    last_seen: dict[NodeId, float] = {}
    topology: Topology = Topology()
    node_identities: dict[NodeId, NodeIdentity] = {}
    node_memory: dict[NodeId, MemoryInfo] = {}
    node_network: dict[NodeId, NetworkInfo] = {}
    node_system: dict[NodeId, SystemInfo] = {}
    # Each node's rank-0 runners' KV budget and prefix cache, as of its last telemetry.
    node_kv: dict[NodeId, dict[RunnerId, KvUse]] = {}
    # Which instance each runner belongs to (runner statuses are keyed by runner).
    runner_instance: dict[RunnerId, InstanceId] = {}
    # Fresh-port counter: each created instance takes the next offset.
    next_port_offset: int = 0


EMPTY_STATE = State()

_ENCODER = msgspec.msgpack.Encoder(order="sorted")


def encode_state(state: State) -> bytes:
    """Canonical bytes of ``state`` (dict keys sorted)."""
    return _ENCODER.encode(to_wire(state))


def decode_state(raw: bytes) -> State:
    state = from_wire(State, msgspec.msgpack.decode(raw))
    assert isinstance(state, State)
    return state


def digest(state: State) -> str:
    """SHA-256 of the canonical encoding; equal states have equal digests."""
    return hashlib.sha256(encode_state(state)).hexdigest()


def hosting_nodes(instance: Instance) -> tuple[NodeId, ...]:
    """The nodes that host a rank of ``instance``, sorted."""
    return tuple(sorted(instance.shard_assignments.node_to_runner))


def _without(mapping: dict, key: object) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def _with(mapping: dict, key: object, value: object) -> dict:
    out = dict(mapping)
    out[key] = value
    return out


def apply(state: State, indexed: IndexedEvent) -> State:
    """Fold one indexed event into ``state``; strict about the index."""
    event = indexed.event
    if isinstance(event, SessionStarted):
        assert indexed.index == 0, f"SessionStarted must be event 0, got index {indexed.index}"
        carry = event.carryover
        runner_instance = {
            runner_id: iid
            for iid in sorted(carry.instances)
            for runner_id in sorted(carry.instances[iid].shard_assignments.runner_to_shard)
        }
        return State(
            session=event.session,
            last_index=0,
            instances=dict(carry.instances),
            runner_instance=runner_instance,
            downloads=dict(carry.downloads),
            topology=Topology(connections=tuple(sorted(carry.connections, key=_conn_key))),
            next_port_offset=carry.next_port_offset,
        )
    assert state.session is not None, "no session: the first event of a session must be SessionStarted"
    assert indexed.index == state.last_index + 1, (
        f"apply expected index {state.last_index + 1}, got {indexed.index}"
    )
    state = _apply_body(state, event, indexed.at)
    return msgspec.structs.replace(state, last_index=indexed.index)


def _conn_key(c: Connection) -> tuple[str, str, str, str]:
    return (c.source, c.sink, c.address, c.kind)


def _apply_body(state: State, event: object, at: float) -> State:
    replace = msgspec.structs.replace
    if isinstance(event, NodeGatheredInfo):
        node = event.node_id
        changes: dict[str, object] = {"last_seen": _with(state.last_seen, node, at)}
        if node not in state.topology.nodes:
            changes["topology"] = replace(
                state.topology, nodes=tuple(sorted((*state.topology.nodes, node)))
            )
        if event.identity is not None:
            changes["node_identities"] = _with(state.node_identities, node, event.identity)
        if event.memory is not None:
            changes["node_memory"] = _with(state.node_memory, node, event.memory)
        if event.network is not None:
            changes["node_network"] = _with(state.node_network, node, event.network)
        if event.runner_kv is not None:
            kv = event.runner_kv
            changes["node_kv"] = _with(state.node_kv, node, kv) if kv else _without(state.node_kv, node)
        if event.system is not None:
            changes["node_system"] = _with(state.node_system, node, event.system)
        return replace(state, **changes)
    if isinstance(event, NodeTimedOut):
        node = event.node_id
        for inst in state.instances.values():
            assert node not in inst.shard_assignments.node_to_runner, (
                f"NodeTimedOut({node}) while instance {inst.instance_id} still uses it"
            )
        topo = Topology(
            nodes=tuple(n for n in state.topology.nodes if n != node),
            connections=tuple(
                c for c in state.topology.connections if node not in (c.source, c.sink)
            ),
        )
        return replace(
            state,
            topology=topo,
            last_seen=_without(state.last_seen, node),
            node_identities=_without(state.node_identities, node),
            node_memory=_without(state.node_memory, node),
            node_network=_without(state.node_network, node),
            node_system=_without(state.node_system, node),
            node_kv=_without(state.node_kv, node),
            downloads=_without(state.downloads, node),
        )
    if isinstance(event, ConnectionObserved):
        conns = set(state.topology.connections)
        conns.add(event.connection)
        topo = replace(state.topology, connections=tuple(sorted(conns, key=_conn_key)))
        return replace(state, topology=topo)
    if isinstance(event, ConnectionLost):
        topo = replace(
            state.topology,
            connections=tuple(c for c in state.topology.connections if c != event.connection),
        )
        return replace(state, topology=topo)
    if isinstance(event, DownloadCompleted):
        have = state.downloads.get(event.node_id, ())
        if event.model_id in have:
            return state
        models = tuple(sorted((*have, event.model_id)))
        return replace(state, downloads=_with(state.downloads, event.node_id, models))
    if isinstance(event, InstanceCreated):
        inst = event.instance
        assert inst.instance_id not in state.instances, f"instance {inst.instance_id} exists"
        runner_instance = dict(state.runner_instance)
        for runner_id in sorted(inst.shard_assignments.runner_to_shard):
            runner_instance[runner_id] = inst.instance_id
        return replace(
            state,
            instances=_with(state.instances, inst.instance_id, inst),
            runner_instance=runner_instance,
            next_port_offset=state.next_port_offset + 1,
        )
    if isinstance(event, InstanceDeleted):
        iid = event.instance_id
        assert iid in state.instances, f"InstanceDeleted for unknown instance {iid}"
        for task in state.tasks.values():
            assert task.instance_id != iid or task.status == "failed", (
                f"task {task.task_id} still in flight on deleted instance {iid}"
            )
        runners = state.instances[iid].shard_assignments.runner_to_shard
        return replace(
            state,
            instances=_without(state.instances, iid),
            runners={k: v for k, v in state.runners.items() if k not in runners},
            runner_instance={k: v for k, v in state.runner_instance.items() if k not in runners},
            tasks={k: v for k, v in state.tasks.items() if v.instance_id != iid},
        )
    if isinstance(event, RunnerStatusUpdated):
        assert event.runner_id in state.runner_instance, f"runner {event.runner_id} unknown"
        return replace(state, runners=_with(state.runners, event.runner_id, event.status))
    if isinstance(event, RunnerDeleted):
        return replace(state, runners=_without(state.runners, event.runner_id))
    if isinstance(event, TaskCreated):
        task = event.task
        assert task.task_id not in state.tasks, f"task {task.task_id} exists"
        assert task.instance_id in state.instances, f"task on unknown instance {task.instance_id}"
        return replace(state, tasks=_with(state.tasks, task.task_id, task))
    if isinstance(event, TaskStatusUpdated):
        task = state.tasks[event.task_id]
        return replace(
            state, tasks=_with(state.tasks, task.task_id, replace(task, status=event.status))
        )
    if isinstance(event, TaskFailed):
        task = state.tasks[event.task_id]
        failed = replace(task, status="failed", error_message=event.error_message)
        return replace(state, tasks=_with(state.tasks, task.task_id, failed))
    if isinstance(event, TaskDeleted):
        assert event.task_id in state.tasks, f"TaskDeleted for unknown task {event.task_id}"
        return replace(state, tasks=_without(state.tasks, event.task_id))
    if isinstance(event, InstanceStillHosted):
        raise AssertionError("InstanceStillHosted is local only and is never indexed")
    raise AssertionError(f"apply: unknown event {type(event).__name__}")
