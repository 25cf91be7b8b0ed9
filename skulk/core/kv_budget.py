"""One KV budget per runner: how many KV positions rows and the prefix cache may hold.

Theory of operation
-------------------
Placement reserves KV memory for every shard (``skulk.core.memory``: the KV
bytes of ``REFERENCE_CONTEXT_TOKENS`` tokens times the shard's share), and
admission promises each request up to the instance's context ceiling. Without
a budget, eight concurrent long streams can together need eight ceilings of
KV: the out-of-memory crash the memory model exists to prevent, back through
concurrency. This module is the arithmetic a runner's rank 0 uses to keep all
its KV (rows decoding, the request being prefilled, the prefix cache) inside
one budget. It counts **KV positions** (tokens) rather than bytes: every rank
of an instance holds the same positions for the same requests (each with its
own bytes per position), so a decision in positions is the same on every rank.

The model of what memory a set of rows holds follows mlx-lm's caches exactly:

- a cache allocates in steps (mlx-lm's ``KVCache.step``, 256), so a buffer
  holds fewer than ``slack_tokens = step - 1`` positions beyond its content;
- two or more rows share one left-padded ``BatchKVCache``: every row is as
  long as the longest, so ``n`` rows of which the longest holds ``L``
  positions take ``n x (L + slack)``; a row leaving shrinks the batch;
- every row grows by one position per step until it has fed its last input:
  at most ``final = prompt tokens + max_tokens`` positions (the last sampled
  token is never fed back; one pipelined step may be wasted: never more);
- the prefix cache's entries are stored compact: exactly their positions.

Each row is a ``RowSpan``: the positions it holds now, the most it may reach
and the most steps until it leaves. ``rows_tokens`` is the most the rows can
ever hold together from now on, if each runs to its ``max_tokens``: as rows
finish the batch shrinks while the others grow, so the peak is the largest
``alive x (longest + slack)`` at the moments rows end. A row stopping early
only lowers it; a request being prefilled counts as a row already holding its
whole prompt and growing from now, ending only after its prefill's steps too,
an upper bound on what it will hold at any step. So a set of rows admitted
under the budget stays under it for the rest of its life: nothing is ever
preempted (TGI's ``max_batch_total_tokens`` reserves ``input + max_new_tokens``
the same way), and short requests still fit beside one long one (the padded
batch only costs while both are alive).

The budget (``budget_tokens``) is the KV placement reserved, in this runner's
positions, and never less than one request at the context ceiling plus slack:
admission already promises a lone request that much, so concurrency never
needs more KV than the worst single request would.

Decisions, for the request at the head of the FIFO queue (``decide_admission``):

1. it fits beside the rows and the cache (their peak, ``rows_tokens``): admit it;
2. it fits once least-recently-used cache entries go: admit it and evict the
   fewest entries, oldest first;
3. it does not fit even with the cache empty: it waits (rows finish and give
   their KV back); once it has waited ``max_wait_s`` it is refused with
   ``kv_budget_exhausted`` and a ``Retry-After`` estimate.

When a row leaves, ``plan_store`` says whether its KV may stay as a cache
entry (evicting older entries if that makes room) or must go.

Invariants (property-tested in ``tests/core/test_kv_budget.py``): after any
sequence of these decisions the positions held never exceed the budget; a
request whose ``final`` fits the budget alone is admitted at the latest when
the rows ahead of it have finished; evictions are always the oldest entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from skulk.core.records import Record

__all__ = [
    "KV_BUDGET_EXHAUSTED",
    "MLX_KV_STEP_TOKENS",
    "RETRY_AFTER_MAX_S",
    "CacheEntry",
    "RowSpan",
    "Admit",
    "Wait",
    "Refuse",
    "Decision",
    "StorePlan",
    "budget_tokens",
    "rows_tokens",
    "held_tokens",
    "decide_admission",
    "plan_store",
    "retry_after_s",
]

KV_BUDGET_EXHAUSTED = "kv_budget_exhausted"
MLX_KV_STEP_TOKENS = 256  # mlx-lm's KVCache.step: caches grow in blocks of this many positions
RETRY_AFTER_MAX_S = 3600  # never tell a client to come back later than an hour


class CacheEntry(Record, frozen=True, kw_only=True):
    """One prefix-cache entry as the budget sees it: its id and its positions."""

    entry_id: int
    tokens: int


class RowSpan(Record, frozen=True, kw_only=True):
    """A row (or a request about to start) as the budget sees it.

    ``held``: positions it holds now (a request not yet prefilled: its whole
    prompt); ``final``: the most it may ever hold (prompt + max_tokens);
    ``steps``: the most engine steps until it leaves the batch.
    """

    held: int
    final: int
    steps: int

    def __post_init__(self) -> None:
        assert 0 <= self.held <= self.final and self.final > 0 and self.steps >= 0, self

    def after(self, steps: int) -> RowSpan:
        """This row ``steps`` steps later (one position per step, at most ``final``)."""
        return RowSpan(held=min(self.final, self.held + steps), final=self.final, steps=max(0, self.steps - steps))


class Admit(Record, frozen=True, kw_only=True):
    """Start the request now, after evicting these entries (oldest first)."""

    evict: tuple[int, ...] = ()


class Wait(Record, frozen=True, kw_only=True):
    """Keep the request queued: ``short_tokens`` positions are missing even with an empty cache."""

    short_tokens: int


class Refuse(Record, frozen=True, kw_only=True):
    """Refuse the request (503 ``kv_budget_exhausted``); the client may retry after ``retry_after_s``."""

    retry_after_s: int
    message: str


Decision = Admit | Wait | Refuse


class StorePlan(Record, frozen=True, kw_only=True):
    """Keep a leaving row's KV as a cache entry (``store``) after evicting ``evict``."""

    store: bool
    evict: tuple[int, ...] = ()


def budget_tokens(
    *,
    context_ceiling: int,
    slack_tokens: int = MLX_KV_STEP_TOKENS - 1,
    reserved_kv_bytes: int = 0,
    kv_bytes_per_token: int = 0,
) -> int:
    """The KV positions one runner may hold in all.

    Inputs: the instance's context ceiling, the allocation slack, the KV bytes
    placement reserved for this shard and what one position costs on this
    rank (both 0 when unknown). Output: ``max(reserved // per position,
    ceiling + slack)``, so a request admission accepted always fits alone.
    """
    assert context_ceiling > 0, context_ceiling
    assert slack_tokens >= 0 and reserved_kv_bytes >= 0 and kv_bytes_per_token >= 0
    lone = context_ceiling + slack_tokens
    reserved = reserved_kv_bytes // kv_bytes_per_token if kv_bytes_per_token > 0 else 0
    return max(reserved, lone)


def rows_tokens(rows: Sequence[RowSpan], slack_tokens: int = MLX_KV_STEP_TOKENS - 1) -> int:
    """The most positions ``rows`` can hold together from now on (module docstring).

    The batch is padded to its longest row, so the largest ``alive x (longest
    + slack)`` over the steps to come, which is reached when some row ends.
    """
    assert slack_tokens >= 0, slack_tokens
    peak = 0
    for end in sorted({0, *(r.steps for r in rows)}):
        alive = [r.after(end) for r in rows if r.steps >= end]
        if alive:
            peak = max(peak, len(alive) * (max(r.held for r in alive) + slack_tokens))
    return peak


def held_tokens(rows: Sequence[RowSpan], entries: Sequence[CacheEntry], slack_tokens: int = MLX_KV_STEP_TOKENS - 1) -> int:
    """Everything a runner may hold from now on: the rows' peak (``rows_tokens``) plus every cache entry."""
    return rows_tokens(rows, slack_tokens) + sum(e.tokens for e in entries)


def _evict_oldest(entries: Sequence[CacheEntry], room: int) -> tuple[int, ...] | None:
    """The fewest oldest entries whose removal leaves the rest within ``room``; None if impossible."""
    held = sum(e.tokens for e in entries)
    if room < 0:
        return None
    evict: list[int] = []
    for entry in entries:
        if held <= room:
            break
        evict.append(entry.entry_id)
        held -= entry.tokens
    assert held >= 0
    return tuple(evict) if held <= room else None


def retry_after_s(
    *, budget: int, request: RowSpan, rows: Sequence[RowSpan], step_s: float, slack_tokens: int = MLX_KV_STEP_TOKENS - 1
) -> int:
    """Seconds until ``request`` would fit beside what is left of ``rows``, if every row ran to its end.

    An upper bound (rows often stop early, and the cache can always be
    emptied), each step taking ``step_s``; rounded up, between 1 and
    ``RETRY_AFTER_MAX_S``.
    """
    assert step_s >= 0, step_s
    for wait in sorted({0, *(r.steps for r in rows)}):
        left = [r.after(wait) for r in rows if r.steps > wait]
        if rows_tokens([*left, request], slack_tokens) <= budget:
            return max(1, min(RETRY_AFTER_MAX_S, math.ceil(wait * step_s)))
    return RETRY_AFTER_MAX_S  # it does not fit even alone (admission should have refused it)


def decide_admission(
    *,
    now: float,
    budget: int,
    rows: Sequence[RowSpan],
    request: RowSpan,
    entries: Sequence[CacheEntry],
    waiting_since: float,
    max_wait_s: float,
    step_s: float = 0.0,
    slack_tokens: int = MLX_KV_STEP_TOKENS - 1,
) -> Decision:
    """Admit, wait or refuse the request at the head of the queue (module docstring).

    Inputs: ``rows`` the rows decoding or prefilling now, ``request`` the
    candidate, ``entries`` the cache in least-recently-used order (oldest
    first), when it started waiting and how long it may, and the recent time
    per step (for the Retry-After estimate).
    """
    assert max_wait_s >= 0 and now >= waiting_since - 1e-9, (max_wait_s, now, waiting_since)
    need = rows_tokens([*rows, request], slack_tokens)
    evict = _evict_oldest(entries, budget - need)
    if evict is not None:
        kept = sum(e.tokens for e in entries if e.entry_id not in evict)
        assert need + kept <= budget, (need, kept, budget)
        return Admit(evict=evict)
    short = need - budget
    assert short > 0, (need, budget)
    if now - waiting_since < max_wait_s:
        return Wait(short_tokens=short)
    after = retry_after_s(budget=budget, request=request, rows=rows, step_s=step_s, slack_tokens=slack_tokens)
    message = (
        f"{KV_BUDGET_EXHAUSTED}: this request needs up to {request.final} KV positions (prompt + max_tokens) beside "
        f"{len(rows)} running request(s) that may hold {rows_tokens(rows, slack_tokens)}, over the runner's KV budget of "
        f"{budget} positions; it waited {now - waiting_since:.0f}s (SKULK_KV_QUEUE_WAIT_SECONDS={max_wait_s:g}); "
        f"retry after {after}s, or lower max_tokens"
    )
    return Refuse(retry_after_s=after, message=message)


def plan_store(
    *,
    budget: int,
    rows: Sequence[RowSpan],
    entries: Sequence[CacheEntry],
    new_tokens: int,
    cap_tokens: int,
    max_entries: int,
    slack_tokens: int = MLX_KV_STEP_TOKENS - 1,
) -> StorePlan:
    """May a leaving row's ``new_tokens`` positions stay as a cache entry?

    ``rows`` are the rows that stay (and the one prefilling),
    ``entries`` the cache oldest first, ``cap_tokens`` and ``max_entries`` the
    cache's own bounds. Evicts the fewest oldest entries that make room; if
    even an empty cache could not hold it, nothing is stored or evicted.
    """
    assert new_tokens > 0 and cap_tokens >= 0 and max_entries >= 0, (new_tokens, cap_tokens, max_entries)
    room = min(budget - rows_tokens(rows, slack_tokens), cap_tokens) - new_tokens
    if room < 0 or max_entries == 0:
        return StorePlan(store=False)
    evict = _evict_oldest(entries, room)
    assert evict is not None  # room >= 0: evicting everything always works
    over = len(entries) - len(evict) + 1 - max_entries
    if over > 0:
        survivors = [e.entry_id for e in entries if e.entry_id not in evict]
        evict = evict + tuple(survivors[:over])
    return StorePlan(store=True, evict=evict)
