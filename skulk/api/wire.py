"""JSON responses: API records via msgspec, replicated-state records via Skulk's wire codec.

Two encoders on purpose: API records (OpenAI shapes, control responses) are
plain msgspec structs and encode as declared; core records must go through
``skulk.core.codec.to_wire`` so tagged unions appear as single-key objects
(``{"MlxRingInstance": {...}}``), Skulk's published wire format.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

from skulk.core.codec import to_wire

__all__ = ["json_response", "wire_response", "JSON"]

JSON = "application/json"
_ENCODER = msgspec.json.Encoder()


def json_response(payload: Any, status_code: int = 200) -> Response:
    """``payload`` (an API record or builtins) as a JSON response."""
    return Response(_ENCODER.encode(payload), status_code=status_code, media_type=JSON)


def wire_response(record: Any, status_code: int = 200) -> Response:
    """A core record (or builtins holding some) in Skulk's wire shape."""
    return Response(_ENCODER.encode(to_wire(record)), status_code=status_code, media_type=JSON)
