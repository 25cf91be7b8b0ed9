"""Identifier types shared by every layer.

Identifiers are plain strings on the wire. ``NewType`` keeps them apart in type
checking without any runtime cost. Ids the core derives itself (instance ids,
runner ids, task ids) are built from inputs that every node agrees on, never
from object identity or an unseeded random source, so a replayed run produces
the same ids.
"""

from __future__ import annotations

from typing import NewType, Protocol

__all__ = [
    "NodeId",
    "InstanceId",
    "RunnerId",
    "TaskId",
    "CommandId",
    "ModelId",
    "RandomSource",
    "derive_id",
]

NodeId = NewType("NodeId", str)
InstanceId = NewType("InstanceId", str)
RunnerId = NewType("RunnerId", str)
TaskId = NewType("TaskId", str)
CommandId = NewType("CommandId", str)
ModelId = NewType("ModelId", str)


class RandomSource(Protocol):
    """The slice of ``random.Random`` the core may use; the driver seeds it."""

    def random(self) -> float: ...

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int: ...

    def getrandbits(self, k: int) -> int: ...


def derive_id(prefix: str, *parts: object) -> str:
    """A short, stable id derived from ``parts`` (FNV-1a 64, hex).

    Stable across processes and Python versions (no ``hash()``), so every node
    deriving an id from the same inputs gets the same string.
    """
    acc = 0xCBF29CE484222325
    for part in parts:
        for byte in str(part).encode("utf-8") + b"\x1f":
            acc ^= byte
            acc = (acc * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{prefix}-{acc:016x}"
