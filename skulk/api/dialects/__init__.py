"""Thin adapters, one per dialect, onto the one generation path (``skulk.api.agent``).

Each adapter decodes its dialect's request, translates it into a ``ChatSpec``,
submits it exactly as the OpenAI endpoints do (``openai_routes.run_generation``:
admission, streaming, abandonment on disconnect) and renders the runner's
chunks, already split into content, reasoning and tool calls, in its own wire
shape. Errors are raised as ``ApiError`` like everywhere else and rendered in
the dialect's own error shape by ``with_errors``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from skulk.api.errors import ApiError

__all__ = ["with_errors", "Handler"]

Handler = Callable[[Request], Awaitable[Response]]


def with_errors(render: Callable[[ApiError], Response]) -> Callable[[Handler], Handler]:
    """Wrap a handler so every ``ApiError`` it raises is answered by ``render`` (the dialect's shape)."""

    def wrap(handler: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return render(exc)

        wrapped.__name__ = handler.__name__
        wrapped.__doc__ = handler.__doc__
        return wrapped

    return wrap
