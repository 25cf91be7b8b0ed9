"""Reasoning out of the reply: ``<think>`` blocks and harmony's analysis channel.

Theory of operation
-------------------
The runner turns generated text into three streams (``Parts``): content,
reasoning and tool calls. Parsers are fed the text as it is detokenised, in
pieces of any size, and must never show text that might turn out to belong
elsewhere: each holds back the longest tail of its buffer that could still
grow into a marker (``<think>``, ``</think>``, ``<|channel|>`` ...), exactly as
``StopText`` holds back a possible stop sequence.

- ``ThinkSplitter``: Qwen3, DeepSeek-R1 and similar. Reasoning is the text of a
  ``<think>...</think>`` block at the very start of the reply (leading
  whitespace allowed), or, when the prompt itself opened the block (templates
  that prefill ``<think>\\n``), everything up to ``</think>``. Whitespace
  right after the block is dropped; the rest is content.
- ``HarmonyParser`` (gpt-oss): the reply is a sequence of messages
  ``[<|start|>assistant]<|channel|>NAME[ to=functions.F][ <|constrain|>json]<|message|>BODY``
  each ended by ``<|end|>``, ``<|call|>`` or ``<|return|>``. ``analysis`` bodies
  are reasoning, ``final`` bodies content, and a body addressed
  ``to=functions.F`` is a call of ``F`` whose arguments are the body.

Invariant: for any split of the same text into pieces, the concatenated
outputs are the same (tested by splitting at every position).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from skulk.core.tasks import ToolCall

__all__ = ["Parts", "held_prefix", "ThinkSplitter", "HarmonyParser"]


@dataclass
class Parts:
    """What a piece of generated text turned out to be."""

    content: str = ""
    reasoning: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def add(self, other: Parts) -> Parts:
        self.content += other.content
        self.reasoning += other.reasoning
        self.calls.extend(other.calls)
        return self

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.calls)


def held_prefix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some marker."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best


class ThinkSplitter:
    """Splits ``<think>`` reasoning from content (module docstring)."""

    OPEN = "<think>"
    CLOSE = "</think>"

    def __init__(self, *, in_reasoning: bool = False) -> None:
        self.state = "reasoning" if in_reasoning else "start"
        self._buf = ""
        # True once the reasoning block (if any) is over: a deferred grammar may start.
        self.reasoning_done = False

    def push(self, text: str) -> Parts:
        self._buf += text
        out = Parts()
        while True:
            if self.state == "start":
                stripped = self._buf.lstrip()
                if not stripped:
                    return out
                if stripped.startswith(self.OPEN):
                    self._buf = stripped[len(self.OPEN) :]
                    self.state = "reasoning"
                    continue
                if self.OPEN.startswith(stripped):
                    return out  # could still be "<think>"
                self.state = "content"
                self.reasoning_done = True
                continue
            if self.state == "reasoning":
                at = self._buf.find(self.CLOSE)
                if at >= 0:
                    out.reasoning += self._buf[:at]
                    self._buf = self._buf[at + len(self.CLOSE) :]
                    self.state = "after"
                    self.reasoning_done = True
                    continue
                hold = held_prefix(self._buf, (self.CLOSE,))
                out.reasoning += self._buf[: len(self._buf) - hold]
                self._buf = self._buf[len(self._buf) - hold :]
                return out
            if self.state == "after":
                stripped = self._buf.lstrip()
                if not stripped:
                    self._buf = ""
                    return out
                self._buf = stripped
                self.state = "content"
                continue
            assert self.state == "content", self.state
            out.content += self._buf
            self._buf = ""
            return out

    def flush(self) -> Parts:
        rest, self._buf = self._buf, ""
        if self.state == "reasoning":
            return Parts(reasoning=rest)
        if self.state == "after":
            return Parts()
        return Parts(content=rest)


_H_START = "<|start|>"
_H_CHANNEL = "<|channel|>"
_H_MESSAGE = "<|message|>"
_H_ENDS = ("<|end|>", "<|call|>", "<|return|>")
_H_MARKERS = (_H_START, _H_CHANNEL, _H_MESSAGE, *_H_ENDS)


class HarmonyParser:
    """gpt-oss's harmony format (module docstring); ids come from ``new_id``."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self._new_id = new_id
        self._buf = ""
        self.state = "header"  # header (until <|message|>), body
        self._header = ""
        self._args = ""
        self.reasoning_done = False

    def _route(self) -> tuple[str, str | None]:
        """(destination, function name) of the current message from its header."""
        header = self._header
        function = None
        at = header.find("to=")
        if at >= 0:
            target = header[at + 3 :].split()[0] if header[at + 3 :].split() else ""
            target = target.split("<|")[0]
            function = target[len("functions.") :] if target.startswith("functions.") else target
        channel = ""
        if _H_CHANNEL in header:
            channel = header.split(_H_CHANNEL, 1)[1].split()[0] if header.split(_H_CHANNEL, 1)[1].split() else ""
            channel = channel.split("<|")[0]
        if function:
            return "call", function
        return ("reasoning" if channel == "analysis" else "content"), None

    def push(self, text: str) -> Parts:
        self._buf += text
        out = Parts()
        while True:
            if self.state == "header":
                at = self._buf.find(_H_MESSAGE)
                if at < 0:
                    return out  # headers are short: hold them whole
                self._header += self._buf[:at]
                self._buf = self._buf[at + len(_H_MESSAGE) :]
                self.state = "body"
                self._args = ""
                continue
            dest, function = self._route()
            ends = [(self._buf.find(e), e) for e in _H_ENDS if e in self._buf]
            starts = self._buf.find(_H_START)
            if starts >= 0:
                ends.append((starts, ""))
            if ends:
                at, marker = min(ends)
                self._emit(out, dest, function, self._buf[:at], final=True)
                self._buf = self._buf[at + len(marker) :]
                self.state, self._header = "header", ""
                continue
            hold = held_prefix(self._buf, _H_MARKERS)
            self._emit(out, dest, function, self._buf[: len(self._buf) - hold], final=False)
            self._buf = self._buf[len(self._buf) - hold :]
            return out

    def _emit(self, out: Parts, dest: str, function: str | None, text: str, *, final: bool) -> None:
        if dest == "call":
            self._args += text
            if final:
                assert function is not None
                out.calls.append(ToolCall(id=self._new_id(), name=function, arguments=self._args.strip() or "{}"))
                self._args = ""
            return
        if dest == "reasoning":
            out.reasoning += text
        else:
            self.reasoning_done = True
            out.content += text

    def flush(self) -> Parts:
        out = Parts()
        if self.state == "body":
            dest, function = self._route()
            self._emit(out, dest, function, self._buf, final=True)
        elif self._buf.strip() or self._header.strip():
            # A reply that never opened a message (no harmony at all): show it as content.
            out.content += self._header + self._buf
        self._buf, self._header, self.state = "", "", "header"
        return out
