"""The chunk bookkeeping shared by the dialects whose replies are a list of blocks.

Theory of operation
-------------------
Anthropic Messages (content blocks) and OpenAI Responses (output items) shape
a reply the same way: reasoning and text arrive as runs that each open a block,
grow it with deltas and close it when the other kind (or a tool call, or the
end) comes; every tool call is one whole block of its own; the last chunk's
usage is the reply's. ``BlockRenderer`` keeps that walk and the renderer
protocol ``stream_events`` and ``collect`` expect (``render``, ``cancelled``,
``closing``, ``accumulate``); a dialect supplies only its wire shapes:
``_open``, ``_delta``, ``_end`` of a text block, ``_tool_call``, ``_error``,
``_finish``, plus ``opening``, ``lost`` and ``final``.

Invariant: at most one text block is open (``open_kind``), and it is closed
before any other block starts and before the finish.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from skulk.core.tasks import ChunkError, TokenChunk, ToolCallDelta

__all__ = ["BlockRenderer"]


@dataclass
class BlockRenderer(ABC):
    """Runner chunks as a dialect's block events; subclasses name the kinds and render each event."""

    REASONING: ClassVar[str]  # the dialect's name of a reasoning block
    TEXT: ClassVar[str]  # and of a text block

    open_kind: str | None = field(default=None, init=False)
    usage_in: int = field(default=0, init=False)
    usage_out: int = field(default=0, init=False)

    # --- what a dialect renders ---------------------------------------------------------

    @abstractmethod
    def _open(self, kind: str) -> list[bytes]:
        """Start a text block of ``kind`` (it becomes the last block)."""

    @abstractmethod
    def _delta(self, kind: str, text: str) -> list[bytes]:
        """Add ``text`` to the open block of ``kind``."""

    @abstractmethod
    def _end(self, kind: str) -> list[bytes]:
        """Close the open block of ``kind``."""

    @abstractmethod
    def _tool_call(self, call: ToolCallDelta) -> list[bytes]:
        """One whole tool-call block (no text block is open)."""

    @abstractmethod
    def _error(self, error: ChunkError) -> list[bytes]:
        """The events of a chunk that ends the request with ``error``."""

    @abstractmethod
    def _finish(self, finish: str) -> list[bytes]:
        """The closing events of a reply that ended with ``finish`` (close the open block first)."""

    # --- the shared walk ------------------------------------------------------------------

    def _close(self) -> list[bytes]:
        if self.open_kind is None:
            return []
        events = self._end(self.open_kind)
        self.open_kind = None
        return events

    def _text(self, kind: str, text: str) -> list[bytes]:
        events: list[bytes] = []
        if self.open_kind != kind:
            events += self._close()
            events += self._open(kind)
            self.open_kind = kind
        events += self._delta(kind, text)
        return events

    def _absorb(self, chunk: TokenChunk) -> list[bytes]:
        events: list[bytes] = []
        if chunk.reasoning:
            events += self._text(self.REASONING, chunk.reasoning)
        if chunk.text:
            events += self._text(self.TEXT, chunk.text)
        for call in chunk.tool_calls:
            events += self._close()
            events += self._tool_call(call)
        if chunk.usage is not None:
            self.usage_in, self.usage_out = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
        return events

    def render(self, chunk: TokenChunk) -> list[bytes]:
        if chunk.error is not None:
            return self._error(chunk.error)
        events = self._absorb(chunk)
        if chunk.finish_reason is not None:
            events += self._finish(chunk.finish_reason)
        return events

    def cancelled(self) -> list[bytes]:
        return self._finish("cancelled")

    def closing(self) -> list[bytes]:
        return []

    def accumulate(self, chunk: TokenChunk) -> None:
        self._absorb(chunk)
