"""A strict parser for the API's SSE bodies, so tests check the framing as well as the content."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ParsedStream:
    comments: list[str] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)  # decoded data payloads, "[DONE]" kept as the string
    order: list[str] = field(default_factory=list)  # "comment" | "data" in arrival order

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [e for e in self.events if isinstance(e, dict) and "error" not in e]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [e["error"] for e in self.events if isinstance(e, dict) and "error" in e]

    def text(self) -> str:
        out = []
        for c in self.chunks:
            for choice in c.get("choices", []):
                if "delta" in choice:
                    out.append(choice["delta"].get("content") or "")
                else:
                    out.append(choice.get("text") or "")
        return "".join(out)

    def comment(self, prefix: str) -> str:
        found = [c[len(prefix) :].strip() for c in self.comments if c.startswith(prefix)]
        assert len(found) == 1, f"expected one {prefix!r} comment, got {self.comments}"
        return found[0]


def parse_sse(body: str) -> ParsedStream:
    """Parse ``body``; asserts every block is one ``data:`` line or one comment line."""
    assert body.endswith("\n\n"), f"an SSE body ends with a blank line: {body[-40:]!r}"
    out = ParsedStream()
    for block in body.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert len(lines) == 1, f"one line per event expected, got {lines}"
        line = lines[0]
        if line.startswith(": "):
            out.comments.append(line[2:])
            out.order.append("comment")
        else:
            assert line.startswith("data: "), line
            payload = line[len("data: ") :]
            out.events.append(payload if payload == "[DONE]" else json.loads(payload))
            out.order.append("data")
    return out
