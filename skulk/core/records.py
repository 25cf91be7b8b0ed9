"""Base classes for every typed, immutable record in Skulk.

``Record`` is a frozen msgspec struct whose fields are camelCase on the wire.
``TaggedRecord`` marks a member of a tagged union: on the wire it is written as a
single-key object, ``{"InstanceCreated": {...}}``, which is the shape Skulk's
published API uses (see ``skulk.core.codec``).
"""

from __future__ import annotations

import msgspec

__all__ = ["Record", "TaggedRecord"]


class Record(msgspec.Struct, frozen=True, kw_only=True, rename="camel", gc=False):
    """An immutable record; camelCase keys on the wire."""


class TaggedRecord(Record, frozen=True, kw_only=True, rename="camel"):
    """A member of a tagged union; written as ``{ClassName: {...}}``."""
