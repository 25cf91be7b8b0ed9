"""Handlers of Skulk's control endpoints, in Skulk's published wire format.

State-bearing responses (``/state``, ``/instance/{id}``, the instances inside
previews) are encoded with the core codec: camelCase keys and tagged unions as
single-key objects. Commands (place, delete, cancel) go to the master through
``node.submit``, which retries a *pending* answer up to the node's deadline
and then reports ``unavailable`` (503); an impossible placement comes back
rejected with the memory arithmetic in its message (400).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from skulk.api.body import decode_body, read_body
from skulk.api.appstate import app_state
from skulk.api.errors import ApiError
from skulk.api.generation import raise_for_result
from skulk.api.metrics import CONTENT_TYPE, render_metrics
from skulk.api.schemas import (
    CancelResponse,
    DeleteInstanceResponse,
    HealthResponse,
    NodeDiagnostics,
    PlaceInstanceRequest,
    PlaceInstanceResponse,
    RuntimeInfo,
)
from skulk.api.wire import json_response, wire_response
from skulk.core import placement
from skulk.core.codec import to_wire
from skulk.core.commands import CancelTask, DeleteInstance, PlaceInstance
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, derive_id

__all__ = [
    "node_id",
    "state",
    "models",
    "instance_previews",
    "place_instance",
    "get_instance",
    "delete_instance",
    "cancel",
    "node_diagnostics",
    "metrics",
]


async def healthz(request: Request) -> Response:
    """``GET /healthz``: liveness; the one endpoint that never needs an API key."""
    return json_response(HealthResponse(status="ok", node_id=str(app_state(request).node.node_id)))


async def node_id(request: Request) -> Response:
    """``GET /node_id``: this node's id as a bare JSON string."""
    return json_response(str(app_state(request).node.node_id))


async def state(request: Request) -> Response:
    """``GET /state``: the node's replicated state, in Skulk's wire shape."""
    return wire_response(app_state(request).node.state)


async def models(request: Request) -> Response:
    """``GET /models``: the model cards this node knows, by model id."""
    cards = app_state(request).node.cards
    return json_response({"models": [to_wire(cards[k]) for k in sorted(cards)]})


def _excluded(request: Request, name: str) -> tuple[NodeId, ...]:
    """A node-id list from a query: repeated (``?x=a&x=b``) or comma-separated (``?x=a,b``)."""
    out: list[NodeId] = []
    for raw in request.query_params.getlist(name):
        out += [NodeId(part.strip()) for part in raw.split(",") if part.strip()]
    return tuple(dict.fromkeys(out))


async def instance_previews(request: Request) -> Response:
    """``GET /instance/previews?model_id=&excluded_node_ids=``: every candidate placement."""
    api = app_state(request)
    model_id = request.query_params.get("model_id", "").strip()
    if not model_id:
        raise ApiError(400, "the model_id query parameter is required", code="missing_field", param="model_id")
    if model_id not in api.node.cards:
        raise ApiError(404, f"model_id {model_id!r} not found: no model card for it", code="model_not_found", param="model_id")
    excluded = _excluded(request, "excluded_node_ids")
    previews = placement.previews(api.node.state, ModelId(model_id), excluded, api.node.cards, api.node.core_config)
    return json_response(
        {
            "previews": [
                {
                    "sharding": p.sharding,
                    "instance_meta": p.instance_meta,
                    "node_count": p.node_count,
                    "error": p.error,
                    "pending": p.pending,
                    "instance": to_wire(p.instance) if p.instance is not None else None,
                    "memory_delta_by_node": dict(sorted(p.memory_delta_by_node.items())),
                    "transfer_bytes_by_node": dict(sorted(p.transfer_bytes_by_node.items())),
                }
                for p in previews
            ]
        }
    )


async def place_instance(request: Request) -> Response:
    """``POST /place_instance``: ask the master to place a model."""
    api = app_state(request)
    body = decode_body(await read_body(request, api.config.max_body_bytes), PlaceInstanceRequest)
    if not body.model_id.strip():
        raise ApiError(400, "model_id must name a model", code="invalid_value", param="model_id")
    if body.model_id not in api.node.cards:
        raise ApiError(
            404, f"model_id {body.model_id!r} not found: no model card for it (GET /models lists them)",
            code="model_not_found", param="model_id",
        )
    command = PlaceInstance(
        command_id=api.node.new_command_id(),
        model_id=ModelId(body.model_id),
        sharding=body.sharding,
        instance_meta=body.instance_meta,
        min_nodes=body.min_nodes,
        excluded_nodes=tuple(NodeId(n) for n in dict.fromkeys(body.excluded_nodes)),
    )
    result = await api.node.submit(command)
    raise_for_result(result)
    return json_response(
        PlaceInstanceResponse(
            message=f"placed {body.model_id} as instance {result.instance_id}",
            command_id=command.command_id,
            model_id=body.model_id,
            instance_id=result.instance_id,
        )
    )


def _instance_id(request: Request) -> InstanceId:
    return InstanceId(request.path_params["instance_id"])


async def get_instance(request: Request) -> Response:
    """``GET /instance/{instance_id}``: one instance, in Skulk's wire shape."""
    iid = _instance_id(request)
    inst = app_state(request).node.state.instances.get(iid)
    if inst is None:
        raise ApiError(404, f"no instance {iid!r}", code="instance_not_found", param="instance_id")
    return wire_response(inst)


async def delete_instance(request: Request) -> Response:
    """``DELETE /instance/{instance_id}``: stop an instance's runners and forget it."""
    api = app_state(request)
    iid = _instance_id(request)
    if iid not in api.node.state.instances:
        raise ApiError(404, f"no instance {iid!r}", code="instance_not_found", param="instance_id")
    command = DeleteInstance(command_id=api.node.new_command_id(), instance_id=iid)
    result = await api.node.submit(command)
    raise_for_result(result)
    return json_response(DeleteInstanceResponse(message=f"deleted instance {iid}", command_id=command.command_id, instance_id=iid))


async def cancel(request: Request) -> Response:
    """``POST /v1/cancel/{command_id}``: cancel a generation, from any node.

    The request's own stream (if it is open on this node) ends with
    ``finish_reason: "cancelled"``; the master deletes the task wherever it runs.
    """
    api = app_state(request)
    target = CommandId(request.path_params["command_id"])
    if not target.strip():
        raise ApiError(400, "command_id must not be empty", code="invalid_value", param="command_id")
    api.mark_cancelled(target)
    api.abandon(target)
    # Also tell the master directly: the request may have been accepted by another node.
    command = CancelTask(command_id=CommandId(derive_id("cancel-api", target, api.node.new_command_id())), target=target)
    result = await api.node.submit(command)
    raise_for_result(result)
    return json_response(CancelResponse(message=result.message or f"cancelled {target}", command_id=target))


async def node_diagnostics(request: Request) -> Response:
    """``GET /v1/diagnostics/node``: who this node is, who is master, and its runners."""
    node = app_state(request).node
    session = node.session
    runtime = RuntimeInfo(
        master_node_id=str(session.master) if session is not None else None,
        node_id=str(node.node_id),
        is_master=node.is_master,
        friendly_name=node.friendly_name,
        skulk_version=node.version,
        session_clock=session.clock if session is not None else None,
        last_index=node.state.last_index,
    )
    runners = to_wire(list(node.runner_diagnostics()))
    return json_response(NodeDiagnostics(runtime=runtime, runners=runners))


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text exposition."""
    api = app_state(request)
    return Response(render_metrics(api.node, api.metrics), media_type=CONTENT_TYPE)
