"""Context admission: may a request run, and with how many output tokens?

One pure function decides, used by the API before dispatch (where the prompt
length is not yet known, pass ``prompt_tokens=0``) and by every runner after
tokenisation and before prefill. The ceiling is the instance's stamped context
ceiling, so all ranks decide identically.

Rules (DESIGN.md section 2, "Context ceiling and admission"):

- a prompt that fills the window (``prompt_tokens >= ceiling``) is refused;
- an explicit ``max_tokens`` with ``prompt_tokens + max_tokens > ceiling`` is
  refused, never silently shortened;
- an omitted ``max_tokens`` is clamped to ``min(default_max_tokens,
  ceiling - prompt_tokens)`` and generation ends with ``finish_reason="length"``.
"""

from __future__ import annotations

from skulk.core.records import Record

__all__ = ["Admitted", "Refused", "Admission", "CONTEXT_LENGTH_EXCEEDED", "DEFAULT_MAX_OUTPUT_TOKENS", "admit"]

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
# The output cap of a request that omits max_tokens (SKULK_MAX_OUTPUT_TOKENS's default):
# the API, every runner and the simulator clamp to the same number.
DEFAULT_MAX_OUTPUT_TOKENS = 4096


class Admitted(Record, frozen=True, kw_only=True):
    max_tokens: int
    clamped: bool


class Refused(Record, frozen=True, kw_only=True):
    message: str
    code: str = CONTEXT_LENGTH_EXCEEDED
    type: str = "invalid_request_error"


Admission = Admitted | Refused


def admit(
    *, prompt_tokens: int, max_tokens: int | None, ceiling: int, default_max_tokens: int
) -> Admission:
    """Decide admission for a request; see the module docstring for the rules."""
    assert prompt_tokens >= 0, prompt_tokens
    assert ceiling > 0, ceiling
    assert default_max_tokens > 0, default_max_tokens
    if max_tokens is not None and max_tokens <= 0:
        return Refused(
            message=f"max_tokens must be at least 1, got {max_tokens}",
            code="invalid_value",
        )
    if prompt_tokens >= ceiling:
        return Refused(
            message=(
                f"{CONTEXT_LENGTH_EXCEEDED}: the prompt has {prompt_tokens} tokens, which fills "
                f"this instance's context window of {ceiling} tokens; shorten the prompt"
            )
        )
    room = ceiling - prompt_tokens
    if max_tokens is not None:
        if max_tokens > room:
            return Refused(
                message=(
                    f"{CONTEXT_LENGTH_EXCEEDED}: {prompt_tokens} prompt tokens + max_tokens "
                    f"{max_tokens} = {prompt_tokens + max_tokens} exceeds this instance's context "
                    f"ceiling of {ceiling} tokens; lower max_tokens to at most {room}"
                )
            )
        return Admitted(max_tokens=max_tokens, clamped=False)
    allowed = min(default_max_tokens, room)
    assert 0 < allowed <= room
    return Admitted(max_tokens=allowed, clamped=True)
