"""Reading and validating request bodies: bounded, strict, and every error names its field.

Theory of operation
-------------------
``read_body`` reads at most ``limit_bytes`` (refusing early on a larger
``Content-Length`` and, for chunked uploads, as soon as the running total
passes the limit): 413. ``decode_body`` turns bytes into a typed msgspec
record: invalid UTF-8 (checked first, by ``check_utf8``), invalid JSON, nesting too deep, wrong
types, missing fields and values out of range are each a 400 whose ``param``
is the path msgspec reports (``messages[0].content``).

Typed decoding bounds nesting by itself: a request record has no ``Any``
field, so a deep array where a string belongs fails at the first level. What
remains (deep values under *unknown* keys, which are skipped) is caught as
``RecursionError`` and refused the same way.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec
from starlette.requests import Request

from skulk.api.errors import ApiError

__all__ = ["read_body", "check_utf8", "decode_body", "param_from_validation"]

T = TypeVar("T")

_AT_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`")


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The request body, or ``ApiError(413)`` once it is known to exceed ``limit_bytes``."""
    assert limit_bytes > 0, limit_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise ApiError(400, f"invalid Content-Length header {declared!r}", code="invalid_value") from None
        if declared_bytes > limit_bytes:
            raise _too_large(declared_bytes, limit_bytes)
    parts: list[bytes] = []
    total = 0
    async for piece in request.stream():
        total += len(piece)
        if total > limit_bytes:
            raise _too_large(total, limit_bytes, at_least=True)
        parts.append(piece)
    return b"".join(parts)


def _too_large(size: int, limit: int, *, at_least: bool = False) -> ApiError:
    size_text = f"at least {size:,}" if at_least else f"{size:,}"
    return ApiError(
        413,
        f"request body is {size_text} bytes, over this node's limit of {limit:,} bytes "
        "(SKULK_API_MAX_BODY_BYTES)",
        code="request_too_large",
    )


def param_from_validation(message: str) -> tuple[str, str | None]:
    """Split a msgspec error into (text without the path, dotted param or None).

    A missing field is named by its own path: ``messages[0].content``, not
    the object that lacks it.
    """
    match = _AT_PATH.search(message)
    text = message if match is None else message[: match.start()]
    path = "" if match is None else match.group("path").lstrip(".")
    missing = _MISSING.match(text)
    if missing is not None:
        path = f"{path}.{missing.group('field')}" if path else missing.group("field")
    return text, (path or None)


def check_utf8(raw: bytes) -> None:
    """Refuse ``raw`` with ``ApiError(400, invalid_encoding)`` unless it is strict UTF-8.

    Checked here, with Python's strict codec (which also refuses overlong
    forms and encoded surrogates), rather than inferred from the JSON
    decoder's exception: msgspec reported invalid UTF-8 as
    ``UnicodeDecodeError`` up to 0.22 and as a ``msgspec.DecodeError`` from
    0.23, and which class a library raises is not its documented interface.
    """
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, f"the request body is not valid UTF-8 (byte {exc.start}: {exc.reason})", code="invalid_encoding"
        ) from None


def decode_body(raw: bytes, tp: type[T]) -> T:
    """Decode JSON ``raw`` into ``tp``; every failure is an ``ApiError(400)`` naming the field."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    check_utf8(raw)
    try:
        return msgspec.json.decode(raw, type=tp)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="nesting_too_deep") from None
    except msgspec.ValidationError as exc:
        text, param = param_from_validation(str(exc))
        if text.startswith("Object missing required field"):
            code = "missing_field"
        elif ", got `" in text:
            code = "invalid_type"  # msgspec: "Expected `int`, got `str`"
        else:
            code = "invalid_value"  # a constraint: "Expected `int` >= 1"
        where = f" at `{param}`" if param else ""
        raise ApiError(400, f"invalid request{where}: {text}", code=code, param=param) from None
    except msgspec.DecodeError as exc:
        if "UTF-8" in str(exc):  # msgspec reports bad UTF-8 inside a string as a decode error
            raise ApiError(400, f"the request body is not valid UTF-8: {exc}", code="invalid_encoding") from None
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
