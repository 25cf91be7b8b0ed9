"""Server-Sent Events framing, and responses that notice when the client goes away.

Theory of operation
-------------------
A stream is an async iterator of already framed events (bytes). Framing:
``data: <json>\\n\\n`` for events, ``: <text>\\n\\n`` for comment lines
(``: command_id <id>``, ``: generation_stats {...}``), ``data: [DONE]\\n\\n``
last.

``EventStreamResponse`` sends the events while, concurrently, waiting for the
client's ``http.disconnect``. Whichever ends first wins: on a disconnect the
producer is cancelled, so its ``finally`` runs (that is where a generation is
abandoned, DESIGN.md invariant 6), whatever ASGI spec version the server
speaks and even while the producer waits for a token that is slow to come.

``until_disconnect`` does the same for a plain coroutine (non-streamed
requests): the work is cancelled if the client leaves first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, TypeVar

import msgspec
from starlette.types import Receive, Scope, Send

__all__ = ["json_text", "data_event", "comment", "DONE", "EventStreamResponse", "ClientGone", "until_disconnect", "SSE_HEADERS"]

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"

SSE_HEADERS: Mapping[str, str] = {
    "cache-control": "no-cache",
    "x-accel-buffering": "no",  # proxies must not buffer a token stream
    "connection": "keep-alive",
}

_ENCODER = msgspec.json.Encoder()


def json_text(payload: Any) -> str:
    """``payload`` as compact JSON text (one line)."""
    return _ENCODER.encode(payload).decode("utf-8")


def data_event(payload: Any) -> bytes:
    """One ``data:`` event holding ``payload`` as compact JSON (never contains a newline)."""
    return b"data: " + _ENCODER.encode(payload) + b"\n\n"


def comment(text: str) -> bytes:
    """One SSE comment line; ``text`` must be a single line."""
    assert "\n" not in text and "\r" not in text, "an SSE comment is one line"
    return b": " + text.encode("utf-8") + b"\n\n"


class ClientGone(Exception):
    """The client disconnected before the work finished."""


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ``ClientGone``."""
    work_task = asyncio.ensure_future(work)
    gone_task = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({work_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work_task.done():
            work_task.cancel()
        if not gone_task.done():
            gone_task.cancel()
    if work_task.cancelled() or not work_task.done():
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work_task
        raise ClientGone()
    with contextlib.suppress(asyncio.CancelledError):
        await gone_task
    return work_task.result()


class EventStreamResponse:
    """An ASGI response streaming ``events`` as ``text/event-stream``; see the module docstring."""

    def __init__(
        self,
        events: AsyncIterator[bytes],
        *,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str = "text/event-stream",
    ) -> None:
        self.events = events
        self.media_type = media_type
        self.status_code = status_code
        self.headers = {**SSE_HEADERS, **(headers or {})}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = [(b"content-type", f"{self.media_type}; charset=utf-8".encode("latin-1"))]
        raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        pump = asyncio.ensure_future(self._pump(send, raw_headers))
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, gone):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone
            try:
                await pump
            except (asyncio.CancelledError, OSError):
                pass  # the client left: nothing more to send
            finally:
                # Cancelling the pump throws into the generator's await, which runs its
                # finally; closing here covers a generator that was never started.
                aclose = getattr(self.events, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()

    async def _pump(self, send: Send, raw_headers: list[tuple[bytes, bytes]]) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": raw_headers})
        async for event in self.events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
