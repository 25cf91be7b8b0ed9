"""Seeded randomness: every random draw of a run comes from its seed.

Theory of operation
-------------------
A run has one integer seed. Each part of the simulator that needs randomness
asks for its own generator by *purpose* (``"net"``, ``"runner:n2"``,
``"client:3"``...). A generator is ``random.Random(f"{seed}:{purpose}")``:
seeding from a string hashes it with SHA-512 inside ``random``, which does not
depend on ``PYTHONHASHSEED``, so a seed means the same run in every process.

Separate streams per purpose keep a run stable under local edits: adding a
draw to the client model does not shift every network latency after it.

Invariants kept: the same ``(seed, purpose)`` always yields the same stream;
no module of the simulator touches the global ``random`` state.
"""

from __future__ import annotations

import random

__all__ = ["Rngs", "derive"]


def derive(seed: int, purpose: str) -> random.Random:
    """A fresh generator for ``purpose`` in run ``seed`` (deterministic in both)."""
    assert isinstance(seed, int) and seed >= 0, f"seeds are non-negative integers, got {seed!r}"
    assert purpose, "a purpose names the stream"
    return random.Random(f"{seed}:{purpose}")


class Rngs:
    """The generators of one run, created on first use and cached by purpose.

    Asking twice for the same purpose returns the same generator (one stream
    per purpose per run), so callers can ask where they need it instead of
    threading generators through every constructor.
    """

    def __init__(self, seed: int) -> None:
        assert isinstance(seed, int) and seed >= 0, seed
        self.seed = seed
        self._streams: dict[str, random.Random] = {}

    def __call__(self, purpose: str) -> random.Random:
        rng = self._streams.get(purpose)
        if rng is None:
            rng = derive(self.seed, purpose)
            self._streams[purpose] = rng
        return rng
