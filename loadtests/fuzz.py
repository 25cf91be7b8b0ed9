"""Bad inputs against a real node: schema-driven fuzzing and hand-written hostile clients.

Theory of operation
-------------------
``fuzz_openapi`` loads the node's own ``/openapi.json`` with schemathesis and
drives every operation with generated requests, valid (positive) and invalid
(negative), over real HTTP. No answer may be a 5xx or take longer than the
client's bound, and every 4xx must be the error envelope of the endpoint's
dialect (OpenAI's; Anthropic's on ``/v1/messages``; Ollama's on ``/api/``). Every other
valid generation names the placed model, so generated sampling parameters
reach a real runner. Two edits keep a run bounded and the cluster intact,
and nothing else is constrained: a ``DELETE`` targets an instance id that
does not exist, and a generation's ``max_tokens`` is capped (the model
really generates, on 2 cores; an omitted one means "the whole context").

``hostile_cases`` are raw-socket clients a schema cannot express: bodies
over the limit (declared, undeclared and chunked), deeply nested JSON,
invalid UTF-8, integers wider than the wire's 64 bits, header bombs, slow clients (slowloris-style partial headers
and trickled bodies, held open while a normal request must still be served
promptly) and abrupt disconnects (RST mid-body, mid-stream, right after
sending). Each returns a ``CaseResult``; ``still_serving`` then checks the
node: it answers, it generates, no stream leaked, and its own
``skulk_api_requests_total`` counted no 5xx over the whole run.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

__all__ = ["CaseResult", "fuzz_openapi", "hostile_cases", "still_serving", "server_errors", "results_as_dicts"]

_GEN_PATHS = ("/v1/chat/completions", "/v1/completions")
_MAX_FUZZ_TOKENS = 8


@dataclass
class CaseResult:
    """One hostile input: what was sent, what came back, and whether that was right."""

    name: str
    sent: str
    outcome: str
    ok: bool
    tried: int = 1
    detail: dict[str, Any] = field(default_factory=dict)


# --- schema-driven fuzzing -----------------------------------------------------------------


def fuzz_openapi(url: str, *, examples: int = 10, negative: bool = True, model: str | None = None,
                 request_timeout_s: float = 30.0) -> dict[str, Any]:
    """Fuzz every operation of ``url``'s OpenAPI document; statuses seen, any 5xx or hang (with a curl line).

    ``model``: every other valid generation request names this (placed) model, so
    generated sampling parameters reach a real runner instead of stopping at 404.
    """
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    assert examples >= 1
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    statuses: Counter[int] = Counter()
    per_op: dict[str, int] = {}
    server_errors: list[dict[str, Any]] = []
    not_enveloped: list[dict[str, Any]] = []
    unsatisfiable: list[str] = []
    pinned = [0]
    hung: list[dict[str, Any]] = []
    generated = [0]
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if negative else [])
    with httpx.Client(timeout=request_timeout_s) as http:
        for op in operations:
            label = f"{op.method.upper()} {op.path}"
            for mode in modes:

                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                def run(case: Any) -> None:
                    if case.method.upper() == "DELETE":
                        case.path_parameters = {**(case.path_parameters or {}), "instance_id": "inst-fuzz-absent"}
                    if case.path in _GEN_PATHS and isinstance(case.body, dict):
                        pinned[0] += 1
                        if model is not None and mode == GenerationMode.POSITIVE and pinned[0] % 2 == 0:
                            case.body["model"] = model
                            if "max_tokens" not in case.body and "max_completion_tokens" not in case.body:
                                case.body["max_tokens"] = _MAX_FUZZ_TOKENS  # omitted: up to the whole context
                        for key in ("max_tokens", "max_completion_tokens"):
                            value = case.body.get(key)
                            if isinstance(value, int) and not isinstance(value, bool) and value > _MAX_FUZZ_TOKENS:
                                case.body[key] = _MAX_FUZZ_TOKENS
                    kwargs = case.as_transport_kwargs(base_url=url)
                    try:
                        resp = http.request(kwargs.pop("method"), kwargs.pop("url"), **_httpx_kwargs(kwargs))
                    except httpx.TimeoutException as exc:
                        hung.append({"operation": label, "error": repr(exc), "body": _body_text(case),
                                     "curl": case.as_curl_command()})
                        return
                    statuses[resp.status_code] += 1
                    per_op[label] = per_op.get(label, 0) + 1
                    if case.path in _GEN_PATHS and resp.status_code == 200:
                        generated[0] += 1
                    if resp.status_code >= 500:
                        server_errors.append({"operation": label, "status": resp.status_code, "body": resp.text[:300],
                                              "request": _body_text(case), "curl": case.as_curl_command()})
                    elif resp.status_code >= 400 and not _enveloped(resp, case.path):
                        not_enveloped.append({"operation": label, "status": resp.status_code, "body": resp.text[:300]})

                try:
                    run()
                except Unsatisfiable:
                    unsatisfiable.append(f"{label} ({mode.value})")  # e.g. no invalid input exists for it
    return {
        "operations": len(operations),
        "requests": sum(statuses.values()),
        "per_operation": dict(sorted(per_op.items())),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "generations_served": generated[0],
        "server_errors": server_errors,
        "hung": hung,
        "not_enveloped": not_enveloped,
        "no_cases_possible": unsatisfiable,
    }


def _body_text(case: Any) -> str:
    """The request body as sent (schemathesis's curl line masks fields that look like secrets)."""
    try:
        return json.dumps(case.body)[:2000]
    except (TypeError, ValueError):
        return repr(case.body)[:2000]


def _httpx_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """schemathesis's requests-style keyword arguments, as httpx takes them."""
    out: dict[str, Any] = {}
    for key in ("headers", "params", "json", "content"):
        if kwargs.get(key) is not None:
            out[key] = kwargs[key]
    if kwargs.get("cookies"):
        cookie = "; ".join(f"{k}={v}" for k, v in kwargs["cookies"].items())
        out["headers"] = {**out.get("headers", {}), "Cookie": cookie}
    if kwargs.get("data") is not None:
        data = kwargs["data"]
        out["content" if isinstance(data, (bytes, str)) else "data"] = data
    return out


def _enveloped(resp: httpx.Response, path: str = "") -> bool:
    """Is ``resp`` an error in the error shape of ``path``'s dialect?"""
    try:
        body = resp.json()
        if path.startswith("/api/"):  # Ollama: {"error": "..."}
            return set(body) == {"error"} and isinstance(body["error"], str) and bool(body["error"])
        err = body["error"]
        if path.startswith("/v1/messages"):  # Anthropic: {"type": "error", "error": {"type", "message"}}
            return body.get("type") == "error" and isinstance(err, dict) and bool(err.get("message")) and bool(err.get("type"))
        return isinstance(err, dict) and bool(err.get("message")) and "type" in err and "code" in err
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


# --- raw HTTP -----------------------------------------------------------------------------------


def _addr(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    return parts.hostname, parts.port


def _connect(url: str, timeout_s: float = 10.0) -> socket.socket:
    s = socket.create_connection(_addr(url), timeout=timeout_s)
    s.settimeout(timeout_s)
    return s


def _reset(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the abrupt disconnect of a crashed client."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        s.close()


def _read_response(s: socket.socket, limit: int = 1 << 20) -> tuple[int, bytes]:
    """(status, body so far) of one HTTP/1.1 response; reads until close or a full body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        return 0, data[:200]
    status = int(head.split(b" ", 2)[1])
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    try:
        while (length is None or len(body) < length) and len(body) < limit:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    except OSError:
        pass
    return status, body


def _request(method: str, path: str, host: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None and not any(k.lower() in ("content-length", "transfer-encoding") for k in (headers or {})):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def _send_and_read(url: str, raw: bytes, timeout_s: float = 30.0) -> tuple[int, bytes]:
    s = _connect(url, timeout_s)
    try:
        s.sendall(raw)
        return _read_response(s)
    finally:
        s.close()


def _code(body: bytes) -> str:
    try:
        return str(json.loads(body.decode("utf-8", "replace"))["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def _chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **extra}


# --- the cases -------------------------------------------------------------------------------------


def _status_case(name: str, sent: str, url: str, raw: bytes, want: tuple[int, ...], want_code: str | None = None) -> CaseResult:
    started = time.monotonic()
    try:
        status, body = _send_and_read(url, raw)
    except OSError as exc:
        return CaseResult(name, sent, f"connection error {exc!r}", False)
    code = _code(body)
    ok = status in want and (want_code is None or code == want_code)
    return CaseResult(name, sent, f"HTTP {status} {code}".strip(), ok,
                      detail={"seconds": round(time.monotonic() - started, 3), "body": body[:160].decode("utf-8", "replace")})


def _huge_declared(url: str, limit: int) -> CaseResult:
    """A Content-Length far over the limit: refused (413) before the body is read."""
    host = "%s:%d" % _addr(url)
    raw = _request("POST", "/v1/chat/completions", host, headers={"Content-Type": "application/json",
                                                                    "Content-Length": str(limit * 64)})
    return _status_case("huge body (declared)", f"Content-Length {limit * 64:,}, no body", url, raw + b"{", (413,),
                        "request_too_large")


def _huge_sent(url: str, limit: int, model: str) -> CaseResult:
    """A real body one byte past the limit, with an honest Content-Length."""
    host = "%s:%d" % _addr(url)
    body = json.dumps(_chat_body(model, pad="x" * limit)).encode()[: limit + 1]
    raw = _request("POST", "/v1/chat/completions", host, body, {"Content-Type": "application/json"})
    return _status_case("huge body (sent)", f"{len(body):,} bytes", url, raw, (413,), "request_too_large")


def _huge_chunked(url: str, limit: int) -> CaseResult:
    """A chunked upload that never declares its size: refused once the running total passes the limit."""
    s = _connect(url, 30)
    host = "%s:%d" % _addr(url)
    head = _request("POST", "/v1/chat/completions", host, headers={"Content-Type": "application/json",
                                                                    "Transfer-Encoding": "chunked"})
    sent = 0
    piece = b"[" * 65536
    try:
        s.sendall(head)
        while sent < limit * 4:
            try:
                s.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            except OSError:
                break  # the server answered and closed: expected
            sent += len(piece)
            s.settimeout(0.001 if sent < limit else 2.0)
            try:
                if s.recv(1, socket.MSG_PEEK):
                    break
            except (TimeoutError, BlockingIOError, socket.timeout):
                pass
            s.settimeout(30)
        s.settimeout(30)
        status, body = _read_response(s)
    except OSError as exc:
        return CaseResult("huge body (chunked)", f"{sent:,} bytes chunked", f"connection error {exc!r}", False)
    finally:
        s.close()
    return CaseResult("huge body (chunked)", f"{sent:,} bytes in 64 KiB chunks, no length", f"HTTP {status} {_code(body)}",
                      status == 413 and sent <= limit + 4 * 65536, detail={"sent_bytes": sent})


def _nested(url: str, model: str, depth: int, body_limit: int) -> list[CaseResult]:
    """Nesting ``depth`` deep, but within the body limit (the point is depth, not size)."""
    host = "%s:%d" % _addr(url)
    out = []
    depth = min(depth, (body_limit - 200) // 6)
    deep = "[" * depth + "]" * depth
    for name, text in (
        ("deep JSON where a string belongs", '{"model": "%s", "messages": %s}' % (model, deep)),
        ("deep JSON under an unknown key", '{"model": "%s", "messages": [{"role": "user", "content": "x"}], "junk": %s}'
         % (model, deep)),
        ("deep objects", '{"model": "%s", "messages": [{"role": "user", "content": "x"}], "junk": %s}'
         % (model, '{"a":' * depth + "1" + "}" * depth)),
    ):
        raw = _request("POST", "/v1/chat/completions", host, text.encode(), {"Content-Type": "application/json"})
        out.append(_status_case(name, f"nesting depth {depth:,}", url, raw, (400,)))
    return out


def _bad_bytes(url: str, model: str) -> list[CaseResult]:
    host = "%s:%d" % _addr(url)
    good = json.dumps(_chat_body(model)).encode()
    cases = [
        ("invalid UTF-8 in a string", good.replace(b"hello", b"hel\xff\xfelo"), "invalid_encoding"),
        ("overlong UTF-8 encoding", good.replace(b"hello", b"\xc0\xaf"), "invalid_encoding"),
        ("lone surrogate escape", good.replace(b"hello", b"\\ud800"), None),
        ("NUL bytes", good.replace(b"hello", b"he\x00llo"), None),
        ("truncated JSON", good[: len(good) // 2], "invalid_json"),
        ("not JSON at all", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), None),
        ("JSON but not an object", b"[1, 2, 3]", None),
        ("NaN and huge numbers", good.replace(b'"max_tokens": 4', b'"max_tokens": 1e999, "temperature": NaN'), None),
    ]
    out = []
    for name, body, code in cases:
        raw = _request("POST", "/v1/chat/completions", host, body, {"Content-Type": "application/json"})
        # A lone surrogate or NUL inside a JSON string is valid JSON: either a 400 or a served chat is right.
        want = (400, 200) if name in ("lone surrogate escape", "NUL bytes") else (400,)
        out.append(_status_case(name, f"{len(body)} bytes", url, raw, want, code))
    return out


def _wide_integers(url: str, model: str) -> list[CaseResult]:
    """Integers at and past the 64 bits the cluster's wire carries: refused (400) or served, never stuck."""
    host = "%s:%d" % _addr(url)
    out = []
    for field_name, value, want in (
        ("seed", 2**64, (400,)), ("seed", 2**70, (400,)), ("top_k", 2**70, (400,)), ("max_tokens", 2**70, (400,)),
        ("seed", -(2**63), (200, 400)), ("seed", 2**63 - 1, (200, 400)), ("seed", -1, (200, 400)),
        ("top_k", 2**63 - 1, (200, 400)),
    ):
        body = json.dumps(_chat_body(model, **{field_name: value})).encode()
        raw = _request("POST", "/v1/chat/completions", host, body, {"Content-Type": "application/json"})
        out.append(_status_case(f"{field_name} = {value}", f"a chat with {field_name} {value}", url, raw, want))
    return out


def _header_bombs(url: str) -> list[CaseResult]:
    host = "%s:%d" % _addr(url)
    long_value = _request("GET", "/node_id", host, headers={"X-Bomb": "a" * 200_000})
    many = _request("GET", "/node_id", host, headers={f"X-H{i}": "v" for i in range(5_000)})
    bad_length = _request("POST", "/place_instance", host, b"{}", {"Content-Length": "-5"})
    return [
        _status_case("a 200 kB header", "GET /node_id with one 200,000-byte header", url, long_value, (400, 413, 431, 200)),
        _status_case("5,000 headers", "GET /node_id with 5,000 headers", url, many, (400, 413, 431, 200)),
        _status_case("negative Content-Length", "POST /place_instance, Content-Length: -5", url, bad_length, (400,)),
    ]


def _probe_latency(url: str, model: str) -> tuple[float, float, bool]:
    """(seconds for GET /node_id, seconds for a 4-token chat, chat ok) right now."""
    t0 = time.monotonic()
    httpx.get(url + "/node_id", timeout=10).raise_for_status()
    t1 = time.monotonic()
    r = httpx.post(url + "/v1/chat/completions", json=_chat_body(model), timeout=30)
    t2 = time.monotonic()
    return t1 - t0, t2 - t1, r.status_code == 200


def _slow_clients(url: str, model: str, count: int, hold_s: float) -> list[CaseResult]:
    """``count`` slowloris connections (half trickling headers, half trickling a body), held ``hold_s``."""
    host = "%s:%d" % _addr(url)
    socks: list[tuple[socket.socket, str]] = []
    opened = 0
    for i in range(count):
        try:
            s = _connect(url, 10)
        except OSError:
            break
        opened += 1
        if i % 2 == 0:
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n".encode())
            socks.append((s, "headers"))
        else:
            body = json.dumps(_chat_body(model)).encode()
            s.sendall(_request("POST", "/v1/chat/completions", host, None,
                               {"Content-Type": "application/json", "Content-Length": str(len(body))}) + body[:5])
            socks.append((s, "body"))
    probes: list[tuple[float, float, bool]] = []
    closed_by_server = 0
    end = time.monotonic() + hold_s
    tick = 0
    while time.monotonic() < end:
        tick += 1
        for s, kind in socks:
            try:
                s.sendall(f"X-Slow-{tick}: 1\r\n".encode() if kind == "headers" else b" ")
            except OSError:
                closed_by_server += 1
        try:
            probes.append(_probe_latency(url, model))
        except httpx.HTTPError:
            probes.append((99.0, 99.0, False))
        time.sleep(1.0)
    for s, _ in socks:
        _reset(s)
    worst_get = max((p[0] for p in probes), default=99.0)
    worst_chat = max((p[1] for p in probes), default=99.0)
    served = all(p[2] for p in probes) and bool(probes)
    return [CaseResult(
        "slow clients (slowloris)",
        f"{opened} connections trickling headers or a body for {hold_s:g} s",
        f"normal requests meanwhile: GET /node_id <= {worst_get:.3f} s, chat <= {worst_chat:.3f} s",
        served and worst_get < 2.0,
        tried=opened,
        detail={"probes": len(probes), "writes_refused_by_server": closed_by_server},
    )]


def _disconnects(url: str, model: str, count: int) -> list[CaseResult]:
    host = "%s:%d" % _addr(url)
    body = json.dumps(_chat_body(model, max_tokens=200, stream=True)).encode()
    plain = json.dumps(_chat_body(model, max_tokens=50)).encode()
    outcomes: Counter[str] = Counter()
    for i in range(count):
        s = _connect(url, 10)
        try:
            kind = ("mid-body", "mid-stream", "after-send", "before-headers")[i % 4]
            if kind == "mid-body":
                s.sendall(_request("POST", "/v1/chat/completions", host, None,
                                   {"Content-Type": "application/json", "Content-Length": str(len(body))}) + body[:10])
            elif kind == "mid-stream":
                s.sendall(_request("POST", "/v1/chat/completions", host, body, {"Content-Type": "application/json"}))
                got = b""
                while got.count(b"data: ") < 2:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    got += chunk
            elif kind == "after-send":
                s.sendall(_request("POST", "/v1/chat/completions", host, plain, {"Content-Type": "application/json"}))
            else:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: ")
            outcomes[kind] += 1
        finally:
            _reset(s)
    return [CaseResult("abrupt disconnects (RST)", f"{count} connections reset: {dict(outcomes)}",
                       "the node survived (checked below: no leaked stream, still serving)", True, tried=count,
                       detail=dict(outcomes))]


def hostile_cases(url: str, *, model: str, body_limit: int, slow_clients: int = 40, slow_hold_s: float = 5.0,
                  disconnects: int = 40, nesting_depth: int = 100_000) -> list[CaseResult]:
    """Every hand-written hostile case against ``url`` (a node serving ``model``)."""
    assert body_limit >= 1024 and slow_clients >= 2 and disconnects >= 4
    results: list[CaseResult] = []
    steps: list[Callable[[], list[CaseResult]]] = [
        lambda: [_huge_declared(url, body_limit)],
        lambda: [_huge_sent(url, body_limit, model)],
        lambda: [_huge_chunked(url, body_limit)],
        lambda: _nested(url, model, nesting_depth, body_limit),
        lambda: _bad_bytes(url, model),
        lambda: _wide_integers(url, model),
        lambda: _header_bombs(url),
        lambda: _disconnects(url, model, disconnects),
        lambda: _slow_clients(url, model, slow_clients, slow_hold_s),
    ]
    for step in steps:
        results += step()
    return results


# --- after the storm of bad inputs -------------------------------------------------------------------


def server_errors(url: str) -> dict[str, float]:
    """5xx answers the node counted itself (``skulk_api_requests_total``), by route and status."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("skulk_api_requests_total{") and 'status="5' in line:
            labels, value = line.rsplit(" ", 1)
            out[labels[len("skulk_api_requests_total"):]] = float(value)
    return out


def still_serving(url: str, model: str, node_id: str, *, settle_s: float = 10.0) -> dict[str, Any]:
    """Is the node healthy after the abuse: answers, generates, no leaked stream, no 5xx counted?"""
    got_id = httpx.get(url + "/node_id", timeout=10).json()
    reply = httpx.post(url + "/v1/chat/completions", json=_chat_body(model), timeout=60)
    served = reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
    deadline = time.monotonic() + settle_s
    open_streams = -1.0
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", timeout=10).text
        open_streams = next((float(line.split()[1]) for line in text.splitlines()
                             if line.startswith("skulk_handle_open_streams ")), -1.0)
        if open_streams == 0:
            break
        time.sleep(0.2)
    errors = server_errors(url)
    return {
        "node_id_ok": got_id == node_id,
        "chat_served": served,
        "open_streams": open_streams,
        "server_errors_counted": errors,
        "ok": got_id == node_id and served and open_streams == 0 and not errors,
    }


def results_as_dicts(results: list[CaseResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]

