"""API keys: who may call the API, in each dialect's own header and error shape.

Theory of operation
-------------------
With no key configured the API is open, as before (and the node warns at
start when it binds to a non-loopback address). With one or more keys, an
ASGI middleware (``ApiKeyGuard``) checks every request before any handler
runs:

- the key comes from ``Authorization: Bearer <key>`` (OpenAI, Ollama and the
  dashboard) or ``x-api-key: <key>`` (Anthropic); either header works on any
  path;
- exempt: ``GET /healthz``, and the dashboard's *page* (``/``, ``/static/*``
  and browser page loads of client-side routes): code, not data, so a
  browser can load the page that asks for the key; and ``GET /transfer/*``,
  the node-to-node file copies, which only cluster members can sign
  (``skulk.runtime.transfer``);
- with admin keys configured, control requests (placing and deleting
  instances, adding cards, the model store) need an admin key; an ordinary
  key gets 403;
- a wrong or missing key is 401 in the dialect's error shape, chosen by path
  (``/v1/messages``: Anthropic; ``/api/``: Ollama; otherwise OpenAI); each
  failure is logged with the client address (never the key presented), and
  a client with ``failures_max`` failures within ``window_s`` gets 429 until
  the window passes;
- keys are compared as SHA-256 digests with ``hmac.compare_digest``, against
  every configured key without stopping early, so timing reveals neither a
  key nor how many characters matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["ApiKeys", "load_api_keys", "ApiKeyGuard", "dialect_for_path", "is_control_request", "exposure_warning"]

log = logging.getLogger("skulk.api.keys")

_ENCODER = msgspec.json.Encoder()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ApiKeys:
    """Digests of the accepted keys; admin keys are accepted everywhere."""

    user: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @classmethod
    def of(cls, user: Iterable[str] = (), admin: Iterable[str] = ()) -> ApiKeys:
        users = tuple(sorted({_digest(k) for k in user if k}))
        admins = tuple(sorted({_digest(k) for k in admin if k}))
        return cls(user=users, admin=admins)

    @property
    def enabled(self) -> bool:
        return bool(self.user or self.admin)

    @property
    def admin_required(self) -> bool:
        return bool(self.admin)

    def role(self, presented: str | None) -> str | None:
        """``"admin"``, ``"user"`` or None, in time independent of which key (if any) matched."""
        if not presented:
            return None
        digest = _digest(presented)
        is_admin = False
        is_user = False
        for known in self.admin:
            is_admin |= hmac.compare_digest(digest, known)
        for known in self.user:
            is_user |= hmac.compare_digest(digest, known)
        return "admin" if is_admin else ("user" if is_user else None)


def load_api_keys(
    keys: Iterable[str] = (), admin_keys: Iterable[str] = (), keys_file: str | os.PathLike[str] | None = None
) -> ApiKeys:
    """Keys from settings and from ``keys_file`` (one per line; ``admin:`` marks an admin key; ``#`` comments).

    Raises ``ValueError`` naming the file when it cannot be read or a key is too short.
    """
    users, admins = [k.strip() for k in keys if k.strip()], [k.strip() for k in admin_keys if k.strip()]
    if keys_file:
        path = Path(keys_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read the API keys file {path}: {exc}") from None
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("admin:"):
                admins.append(line[len("admin:") :].strip())
            else:
                users.append(line)
    short = [k for k in users + admins if len(k) < 16]
    if short:
        raise ValueError(f"API keys must be at least 16 characters ({len(short)} shorter); docs/operations.md shows how to make a good one")
    return ApiKeys.of(users, admins)


def exposure_warning(host: str, port: int, keys: ApiKeys) -> str | None:
    """The start-up warning for an API reachable beyond this machine without keys (None: no warning)."""
    import ipaddress

    if keys.enabled:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # a host name: assume it is reachable
    if loopback:
        return None
    return (
        f"the API on {host}:{port} has no API keys: anyone who can reach it can place or delete instances "
        "and use the cluster's compute; set SKULK_API_KEYS (docs/operations.md, API keys) or SKULK_API_HOST=127.0.0.1"
    )


def dialect_for_path(path: str) -> str:
    """Which dialect's error shape a path answers in."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/api/"):
        return "ollama"
    return "openai"


_CONTROL_PREFIXES = ("/place_instance", "/instance/", "/models/add", "/store/")


def is_control_request(method: str, path: str) -> bool:
    """Changes to the cluster (placement, deletion, cards, the model store): admin-only when admin keys exist."""
    return method not in ("GET", "HEAD", "OPTIONS") and path.startswith(_CONTROL_PREFIXES)


def error_body(dialect: str, status: int, message: str) -> bytes:
    """A 401/403/429 body in the dialect's own error shape."""
    if dialect == "anthropic":
        kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}[status]
        return _ENCODER.encode({"type": "error", "error": {"type": kind, "message": message}})
    if dialect == "ollama":
        return _ENCODER.encode({"error": message})
    code = {401: "invalid_api_key", 403: "insufficient_permissions", 429: "rate_limit_exceeded"}[status]
    kind = {401: "invalid_request_error", 403: "invalid_request_error", 429: "rate_limit_error"}[status]
    return _ENCODER.encode({"error": {"message": message, "type": kind, "param": None, "code": code}})


class _Failures:
    """Failed attempts per client within a sliding window; bounded memory (oldest clients forgotten)."""

    def __init__(self, failures_max: int, window_s: float, clients_max: int = 4096) -> None:
        assert failures_max > 0 and window_s > 0 and clients_max > 0
        self.failures_max = failures_max
        self.window_s = window_s
        self.clients_max = clients_max
        self._by_client: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._by_client.get(client)
        if times is None:
            times = deque()
            self._by_client[client] = times
            while len(self._by_client) > self.clients_max:
                self._by_client.popitem(last=False)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def blocked_for(self, client: str, now: float) -> float:
        """Seconds this client must wait (0: not blocked)."""
        times = self._recent(client, now)
        if len(times) < self.failures_max:
            return 0.0
        return max(0.0, times[0] + self.window_s - now)

    def record(self, client: str, now: float) -> int:
        times = self._recent(client, now)
        times.append(now)
        self._by_client.move_to_end(client)
        return len(times)


class ApiKeyGuard:
    """ASGI middleware enforcing ``keys`` (module docstring); ``routes`` are the API's own routes."""

    def __init__(
        self,
        app: ASGIApp,
        keys: ApiKeys,
        api_routes: list[Route],
        failures_max: int = 10,
        window_s: float = 60.0,
    ) -> None:
        self.app = app
        self.keys = keys
        self.api_routes = api_routes
        self.failures = _Failures(failures_max, window_s)

    def _exempt(self, scope: Scope, headers: Mapping[str, str]) -> bool:
        path, method = scope["path"], scope["method"]
        if method not in ("GET", "HEAD"):
            return False
        if path == "/healthz" or path == "/" or path.startswith("/static/"):
            return True
        # Node-to-node file copies carry their own authentication (an HMAC keyed from the
        # cluster key, checked by skulk.runtime.transfer), which no API key could replace.
        if path.startswith("/transfer/"):
            return True
        # A browser loading a client-side route of the dashboard gets the page, not data.
        if "text/html" in headers.get("accept", ""):
            return not any(route.matches(scope)[0] is Match.FULL for route in self.api_routes)
        return False

    @staticmethod
    def _presented(headers: Mapping[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip()
        return headers.get("x-api-key") or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self._exempt(scope, headers):
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        client = (scope.get("client") or ("unknown", 0))[0]
        now = time.monotonic()
        dialect = dialect_for_path(path)
        wait_s = self.failures.blocked_for(client, now)
        if wait_s > 0:
            await _reply(send, 429, dialect, f"too many failed API key attempts from {client}; retry in {wait_s:.0f} s",
                         {"retry-after": str(max(1, int(wait_s + 0.999)))})
            return
        presented = self._presented(headers)
        role = self.keys.role(presented)
        if role is None:
            count = self.failures.record(client, now)
            what = "no API key" if not presented else "a wrong API key"
            log.warning("refused %s %s from %s: %s (%d failure(s) in %.0f s)", method, path, client, what, count, self.failures.window_s)
            hint = "send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
            message = f"this node requires an API key; {hint}" if not presented else f"invalid API key; {hint}"
            await _reply(send, 401, dialect, message, {"www-authenticate": "Bearer"})
            return
        if role != "admin" and self.keys.admin_required and is_control_request(method, path):
            log.warning("refused %s %s from %s: an admin key is required", method, path, client)
            await _reply(send, 403, dialect, f"{method} {path} changes the cluster and needs an admin key")
            return
        await self.app(scope, receive, send)


async def _reply(send: Send, status: int, dialect: str, message: str, headers: Mapping[str, str] | None = None) -> None:
    body = error_body(dialect, status, message)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})
