"""The API's own knobs, with units in the names.

The runtime builds an ``ApiConfig`` from its resolved settings (environment,
``skulk.env``, ``skulk.yaml``) and passes it to ``create_app``; without one,
``ApiConfig.from_env`` reads the same ``SKULK_*`` names (legacy ``EXO_*``
honoured) from the process environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from skulk.api.keys import ApiKeys, load_api_keys

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
    # API keys (none: the API is open); see skulk.api.keys.
    keys: ApiKeys = field(default_factory=ApiKeys)
    # Failed key attempts per client allowed within the window before 429.
    auth_failures_max: int = 10
    auth_window_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.max_output_tokens < 1:
            raise ValueError(f"max_output_tokens must be at least 1, got {self.max_output_tokens}")
        if self.cancelled_memory_max < 1:
            raise ValueError(f"cancelled_memory_max must be at least 1, got {self.cancelled_memory_max}")
        if self.auth_failures_max < 1 or self.auth_window_s <= 0:
            raise ValueError("auth_failures_max must be >= 1 and auth_window_s > 0")
        if not 100 <= self.dashboard_poll_ms <= 60_000:
            raise ValueError(f"dashboard_poll_ms must be within 100..60000, got {self.dashboard_poll_ms}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ApiConfig:
        """Read ``SKULK_API_MAX_BODY_BYTES``, ``SKULK_MAX_OUTPUT_TOKENS`` and the API keys (or ``EXO_*``).

        Keys: ``SKULK_API_KEYS`` and ``SKULK_API_ADMIN_KEYS`` (comma-separated) and
        ``SKULK_API_KEYS_FILE``. Raises ``ValueError`` naming the variable when a
        value is not an integer, or when the keys file cannot be read.
        """
        env = os.environ if env is None else env
        values: dict[str, int] = {}

        def text(suffix: str) -> str:
            return (env.get("SKULK_" + suffix) or env.get("EXO_" + suffix) or "").strip()

        def listed(suffix: str) -> list[str]:
            return [k.strip() for k in text(suffix).replace("\n", ",").split(",") if k.strip()]

        keys = load_api_keys(listed("API_KEYS"), listed("API_ADMIN_KEYS"), text("API_KEYS_FILE") or None)
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
        return cls(**values, keys=keys)
