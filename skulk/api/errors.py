"""Errors in the OpenAI envelope, and the one table that maps error codes to HTTP.

Theory of operation
-------------------
Every error the API returns, whatever raised it, has the body::

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

Handlers raise ``ApiError``; the app's exception handlers render it (and
Starlette's own ``HTTPException`` for unknown routes and methods) with
``error_response``. Codes that come from the core (``CommandResult.code``,
``ChunkError.code``) go through ``status_for_code`` so one code always gets one
HTTP status, wherever it surfaced.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from starlette.responses import Response

__all__ = [
    "ApiError",
    "ErrorBody",
    "ErrorEnvelope",
    "error_body",
    "error_response",
    "status_for_code",
    "type_for_status",
    "CODE_STATUS",
]


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """The inner object of the OpenAI error envelope."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    error: ErrorBody


# One HTTP status per error code, for codes from the API itself and from the core.
CODE_STATUS: Mapping[str, int] = {
    # request shape (the API)
    "invalid_json": 400,
    "invalid_encoding": 400,
    "nesting_too_deep": 400,
    "invalid_type": 400,
    "missing_field": 400,
    "invalid_value": 400,
    "unsupported_value": 400,
    "request_too_large": 413,
    # context admission (the API before dispatch, or a runner)
    "context_length_exceeded": 400,
    # placement (the master; see skulk.core.placement.PlacementRefused)
    "invalid_request": 400,
    "insufficient_memory": 400,
    "insufficient_disk": 400,
    # model files (the store)
    "model_in_use": 409,
    "store_not_configured": 503,
    "hub_error": 400,
    "tensor_unsupported": 400,
    # lookups
    "model_not_found": 404,
    "instance_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    # the cluster cannot answer now: retry later
    "unavailable": 503,
    "session_changed": 503,
    "master_unreachable": 503,
    "instance_failed": 503,
    "no_master": 503,
    "no_nodes": 503,
    "pending_telemetry": 503,
    "no_ring": 503,
    # a runner's KV budget is full: the client should retry after Retry-After
    "kv_budget_exhausted": 503,
    # the node lost a stream it had accepted
    "stream_lost": 502,
    "task_failed": 500,
    "internal_error": 500,
    # the request was cancelled before it was accepted
    "cancelled": 409,
}


def status_for_code(code: str | None, default: int = 500) -> int:
    """HTTP status for an error ``code`` (core or API); ``default`` when unknown."""
    if code is None:
        return default
    return CODE_STATUS.get(code, default)


def type_for_status(status: int) -> str:
    """The OpenAI error ``type`` for an HTTP status (4xx: the caller's fault)."""
    assert 400 <= status <= 599, status
    if status == 404:
        return "invalid_request_error"  # OpenAI answers unknown models with this type
    if status == 503:
        return "service_unavailable"
    if status < 500:
        return "invalid_request_error"
    return "server_error"


class ApiError(Exception):
    """An error to return to the client as an OpenAI envelope.

    ``status`` is the HTTP status; ``param`` names the offending request field
    (dotted path such as ``messages[0].content``) where there is one.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        assert 400 <= status <= 599, status
        assert message, "an error must say what went wrong"
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or type_for_status(status)
        self.headers = dict(headers or {})

    @classmethod
    def from_code(cls, code: str | None, message: str, *, param: str | None = None, type: str | None = None) -> ApiError:
        """An error whose status follows the code table (500 for an unknown code)."""
        return cls(status_for_code(code), message, code=code, param=param, type=type)

    def body(self) -> ErrorBody:
        return ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> dict[str, object]:
    """The envelope as builtins (for SSE error events)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_ENCODER = msgspec.json.Encoder()


def error_response(error: ApiError) -> Response:
    """Render ``error`` as a JSON response with its status and headers."""
    payload = _ENCODER.encode(ErrorEnvelope(error=error.body()))
    return Response(payload, status_code=error.status, media_type="application/json", headers=error.headers)
