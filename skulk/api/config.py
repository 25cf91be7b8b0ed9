"""The API's own knobs, with units in the names.

The runtime builds an ``ApiConfig`` from its resolved settings (environment,
``skulk.env``, ``skulk.yaml``) and passes it to ``create_app``; without one,
``ApiConfig.from_env`` reads the same ``SKULK_*`` names (legacy ``EXO_*``
honoured) from the process environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ApiConfig", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_OUTPUT_TOKENS"]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
from skulk.core.admission import DEFAULT_MAX_OUTPUT_TOKENS


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    # Largest request body accepted; larger ones get 413 before being parsed.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Output cap when a request omits max_tokens (the runner clamps to the same).
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS
    # How long /v1/cancel remembers that it cancelled a command (entries, not seconds).
    cancelled_memory_max: int = 4_096
    # Dashboard: how often the page polls /state.
    dashboard_poll_ms: int = 1_000

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.max_output_tokens < 1:
            raise ValueError(f"max_output_tokens must be at least 1, got {self.max_output_tokens}")
        if self.cancelled_memory_max < 1:
            raise ValueError(f"cancelled_memory_max must be at least 1, got {self.cancelled_memory_max}")
        if not 100 <= self.dashboard_poll_ms <= 60_000:
            raise ValueError(f"dashboard_poll_ms must be within 100..60000, got {self.dashboard_poll_ms}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ApiConfig:
        """Read ``SKULK_API_MAX_BODY_BYTES`` and ``SKULK_MAX_OUTPUT_TOKENS`` (or ``EXO_*``).

        Raises ``ValueError`` naming the variable when a value is not an integer.
        """
        env = os.environ if env is None else env
        values: dict[str, int] = {}
        for field_name, suffix in (("max_body_bytes", "API_MAX_BODY_BYTES"), ("max_output_tokens", "MAX_OUTPUT_TOKENS")):
            for prefix in ("SKULK_", "EXO_"):
                raw = env.get(prefix + suffix)
                if raw is None or raw == "":
                    continue
                try:
                    values[field_name] = int(raw)
                except ValueError:
                    raise ValueError(f"{prefix}{suffix} must be an integer, got {raw!r}") from None
                break
        return cls(**values)
