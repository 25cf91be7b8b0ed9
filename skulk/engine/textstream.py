"""Streaming text with stop sequences: what may be shown now, what must wait.

Theory of operation
-------------------
Tokens become text through the tokenizer's streaming detokenizer, which itself
holds back incomplete UTF-8. On top of that, ``StopText`` holds back the
longest suffix of the text that could still grow into a stop sequence, so a
client never sees the beginning of a stop string that later matches. When a
stop string appears, the text before it is released and the stream ends; the
stop string itself is never shown (OpenAI semantics).

Invariant: however the text is split into pieces, the concatenation of
everything ``push`` and ``flush`` return equals the full text cut just before
the stop string that completes first (or the full text when none occurs).
"""

from __future__ import annotations

__all__ = ["StopText"]


class StopText:
    """Holds back text that might be the start of a stop sequence."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add ``text``; returns (text safe to show now, whether a stop matched)."""
        if not self.stops:
            return text, False
        buf = self._pending + text
        # The stop that *completes* first wins (as it would, streamed one
        # character at a time); on a tie, the longer one (it starts earlier).
        best: tuple[int, int] | None = None
        for stop in self.stops:
            at = buf.find(stop)
            if at != -1 and (best is None or (at + len(stop), at) < best):
                best = (at + len(stop), at)
        if best is not None:
            self._pending = ""
            return buf[: best[1]], True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), hold, -1):
                if buf.endswith(stop[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Release whatever is held back (the stream ended without a match)."""
        out, self._pending = self._pending, ""
        return out
