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

Each event type has one transition in ``TRANSITIONS``; an import-time check
fails when an event type has none (adding an event: its record in
``events.py``, its transition here, and, if workers raise it, its ingest rule
in ``master.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, get_args

import msgspec

from skulk.core.cards import ModelCard
from skulk.core.codec import from_wire, to_wire, wire_key
from skulk.core.events import (
    ConnectionLost,
    ConnectionObserved,
    DownloadCompleted,
    Event,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    InstanceStillHosted,
    ModelCardAdded,
    ModelCopyRemoved,
    ModelCopyUpdated,
    ModelEvictionRequested,
    NodeGatheredInfo,
    NodeTimedOut,
    RunnerDeleted,
    RunnerStatusUpdated,
    SessionStarted,
    StoreDownloadRequested,
    TaskCreated,
    TaskDeleted,
    TaskFailed,
    TaskStatusUpdated,
)
from skulk.core.files import Coverage, DiskInfo, ModelCopy
from skulk.core.ids import InstanceId, ModelId, NodeId, RunnerId, TaskId
from skulk.core.instances import Instance, KvUse, RunnerStatus
from skulk.core.telemetry import MemoryInfo, NetworkInfo, NodeIdentity, SystemInfo
from skulk.core.topology import Connection, Topology
from skulk.core.records import Record
from skulk.core.session import Session
from skulk.core.tasks import Task

__all__ = [
    "State",
    "apply",
    "digest",
    "encode_state",
    "decode_state",
    "hosting_nodes",
    "EMPTY_STATE",
    "TRANSITIONS",
    "LOCAL_ONLY",
]


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
    # Model files: each node's copy of each model (skulk.core.files), each node's models disk,
    # and the cards added at run time (POST /models/add), which every node may place.
    model_copies: dict[NodeId, dict[ModelId, ModelCopy]] = {}
    node_disk: dict[NodeId, DiskInfo] = {}
    model_cards: dict[ModelId, ModelCard] = {}


EMPTY_STATE = State()

_ENCODER = msgspec.msgpack.Encoder(order="sorted")
_replace = msgspec.structs.replace


def encode_state(state: State) -> bytes:
    """Canonical bytes of ``state`` (dict keys sorted): msgpack of ``to_wire(state)``.

    States are immutable and share their unchanged parts (``apply`` copies only
    the mappings an event changes, and never mutates a record): the encoded
    bytes of a record or a mapping met in an earlier state are reused
    (``_encoded``, spliced in as ``msgspec.Raw``), so persisting a state costs
    what changed since, not its size. The bytes are exactly those of encoding
    ``to_wire(state)`` whole (``tests/core/test_state.py``).
    """
    memo = _ENCODED
    if len(memo) > _ENCODED_MAX:
        memo.clear()
    return _ENCODER.encode({key: _encoded(getattr(state, name), memo) for name, key in _STATE_FIELDS})


def _encoded(value: Any, memo: dict[int, tuple[Any, msgspec.Raw]]) -> Any:
    """``value``'s wire form, as already-encoded bytes when it is a record or a mapping (memoised by identity)."""
    if type(value) is dict:
        hit = memo.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        raw = msgspec.Raw(_ENCODER.encode({wire_key(k): _encoded(v, memo) for k, v in value.items()}))
    elif isinstance(value, msgspec.Struct):
        hit = memo.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        raw = msgspec.Raw(_ENCODER.encode(to_wire(value)))
    else:
        return to_wire(value)
    memo[id(value)] = (value, raw)  # the value is kept, so its id is not reused while memoised
    return raw


_ENCODED: dict[int, tuple[Any, msgspec.Raw]] = {}
_ENCODED_MAX = 50_000
_STATE_FIELDS: tuple[tuple[str, str], ...] = tuple((f.name, f.encode_name) for f in msgspec.structs.fields(State))


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
    """A copy of ``mapping`` without ``key`` (same order): a C-level copy, then one deletion."""
    out = dict(mapping)
    out.pop(key, None)
    return out


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
            model_copies={n: dict(m) for n, m in carry.model_copies.items()},
            model_cards=dict(carry.model_cards),
        )
    assert state.session is not None, "no session: the first event of a session must be SessionStarted"
    assert indexed.index == state.last_index + 1, (
        f"apply expected index {state.last_index + 1}, got {indexed.index}"
    )
    transition = TRANSITIONS.get(type(event))
    assert transition is not None, f"apply: {type(event).__name__} never takes an index"
    state = transition(state, event, indexed.at)
    return _replace(state, last_index=indexed.index)


def _conn_key(c: Connection) -> tuple[str, str, str, str]:
    return (c.source, c.sink, c.address, c.kind)


def _node_info(state: State, event: NodeGatheredInfo, at: float) -> State:
    node = event.node_id
    changes: dict[str, object] = {"last_seen": _with(state.last_seen, node, at)}
    if node not in state.topology.nodes:
        changes["topology"] = _replace(state.topology, nodes=tuple(sorted((*state.topology.nodes, node))))
    if event.identity is not None:
        changes["node_identities"] = _with(state.node_identities, node, event.identity)
    if event.memory is not None:
        changes["node_memory"] = _with(state.node_memory, node, event.memory)
    if event.network is not None:
        changes["node_network"] = _with(state.node_network, node, event.network)
    if event.system is not None:
        changes["node_system"] = _with(state.node_system, node, event.system)
    if event.disk is not None:
        changes["node_disk"] = _with(state.node_disk, node, event.disk)
    if event.runner_kv is not None:
        kv = event.runner_kv
        changes["node_kv"] = _with(state.node_kv, node, kv) if kv else _without(state.node_kv, node)
    return _replace(state, **changes)


def _node_timed_out(state: State, event: NodeTimedOut, at: float) -> State:
    node = event.node_id
    for inst in state.instances.values():
        assert node not in inst.shard_assignments.node_to_runner, (
            f"NodeTimedOut({node}) while instance {inst.instance_id} still uses it"
        )
    topo = Topology(
        nodes=tuple(n for n in state.topology.nodes if n != node),
        connections=tuple(c for c in state.topology.connections if node not in (c.source, c.sink)),
    )
    return _replace(
        state,
        topology=topo,
        last_seen=_without(state.last_seen, node),
        node_identities=_without(state.node_identities, node),
        node_memory=_without(state.node_memory, node),
        node_network=_without(state.node_network, node),
        node_system=_without(state.node_system, node),
        node_kv=_without(state.node_kv, node),
        downloads=_without(state.downloads, node),
        node_disk=_without(state.node_disk, node),
        model_copies=_without(state.model_copies, node),
    )


def _connection_observed(state: State, event: ConnectionObserved, at: float) -> State:
    conns = set(state.topology.connections)
    conns.add(event.connection)
    return _replace(state, topology=_replace(state.topology, connections=tuple(sorted(conns, key=_conn_key))))


def _connection_lost(state: State, event: ConnectionLost, at: float) -> State:
    kept = tuple(c for c in state.topology.connections if c != event.connection)
    return _replace(state, topology=_replace(state.topology, connections=kept))


def _download_completed(state: State, event: DownloadCompleted, at: float) -> State:
    have = state.downloads.get(event.node_id, ())
    if event.model_id in have:
        return state
    models = tuple(sorted((*have, event.model_id)))
    return _replace(state, downloads=_with(state.downloads, event.node_id, models))


def _instance_created(state: State, event: InstanceCreated, at: float) -> State:
    inst = event.instance
    assert inst.instance_id not in state.instances, f"instance {inst.instance_id} exists"
    runner_instance = dict(state.runner_instance)
    for runner_id in sorted(inst.shard_assignments.runner_to_shard):
        runner_instance[runner_id] = inst.instance_id
    return _replace(
        state,
        instances=_with(state.instances, inst.instance_id, inst),
        runner_instance=runner_instance,
        next_port_offset=state.next_port_offset + 1,
        model_copies=_touched(state.model_copies, inst, at),
    )


def _instance_deleted(state: State, event: InstanceDeleted, at: float) -> State:
    iid = event.instance_id
    assert iid in state.instances, f"InstanceDeleted for unknown instance {iid}"
    for task in state.tasks.values():
        assert task.instance_id != iid or task.status == "failed", (
            f"task {task.task_id} still in flight on deleted instance {iid}"
        )
    runners = state.instances[iid].shard_assignments.runner_to_shard
    return _replace(
        state,
        model_copies=_touched(state.model_copies, state.instances[iid], at),
        instances=_without(state.instances, iid),
        runners={k: v for k, v in state.runners.items() if k not in runners},
        runner_instance={k: v for k, v in state.runner_instance.items() if k not in runners},
        tasks={k: v for k, v in state.tasks.items() if v.instance_id != iid},
    )


def _runner_status_updated(state: State, event: RunnerStatusUpdated, at: float) -> State:
    assert event.runner_id in state.runner_instance, f"runner {event.runner_id} unknown"
    return _replace(state, runners=_with(state.runners, event.runner_id, event.status))


def _runner_deleted(state: State, event: RunnerDeleted, at: float) -> State:
    return _replace(state, runners=_without(state.runners, event.runner_id))


def _task_created(state: State, event: TaskCreated, at: float) -> State:
    task = event.task
    assert task.task_id not in state.tasks, f"task {task.task_id} exists"
    assert task.instance_id in state.instances, f"task on unknown instance {task.instance_id}"
    return _replace(state, tasks=_with(state.tasks, task.task_id, task))


def _task_status_updated(state: State, event: TaskStatusUpdated, at: float) -> State:
    task = state.tasks[event.task_id]
    return _replace(state, tasks=_with(state.tasks, task.task_id, _replace(task, status=event.status)))


def _task_failed(state: State, event: TaskFailed, at: float) -> State:
    task = state.tasks[event.task_id]
    failed = _replace(task, status="failed", error_message=event.error_message)
    return _replace(state, tasks=_with(state.tasks, task.task_id, failed))


def _task_deleted(state: State, event: TaskDeleted, at: float) -> State:
    assert event.task_id in state.tasks, f"TaskDeleted for unknown task {event.task_id}"
    return _replace(state, tasks=_without(state.tasks, event.task_id))


def _touched(copies: dict[NodeId, dict[ModelId, ModelCopy]], inst: Instance, at: float) -> dict:
    """``copies`` with the LRU clock of ``inst``'s model moved to ``at`` on its hosting nodes."""
    model = inst.shard_assignments.model_id
    out = copies
    for node in sorted(inst.shard_assignments.node_to_runner):
        copy = copies.get(node, {}).get(model)
        if copy is not None:
            out = _with(out, node, _with(out[node], model, _replace(copy, last_used_at=at)))
    return out


def _copy_updated(state: State, event: ModelCopyUpdated, at: float) -> State:
    mine = state.model_copies.get(event.node_id, {})
    old = mine.get(event.model_id)
    copy = event.copy
    since = old.since if old is not None and old.status == copy.status else at
    last_used = old.last_used_at if old is not None else at
    copy = _replace(copy, since=since, last_used_at=last_used)
    return _replace(state, model_copies=_with(state.model_copies, event.node_id, _with(mine, event.model_id, copy)))


def _copy_removed(state: State, event: ModelCopyRemoved, at: float) -> State:
    mine = state.model_copies.get(event.node_id, {})
    if event.model_id not in mine:
        return state
    rest = _without(mine, event.model_id)
    copies = _with(state.model_copies, event.node_id, rest) if rest else _without(state.model_copies, event.node_id)
    return _replace(state, model_copies=copies)


def _eviction_requested(state: State, event: ModelEvictionRequested, at: float) -> State:
    mine = state.model_copies.get(event.node_id, {})
    copy = mine.get(event.model_id)
    assert copy is not None, f"eviction of {event.model_id} requested on {event.node_id}, which holds no copy"
    for inst in state.instances.values():
        assert not (inst.shard_assignments.model_id == event.model_id
                    and event.node_id in inst.shard_assignments.node_to_runner), (
            f"eviction of {event.model_id} on {event.node_id} while instance {inst.instance_id} uses it"
        )
    evicting = _replace(copy, status="evicting", error=event.reason, since=at)
    return _replace(state, model_copies=_with(state.model_copies, event.node_id, _with(mine, event.model_id, evicting)))


def _store_download_requested(state: State, event: StoreDownloadRequested, at: float) -> State:
    mine = state.model_copies.get(event.node_id, {})
    old = mine.get(event.model_id)
    if old is not None and old.status not in ("failed",):
        return state
    coverage = old.coverage if old is not None else Coverage(n_layers=event.n_layers)
    copy = ModelCopy(status="requested", coverage=coverage, source="hub", since=at,
                     last_used_at=old.last_used_at if old is not None else at,
                     bytes=old.bytes if old is not None else 0, files=old.files if old is not None else ())
    return _replace(state, model_copies=_with(state.model_copies, event.node_id, _with(mine, event.model_id, copy)))


def _card_added(state: State, event: ModelCardAdded, at: float) -> State:
    return _replace(state, model_cards=_with(state.model_cards, event.card.model_id, event.card))


_Transition = Callable[[State, Any, float], State]

TRANSITIONS: dict[type, _Transition] = {
    NodeGatheredInfo: _node_info,
    NodeTimedOut: _node_timed_out,
    ConnectionObserved: _connection_observed,
    ConnectionLost: _connection_lost,
    DownloadCompleted: _download_completed,
    InstanceCreated: _instance_created,
    InstanceDeleted: _instance_deleted,
    RunnerStatusUpdated: _runner_status_updated,
    RunnerDeleted: _runner_deleted,
    TaskCreated: _task_created,
    TaskStatusUpdated: _task_status_updated,
    TaskFailed: _task_failed,
    TaskDeleted: _task_deleted,
    ModelCopyUpdated: _copy_updated,
    ModelCopyRemoved: _copy_removed,
    ModelEvictionRequested: _eviction_requested,
    StoreDownloadRequested: _store_download_requested,
    ModelCardAdded: _card_added,
}
"""How each indexed event changes the state, by event type (``SessionStarted`` resets it in ``apply``)."""

# Events that never take an index, so they have no transition: the master
# turns ``InstanceStillHosted`` into ``InstanceCreated`` or drops it.
LOCAL_ONLY: tuple[type, ...] = (InstanceStillHosted,)

_missing = sorted(t.__name__ for t in get_args(Event) if t not in TRANSITIONS and t not in LOCAL_ONLY and t is not SessionStarted)
assert not _missing, f"events without a state transition: {_missing}"
del _missing
