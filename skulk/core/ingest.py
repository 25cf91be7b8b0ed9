"""The ingest cap: whether, and how, the master indexes each local event type.

Theory of operation
-------------------
A worker's local events reach the master in order (``Master.on_local_event``);
before one takes an index it passes its type's rule here. Each rule drops
what the state already holds or cannot take, indexes the rest, and acts on
what the index implies:

- task events for tasks the master does not know are dropped (the cap that
  keeps an abandonment storm at a small constant of events per request);
  ``TaskFailed`` is followed by ``TaskDeleted``;
- runner statuses for runners or instances the master does not know are
  dropped; a group-connect timeout re-places the instance, a permanent
  failure fails its tasks;
- an instance a worker still hosts after a failover is re-created if it is
  missing and still fits (invariant 5);
- facts already held (a link, a download, a runner already deleted, a model
  copy unchanged) are not indexed again; telemetry and model copies only from
  the node they describe; a copy update sent before its node saw the master's
  eviction of it is dropped (the node's removal follows).

A rule returns the effects and whether the event was dropped (the master
acknowledges a dropped event, since no indexed event will). Adding a local
event type: a rule here, in ``INGEST_RULES`` (checked at import against
``events.LOCAL_EVENT_TYPES``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from skulk.core import master_policy, placement
from skulk.core.effects import Effect, Log
from skulk.core.events import (
    LOCAL_EVENT_TYPES,
    ConnectionLost,
    ConnectionObserved,
    DownloadCompleted,
    Event,
    InstanceCreated,
    InstanceStillHosted,
    ModelCopyRemoved,
    ModelCopyUpdated,
    NodeGatheredInfo,
    RunnerDeleted,
    RunnerStatusUpdated,
    TaskDeleted,
    TaskFailed,
    TaskStatusUpdated,
)
from skulk.core.instances import GROUP_CONNECT_TIMEOUT, RunnerFailed
from skulk.core.messages import LocalEventMessage

if TYPE_CHECKING:
    from skulk.core.master import Master

__all__ = ["INGEST_RULES", "Verdict"]

Verdict = tuple[list[Effect], bool]
"""The effects of ingesting one local event, and whether it was dropped."""


def _accept(master: Master, now: float, msg: LocalEventMessage, event: Event) -> Verdict:
    return master.index(now, event, msg.origin, msg.origin_idx), False


def _task_event(
    master: Master, now: float, msg: LocalEventMessage, event: TaskStatusUpdated | TaskFailed | TaskDeleted
) -> Verdict:
    assert master.state is not None
    task = master.state.tasks.get(event.task_id)
    if task is None:
        master.dropped_by_ingest_cap += 1
        return [], True
    if isinstance(event, TaskFailed):
        if task.status == "failed":
            return [], True
        effects = master.index(now, event, msg.origin, msg.origin_idx)
        effects += master.index(now, TaskDeleted(task_id=event.task_id, outcome="failed"))
        return effects, False
    if isinstance(event, TaskStatusUpdated) and task.status == event.status:
        return [], True
    return _accept(master, now, msg, event)


def _runner_status(master: Master, now: float, msg: LocalEventMessage, event: RunnerStatusUpdated) -> Verdict:
    state = master.state
    assert state is not None
    if event.runner_id not in state.runner_instance or event.instance_id not in state.instances:
        master.dropped_by_ingest_cap += 1
        return [], True
    if state.runners.get(event.runner_id) == event.status:
        return [], True
    effects = master.index(now, event, msg.origin, msg.origin_idx)
    if isinstance(event.status, RunnerFailed) and event.status.code == GROUP_CONNECT_TIMEOUT:
        effects += master_policy.replace_instance(
            master, now, event.instance_id, event.status.error_message, event.node_id, event.status.unreachable_rank
        )
    elif isinstance(event.status, RunnerFailed) and event.status.permanent:
        effects += master_policy.fail_tasks_of(master, now, event.instance_id, event.status.error_message)
    return effects, False


def _runner_deleted(master: Master, now: float, msg: LocalEventMessage, event: RunnerDeleted) -> Verdict:
    assert master.state is not None
    if event.runner_id not in master.state.runners:
        return [], True
    return _accept(master, now, msg, event)


def _still_hosted(master: Master, now: float, msg: LocalEventMessage, event: InstanceStillHosted) -> Verdict:
    state = master.state
    assert state is not None
    inst = event.instance
    if inst.instance_id in state.instances:
        return [], True
    problem = placement.fits(state, inst)
    if problem is not None:
        return [Log(level="warning", message=f"not re-adopting {inst.instance_id}: {problem}")], True
    return master.index(now, InstanceCreated(instance=inst), msg.origin, msg.origin_idx), False


def _connection_observed(master: Master, now: float, msg: LocalEventMessage, event: ConnectionObserved) -> Verdict:
    assert master.state is not None
    if event.connection in master.state.topology.connections:
        return [], True
    return _accept(master, now, msg, event)


def _connection_lost(master: Master, now: float, msg: LocalEventMessage, event: ConnectionLost) -> Verdict:
    assert master.state is not None
    if event.connection not in master.state.topology.connections:
        return [], True
    return _accept(master, now, msg, event)


def _download(master: Master, now: float, msg: LocalEventMessage, event: DownloadCompleted) -> Verdict:
    assert master.state is not None
    if event.model_id in master.state.downloads.get(event.node_id, ()):
        return [], True
    return _accept(master, now, msg, event)


def _node_info(master: Master, now: float, msg: LocalEventMessage, event: NodeGatheredInfo) -> Verdict:
    if event.node_id != msg.origin:
        return [Log(level="warning", message=f"{msg.origin} reported info for {event.node_id}")], True
    return _accept(master, now, msg, event)


def _copy_updated(master: Master, now: float, msg: LocalEventMessage, event: ModelCopyUpdated) -> Verdict:
    assert master.state is not None
    if event.node_id != msg.origin:
        return [Log(level="warning", message=f"{msg.origin} reported a model copy of {event.node_id}")], True
    held = master.state.model_copies.get(event.node_id, {}).get(event.model_id)
    if held is not None:
        if held.status == "evicting":
            return [], True  # sent before the node saw the eviction; its removal follows
        ours = msgspec.structs.replace(event.copy, since=held.since, last_used_at=held.last_used_at)
        if ours == held:
            return [], True
    return _accept(master, now, msg, event)


def _copy_removed(master: Master, now: float, msg: LocalEventMessage, event: ModelCopyRemoved) -> Verdict:
    assert master.state is not None
    if event.node_id != msg.origin or event.model_id not in master.state.model_copies.get(event.node_id, {}):
        return [], True
    return _accept(master, now, msg, event)


INGEST_RULES: dict[type, Callable[[Master, float, LocalEventMessage, Any], Verdict]] = {
    NodeGatheredInfo: _node_info,
    ConnectionObserved: _connection_observed,
    ConnectionLost: _connection_lost,
    DownloadCompleted: _download,
    InstanceStillHosted: _still_hosted,
    RunnerStatusUpdated: _runner_status,
    RunnerDeleted: _runner_deleted,
    TaskStatusUpdated: _task_event,
    TaskFailed: _task_event,
    TaskDeleted: _task_event,
    ModelCopyUpdated: _copy_updated,
    ModelCopyRemoved: _copy_removed,
}
"""Each local event type's rule; anything else a worker sends is dropped with a warning."""

assert set(INGEST_RULES) == set(LOCAL_EVENT_TYPES), "every local event type needs a rule in INGEST_RULES"
