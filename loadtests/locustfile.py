"""Locust users for Skulk's real HTTP API (run with ``locust -f loadtests/locustfile.py``).

Four kinds of client, each a ``HttpUser`` (pick some by naming them on the
command line; all four run by default, by their weights):

- ``StreamingChatUser``: streamed chat; fires two custom metrics through
  ``events.request`` (request type ``METRIC``): ``time_to_first_token_ms``
  (its "response time" is the TTFT in ms) and ``tokens_per_second`` (its
  "response time" column holds tokens per second, its length the tokens);
- ``ChatUser``: non-streamed chat, checks ``usage``;
- ``StatePollingUser``: ``GET /state`` like the dashboard does;
- ``AbandoningUser``: opens a stream with a short deadline against a loading
  or busy model and walks away (closes the connection) when it passes.

Settings (environment):

=============================  ================================================  =======
SKULK_LOAD_HOSTS               comma-separated node URLs to spread requests over  the -H host
SKULK_LOAD_MODEL               model id                                            skulk/tiny-qwen2
SKULK_LOAD_MAX_TOKENS          max_tokens of chat requests                         16
SKULK_LOAD_WAIT_S              mean think time between requests (s; 0: none)       0.5
SKULK_LOAD_TIMEOUT_S           hard bound on one request (s); past it = hung       30
SKULK_LOAD_ABANDON_AFTER_S     how long an abandoning client waits (s)             0.5
SKULK_LOAD_MAX_REQUESTS        stop the whole run after this many requests (0: no)  0
SKULK_LOAD_RECORD              JSON-lines file of per-request records              (none)
=============================  ================================================  =======

Every request also becomes one record in ``SKULK_LOAD_RECORD`` (see
``loadtests.records``) so a run can be analysed around a fault.

Example (three local nodes from ``skulk cluster up -n 3``)::

    .venv/bin/locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:52415 \\
        -u 8 -r 4 -t 60s --html artifacts/load/report.html --csv artifacts/load/load
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any

import gevent
import requests
from locust import HttpUser, between, constant, events, task
from locust.env import Environment

from loadtests.records import HUNG

MODEL = os.environ.get("SKULK_LOAD_MODEL", "skulk/tiny-qwen2")
MAX_TOKENS = int(os.environ.get("SKULK_LOAD_MAX_TOKENS", "16"))
WAIT_S = float(os.environ.get("SKULK_LOAD_WAIT_S", "0.5"))
TIMEOUT_S = float(os.environ.get("SKULK_LOAD_TIMEOUT_S", "30"))
ABANDON_AFTER_S = float(os.environ.get("SKULK_LOAD_ABANDON_AFTER_S", "0.5"))
MAX_REQUESTS = int(os.environ.get("SKULK_LOAD_MAX_REQUESTS", "0"))
RECORD_PATH = os.environ.get("SKULK_LOAD_RECORD", "")
assert MAX_TOKENS > 0 and TIMEOUT_S > 0 and ABANDON_AFTER_S > 0 and WAIT_S >= 0 and MAX_REQUESTS >= 0

_issued = itertools.count(1)
_quitting = False
_record_file = open(RECORD_PATH, "a", encoding="utf-8") if RECORD_PATH else None  # noqa: SIM115 - one per process


def _hosts(default: str | None) -> list[str]:
    listed = [h.strip().rstrip("/") for h in os.environ.get("SKULK_LOAD_HOSTS", "").split(",") if h.strip()]
    if listed:
        return listed
    assert default, "give -H/--host or SKULK_LOAD_HOSTS"
    return [default.rstrip("/")]


def _wait() -> Any:
    return between(0.0, 2.0 * WAIT_S) if WAIT_S > 0 else constant(0)


def _record(rec: dict[str, Any]) -> None:
    if _record_file is not None:
        _record_file.write(json.dumps(rec, separators=(",", ":")) + "\n")
        _record_file.flush()


def _budget(env: Environment) -> bool:
    """Count one request; False (and stop the run) once ``SKULK_LOAD_MAX_REQUESTS`` is spent."""
    global _quitting
    if MAX_REQUESTS and next(_issued) > MAX_REQUESTS:
        if not _quitting and env.runner is not None:
            _quitting = True
            gevent.spawn(env.runner.quit)  # not from this user's greenlet: quit() kills the users
        gevent.sleep(1.0)
        return False
    return True


def _metric(name: str, value: float, length: int = 0) -> None:
    events.request.fire(request_type="METRIC", name=name, response_time=value, response_length=length,
                        exception=None, context={})


def _envelope(resp: requests.Response) -> tuple[str, str]:
    """(code, message) of an error response: the OpenAI envelope, else the status line."""
    try:
        err = resp.json()["error"]
        return str(err.get("code") or err.get("type") or f"http_{resp.status_code}"), str(err.get("message", ""))
    except (ValueError, KeyError, TypeError, requests.RequestException):
        return f"http_{resp.status_code}", (resp.reason or "")[:200]


class _SkulkUser(HttpUser):
    abstract = True
    wait_time = _wait()

    def on_start(self) -> None:
        self.targets = _hosts(self.host)
        self.rr = itertools.count(id(self) % 7)

    def target(self) -> str:
        return self.targets[next(self.rr) % len(self.targets)]

    def chat_body(self, *, stream: bool, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write one sentence about foxes."}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def stream(self, kind: str, *, abandon_after_s: float | None, max_tokens: int = MAX_TOKENS) -> None:
        """One streamed chat. ``abandon_after_s``: walk away once it passes (an abandoning client)."""
        node = self.target()
        rec: dict[str, Any] = {"kind": kind, "node": node, "t0": time.time(), "ok": False, "status": 0,
                               "error": "", "message": "", "ttft_s": None, "tokens": 0, "tps": None,
                               "command_id": None, "abandoned": False}
        bound = abandon_after_s if abandon_after_s is not None else TIMEOUT_S
        read_timeout = max(0.05, min(bound, TIMEOUT_S))
        deadline = rec["t0"] + bound
        first_at = last_at = None
        usage_tokens = None
        content_chunks = 0
        done = False
        with self.client.post(node + "/v1/chat/completions", json=self.chat_body(stream=True, max_tokens=max_tokens),
                              stream=True, timeout=(5.0, read_timeout), catch_response=True,
                              name=f"{kind} /v1/chat/completions") as resp:
            try:
                rec["status"] = resp.status_code
                if resp.status_code == 0 and abandon_after_s is not None and isinstance(resp.error, requests.ReadTimeout):
                    pass  # walked away before the answer even started: abandoned, with no command id to show
                elif resp.status_code != 200:
                    rec["error"], rec["message"] = _envelope(resp) if resp.status_code else (
                        type(resp.error).__name__, str(resp.error)[:200])
                else:
                    for raw in resp.iter_lines():
                        line = raw.decode("utf-8", "replace")
                        if line.startswith(": command_id "):
                            rec["command_id"] = line.split(" ", 2)[2].strip()
                        elif line == "data: [DONE]":
                            done = True
                            break
                        elif line.startswith("data: "):
                            event = json.loads(line[6:])
                            if "error" in event:
                                rec["error"] = str(event["error"].get("code") or event["error"].get("type"))
                                rec["message"] = str(event["error"].get("message", ""))[:300]
                            elif event.get("usage"):
                                usage_tokens = int(event["usage"]["completion_tokens"])
                            elif event.get("choices") and event["choices"][0]["delta"].get("content"):
                                now = time.time()
                                first_at = first_at or now
                                last_at = now
                                content_chunks += 1
                        if abandon_after_s is not None and time.time() >= deadline:
                            break
                        if abandon_after_s is None and time.time() >= deadline:
                            rec["error"], rec["message"] = HUNG, f"stream still open after {TIMEOUT_S:g} s"
                            break
            except (requests.RequestException, OSError) as exc:
                timed_out = "timed out" in str(exc).lower() or isinstance(exc, requests.Timeout)
                if abandon_after_s is None:
                    rec["error"] = HUNG if timed_out else type(exc).__name__
                    rec["message"] = str(exc)[:200]
            finally:
                resp.close()  # on an abandoned stream this is the walk-away: the socket closes now
            rec["t1"] = time.time()
            if first_at is not None:
                rec["ttft_s"] = round(first_at - rec["t0"], 4)
            rec["tokens"] = usage_tokens if usage_tokens is not None else content_chunks
            if first_at is not None and last_at is not None and rec["tokens"] > 1 and last_at > first_at:
                rec["tps"] = round((rec["tokens"] - 1) / (last_at - first_at), 2)
            if abandon_after_s is not None:
                # An abandoning client succeeds when the node accepted its stream and it walked away
                # (or the stream finished first); any HTTP or connection error is a failure.
                rec["abandoned"] = not done
                rec["ok"] = not rec["error"] and (rec["status"] == 200 or isinstance(resp.error, requests.ReadTimeout))
            else:
                rec["ok"] = done and not rec["error"] and rec["tokens"] > 0
                if not rec["ok"] and not rec["error"]:
                    rec["error"], rec["message"] = "stream_incomplete", "the stream ended without [DONE] or tokens"
            if rec["ok"]:
                resp.success()
            else:
                resp.failure(f"{rec['error']}: {rec['message']}")
        if rec["ttft_s"] is not None and kind == "stream":
            _metric("time_to_first_token_ms", rec["ttft_s"] * 1000.0)
        if rec["tps"] is not None and kind == "stream":
            _metric("tokens_per_second", rec["tps"], rec["tokens"])
        _record(rec)


class StreamingChatUser(_SkulkUser):
    """Streamed chats; time to first token and tokens per second as custom metrics."""

    weight = 3

    @task
    def streamed_chat(self) -> None:
        if _budget(self.environment):
            self.stream("stream", abandon_after_s=None)


class ChatUser(_SkulkUser):
    """Non-streamed chats; a reply must carry its usage."""

    weight = 2

    @task
    def chat(self) -> None:
        if not _budget(self.environment):
            return
        node = self.target()
        rec: dict[str, Any] = {"kind": "chat", "node": node, "t0": time.time(), "ok": False, "status": 0,
                               "error": "", "message": "", "tokens": 0}
        with self.client.post(node + "/v1/chat/completions", json=self.chat_body(stream=False),
                              timeout=(5.0, TIMEOUT_S), catch_response=True, name="chat /v1/chat/completions") as resp:
            rec["t1"] = time.time()
            rec["status"] = resp.status_code
            if resp.status_code == 200:
                try:
                    rec["tokens"] = int(resp.json()["usage"]["completion_tokens"])
                    rec["ok"] = rec["tokens"] > 0
                except (ValueError, KeyError, TypeError) as exc:
                    rec["error"], rec["message"] = "bad_response", repr(exc)[:200]
            elif resp.status_code == 0:
                exc = resp.error
                timed_out = isinstance(exc, requests.Timeout) or "timed out" in str(exc).lower()
                rec["error"] = HUNG if timed_out else type(exc).__name__
                rec["message"] = str(exc)[:200]
            else:
                rec["error"], rec["message"] = _envelope(resp)
            if rec["ok"]:
                resp.success()
            else:
                resp.failure(f"{rec['error']}: {rec['message']}")
        _record(rec)


class StatePollingUser(_SkulkUser):
    """Polls ``GET /state`` like an open dashboard."""

    weight = 1

    @task
    def poll_state(self) -> None:
        if not _budget(self.environment):
            return
        node = self.target()
        rec: dict[str, Any] = {"kind": "state", "node": node, "t0": time.time(), "ok": False, "status": 0,
                               "error": "", "message": ""}
        with self.client.get(node + "/state", timeout=(5.0, TIMEOUT_S), catch_response=True, name="state /state") as resp:
            rec["t1"] = time.time()
            rec["status"] = resp.status_code
            try:
                rec["ok"] = resp.status_code == 200 and "instances" in resp.json()
            except ValueError:
                rec["ok"] = False
            if not rec["ok"]:
                if resp.status_code == 0:
                    rec["error"], rec["message"] = type(resp.error).__name__, str(resp.error)[:200]
                else:
                    rec["error"], rec["message"] = _envelope(resp)
                resp.failure(f"{rec['error']}: {rec['message']}")
            else:
                resp.success()
        _record(rec)


class AbandoningUser(_SkulkUser):
    """Opens a long stream, waits ``SKULK_LOAD_ABANDON_AFTER_S`` at most, and walks away."""

    weight = 1

    @task
    def abandon(self) -> None:
        if _budget(self.environment):
            self.stream("abandon", abandon_after_s=ABANDON_AFTER_S, max_tokens=max(256, MAX_TOKENS))


@events.quitting.add_listener
def _close_record(environment: Environment, **_: Any) -> None:
    if _record_file is not None:
        _record_file.flush()
