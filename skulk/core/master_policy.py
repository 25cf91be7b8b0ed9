"""What the master decides on its own: auto-placement, re-placement, failing tasks, pruning.

Theory of operation
-------------------
Besides indexing what it is told, the master of a session acts on its own for
a few things; each is a function of the master's state that indexes events
through ``Master.index``:

- ``auto_place``: each model in ``CoreConfig.auto_place`` is placed once per
  session when the state has none, as soon as telemetry makes it placeable;
- ``replace_instance``: an instance whose group connect timed out is removed
  and placed again on a fresh port, avoiding the failing link when another
  ring exists;
- ``fail_tasks_of``: the in-flight tasks of an instance whose runner failed
  for good end with ``TaskFailed``;
- ``prune``: nodes silent past ``node_timeout_s`` are removed, with their
  instances, but not during the ``prune_grace_s`` after a session starts (the
  topology is still settling); carried-over instances whose hosts never
  reported in this session go too;
- ``evict_over_budget``: a node whose model copies take more disk than its
  budget (``DiskInfo.budget_bytes``, ``SKULK_MODELS_DISK_BUDGET``) is told to
  evict its least recently used copies that no placed instance uses, oldest
  ``last_used_at`` first, until it fits (checked with pruning).

Invariants kept: whenever an instance or node is removed, ``TaskFailed`` is
indexed for each of its in-flight tasks first (``runner_policy``'s removal
events); nothing here runs on a deposed master (``Master.index`` asserts it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from skulk.core import interconnect, placement
from skulk.core.commands import PlaceInstance
from skulk.core.effects import Effect, Log
from skulk.core.events import Event, InstanceCreated, ModelEvictionRequested, TaskDeleted, TaskFailed
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, derive_id
from skulk.core.runner_policy import instance_removal_events, node_removal_events
from skulk.core.state import hosting_nodes

if TYPE_CHECKING:
    from skulk.core.master import Master

__all__ = ["auto_place", "replace_instance", "fail_tasks_of", "prune", "evict_over_budget"]


def auto_place(master: Master, now: float) -> list[Effect]:
    """Place each ``config.auto_place`` model the state lacks, once per session.

    Called as telemetry arrives (placement needs memory readings), so a
    single node serves its default model as soon as it knows its memory.
    "Pending" keeps the model for a later try; placed, already present or
    impossible settles it (a deleted instance is not re-placed until the
    next session).
    """
    state = master.state
    assert state is not None
    effects: list[Effect] = []
    for model_id in list(master.auto_pending):
        if any(i.shard_assignments.model_id == model_id for i in state.instances.values()):
            master.auto_pending.remove(model_id)
            continue
        command = PlaceInstance(
            command_id=CommandId(derive_id("auto-place", master.session.clock, master.session.master, model_id)),
            model_id=ModelId(model_id),
        )
        outcome = placement.place(state, command, master.cards, master.config)
        if isinstance(outcome, placement.PlacementRefused):
            if not outcome.pending:
                master.auto_pending.remove(model_id)
                effects.append(Log(level="error", message=f"cannot auto-place {model_id}: {outcome.message}"))
            continue
        master.auto_pending.remove(model_id)
        effects += master.index(now, InstanceCreated(instance=outcome.instance, command_id=command.command_id))
        effects.append(Log(level="info", message=f"auto-placed {model_id} as {outcome.instance.instance_id}"))
        state = master.state
        assert state is not None
    return effects


def fail_tasks_of(master: Master, now: float, instance_id: InstanceId, reason: str) -> list[Effect]:
    state = master.state
    assert state is not None
    events: list[Event] = []
    for task_id in sorted(state.tasks):
        task = state.tasks[task_id]
        if task.instance_id == instance_id and task.status != "failed":
            events.append(TaskFailed(task_id=task_id, error_message=f"instance failed: {reason}"))
            events.append(TaskDeleted(task_id=task_id, outcome="failed"))
    return master.index_all(now, events)


def replace_instance(
    master: Master,
    now: float,
    instance_id: InstanceId,
    reason: str,
    reporter: NodeId,
    unreachable_rank: int | None = None,
) -> list[Effect]:
    """Re-place an instance whose group connect failed, on a fresh port.

    ``unreachable_rank`` is the rank the reporting runner could not reach,
    when it says (see ``interconnect.diagnose_connect_failure``).

    The link the failing hop used, in both directions, is avoided when
    another ring exists (probes may still answer on an address whose ring
    ports are blocked, or not yet have noticed a dead cable); when it is the
    only way, the fresh port alone is tried.
    """
    state = master.state
    assert state is not None
    old = state.instances.get(instance_id)
    if old is None:
        return []
    diagnosis = interconnect.diagnose_connect_failure(
        state,
        old,
        reporting_node=reporter,
        deadline_s=master.config.group_connect_deadline_s,
        unreachable_rank=unreachable_rank,
    )
    effects = master.index_all(now, instance_removal_events(state, instance_id, f"re-placing: {reason}"))
    assert master.state is not None
    outcome: placement.Placed | placement.PlacementRefused = placement.PlacementRefused(
        message="", code="", pending=False
    )
    if diagnosis.avoid_connections:
        outcome = placement.replace(
            master.state, old, master.cards, master.config, reason=reason, avoid_connections=diagnosis.avoid_connections
        )
    if not isinstance(outcome, placement.Placed):
        outcome = placement.replace(master.state, old, master.cards, master.config, reason=reason)
    if isinstance(outcome, placement.PlacementRefused):
        effects.append(Log(level="error", message=f"could not re-place {instance_id}: {outcome.message}"))
        return effects
    effects += master.index(now, InstanceCreated(instance=outcome.instance))
    effects.append(
        Log(level="warning", message=f"re-placed {instance_id} as {outcome.instance.instance_id}: {reason}")
    )
    return effects


def prune(master: Master, now: float) -> list[Effect]:
    """Index the removal of nodes silent past ``node_timeout_s`` (not during the grace after a session starts)."""
    effects: list[Effect] = []
    if now - master.started_at < master.config.prune_grace_s:
        return effects
    state = master.state
    assert state is not None
    cutoff = now - master.config.node_timeout_s
    gone = sorted(n for n, seen in state.last_seen.items() if seen < cutoff and n != master.node_id)
    for node in gone:
        assert master.state is not None
        effects += master.index_all(now, node_removal_events(master.state, node, "no telemetry"))
    # Carried-over instances whose hosts never reported in this session are gone too.
    assert master.state is not None
    present = set(master.state.topology.nodes)
    for iid in sorted(master.state.instances):
        hosts = hosting_nodes(master.state.instances[iid])
        missing = [n for n in hosts if n not in present]
        if missing:
            effects += master.index_all(
                now,
                instance_removal_events(master.state, iid, f"hosting node(s) {', '.join(missing)} never reported"),
            )
    return effects


def evict_over_budget(master: Master, now: float) -> list[Effect]:
    """Evict least recently used, unused copies on every node over its models disk budget."""
    state = master.state
    assert state is not None
    effects: list[Effect] = []
    for node in sorted(state.node_disk):
        disk = state.node_disk[node]
        if disk.budget_bytes <= 0:
            continue
        copies = state.model_copies.get(node, {})
        used = disk.models_bytes - sum(c.bytes for c in copies.values() if c.status == "evicting")
        if used <= disk.budget_bytes:
            continue
        in_use = {
            inst.shard_assignments.model_id
            for inst in state.instances.values()
            if node in inst.shard_assignments.node_to_runner
        }
        idle = sorted(
            (c.last_used_at, model)
            for model, c in copies.items()
            if model not in in_use and c.status in ("verified", "staged", "failed") and c.bytes > 0
        )
        for _, model in idle:
            if used <= disk.budget_bytes:
                break
            used -= copies[model].bytes
            reason = f"over the models disk budget of {node} ({disk.budget_bytes} bytes); least recently used"
            effects += master.index(now, ModelEvictionRequested(node_id=node, model_id=model, reason=reason))
            effects.append(Log(level="info", message=f"evicting {model} from {node}: {reason}"))
    return effects
