"""The OpenAPI 3.1 document, generated from the route table and the record types.

Theory of operation
-------------------
``skulk.api.jsonschema.SchemaBuilder`` turns every request and response type
of ``ENDPOINTS`` into JSON Schema components in the codec's own shape (tagged
unions as single-key objects, camelCase core records). The paths come from
the same table the router mounts, so the document describes exactly what is
served.
"""

from __future__ import annotations

import re
from typing import Any

import skulk
from skulk.api.errors import ErrorEnvelope
from skulk.api.jsonschema import SchemaBuilder
from skulk.api.routes import ENDPOINTS, Endpoint, openapi_path

__all__ = ["build_openapi", "REF_TEMPLATE"]

REF_TEMPLATE = "#/components/schemas/{name}"

_STATUS_TEXT = {
    400: "Invalid request (the error's param names the field)",
    404: "Unknown model, instance or route",
    405: "Method not allowed",
    409: "The request was cancelled before it was accepted",
    413: "Request body over the size limit",
    500: "Internal error",
    502: "The node lost the request's stream",
    503: "The cluster cannot answer now (no master, or information still pending); retry",
}


def _types() -> list[Any]:
    seen: list[Any] = [ErrorEnvelope]
    for ep in ENDPOINTS:
        for tp in (ep.request, ep.response, ep.stream_item, ep.error_type):
            if tp is not None and tp is not str and tp not in seen:
                seen.append(tp)
    return seen


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(ep: Endpoint, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    path = openapi_path(ep.path)
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"\{(\w+)\}", path)
    ]
    params += [
        {"name": q.name, "in": "query", "required": q.required, "description": q.description, "schema": {"type": q.type}}
        for q in ep.query
    ]
    doc = (ep.handler.__doc__ or "").strip()
    op: dict[str, Any] = {
        "operationId": f"{ep.method.lower()}_{re.sub(r'[^a-zA-Z0-9]+', '_', path).strip('_')}",
        "summary": ep.summary,
        "description": doc,
        "tags": [ep.tag],
    }
    if params:
        op["parameters"] = params
    if ep.request is not None:
        op["requestBody"] = {"required": True, "content": _json_content(refs[ep.request])}
    if ep.response is str:
        ok_schema: dict[str, Any] = {"type": "string"}
    else:
        ok_schema = refs[ep.response] if ep.response is not None else {}
    content: dict[str, Any] = {ep.response_media: {"schema": ok_schema}}
    if ep.stream_item is not None:
        content["text/event-stream"] = {
            "schema": {
                "type": "string",
                "description": (
                    "With `stream: true`: Server-Sent Events. `: command_id <id>` first; then one `data:` event "
                    "per chunk (its schema is x-itemSchema); an error becomes a `data: {\"error\": {...}}` event; "
                    "`: generation_stats {json}` after the final chunk; `data: [DONE]` last."
                ),
            },
            # OpenAPI 3.1 has no itemSchema (3.2 does): an extension keeps the document valid.
            "x-itemSchema": refs[ep.stream_item],
        }
    responses: dict[str, Any] = {"200": {"description": "OK", "content": content}}
    for status in sorted(set(ep.errors)):
        responses[str(status)] = {
            "description": _STATUS_TEXT.get(status, "Error"),
            "content": _json_content(refs[ep.error_type or ErrorEnvelope]),
        }
    op["responses"] = responses
    return op


def build_openapi() -> dict[str, Any]:
    """The whole OpenAPI document as builtins (deterministic for a given code version)."""
    builder = SchemaBuilder(REF_TEMPLATE)
    refs = {tp: builder.schema(tp) for tp in _types()}
    components = builder.components
    paths: dict[str, dict[str, Any]] = {}
    for ep in ENDPOINTS:
        paths.setdefault(openapi_path(ep.path), {})[ep.method.lower()] = _operation(ep, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Skulk API",
            "version": skulk.__version__,
            "description": (
                "OpenAI-compatible inference and Skulk's cluster control surface. Every error is "
                '`{"error": {"message", "type", "param", "code"}}`. Cluster records use camelCase keys and '
                'tagged unions as single-key objects (`{"MlxRingInstance": {...}}`).'
            ),
        },
        "paths": paths,  # route-table order: OpenAI endpoints first
        "components": {"schemas": dict(sorted(components.items()))},
    }
