"""Fixed-shape collectives that keep speculating ranks in lockstep.

Theory of operation
-------------------
Every rank of an instance must apply the same draft tokens and the same
accept decisions, or their KV caches diverge. Ranks may run on different
hardware, where the same logits can round differently, so no rank other than
0 ever decides anything: rank 0 decides and *broadcasts*. A broadcast is an
``all_sum`` over a fixed-shape int32 array in which only rank 0 contributes
non-zero values; every rank knows the shape in advance, so the collectives
pair up without any other agreement, and the sum is exact.

Two uses:

- ``TokenAgreement``: during symmetric drafting on tensor placements, each
  draft token is replaced by rank 0's choice (one ``(1,)`` all-sum per token);
- ``agree_capability``: at load time, speculation is on only when every rank
  can speculate (an all-sum of one flag per rank).

Engine steps themselves travel on the engine's ``PlanChannel``.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

__all__ = ["TokenAgreement", "agree_capability"]


class TokenAgreement:
    """Replace a lazily chosen token by rank 0's choice, on every rank."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = group.rank()
        self.calls = 0

    def __call__(self, token: mx.array) -> mx.array:
        """``token`` (1,) uint32 -> rank 0's token (1,) uint32 (evaluated)."""
        assert token.shape == (1,), token.shape
        # Evaluate first on every rank: a follower's zero contribution does not
        # depend on its (lazy, collective-bearing) draft forward, so without this
        # its all-sum could be issued before the forward's own all-sums while
        # rank 0's waits for them, and the ranks would deadlock.
        mx.eval(token)
        mine = token.astype(mx.int32) if self.rank == 0 else mx.zeros((1,), dtype=mx.int32)
        agreed = mx.distributed.all_sum(mine, group=self.group)
        mx.eval(agreed)
        self.calls += 1
        return agreed.astype(mx.uint32)


def agree_capability(group: Any | None, able: bool) -> tuple[bool, int]:
    """Return (every rank is able, how many ranks are able); a collective on ``group``.

    A world of one (``group`` None) simply returns ``(able, int(able))``.
    """
    if group is None or group.size() == 1:
        return able, int(able)
    total = mx.distributed.all_sum(mx.array([1 if able else 0], dtype=mx.int32), group=group)
    count = int(total.item())
    assert 0 <= count <= group.size(), count
    return count == group.size(), count
