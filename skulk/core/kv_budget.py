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

- a row's cache grows to at most ``reserve = prompt tokens + max_tokens``
  positions (the last sampled token is never fed back, one pipelined step may
  be wasted: never more than that);
- a cache allocates in steps (mlx-lm's ``KVCache.step``, 256), so a buffer
  holds fewer than ``slack_tokens = step - 1`` positions beyond its content;
- two or more rows share one left-padded ``BatchKVCache``: every row is as
  long as the longest, so ``rows`` hold ``len(rows) x (max(rows) + slack)``
  positions (one row alone: its own length plus slack);
- the prefix cache's entries are stored compact: exactly their positions.

Reserving ``prompt + max_tokens`` when a request starts (as TGI's
``max_batch_total_tokens`` does) means a row never outgrows the budget later,
so nothing ever has to be preempted mid-stream.

The budget (``budget_tokens``) is the KV placement reserved, in this runner's
positions, and never less than one request at the context ceiling plus slack:
admission already promises a lone request that much, so concurrency never
needs more KV than the worst single request would.

Decisions, for the request at the head of the FIFO queue (``decide_admission``):

1. it fits beside the rows and the cache: admit it;
2. it fits once least-recently-used cache entries go: admit it and evict the
   fewest entries, oldest first;
3. it does not fit even with the cache empty: it waits (rows finish and give
   their KV back); once it has waited ``max_wait_s`` it is refused with
   ``kv_budget_exhausted`` and a ``Retry-After`` estimate.

When a row leaves, ``plan_store`` says whether its KV may stay as a cache
entry (evicting older entries if that makes room) or must go.

Invariants (property-tested in ``tests/core/test_kv_budget.py``): after any
sequence of these decisions the positions held never exceed the budget; a
request whose reserve fits the budget alone is admitted at the latest when
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


def rows_tokens(reserves: Sequence[int], slack_tokens: int = MLX_KV_STEP_TOKENS - 1) -> int:
    """Positions a decode batch holds at most: every row as long as the longest, plus slack."""
    assert slack_tokens >= 0, slack_tokens
    if not reserves:
        return 0
    assert min(reserves) > 0, reserves
    return len(reserves) * (max(reserves) + slack_tokens)


def held_tokens(reserves: Sequence[int], entries: Sequence[CacheEntry], slack_tokens: int = MLX_KV_STEP_TOKENS - 1) -> int:
    """Everything a runner holds: the rows (``rows_tokens``) plus every cache entry."""
    return rows_tokens(reserves, slack_tokens) + sum(e.tokens for e in entries)


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
    *, budget: int, reserve: int, rows_remaining: Sequence[tuple[int, int]], step_s: float, slack_tokens: int = MLX_KV_STEP_TOKENS - 1
) -> int:
    """Seconds until a request of ``reserve`` positions would fit, if every row ran to its end.

    ``rows_remaining`` holds (reserve, steps left) per row; rows leave in
    order of steps left, each step taking ``step_s``. An upper bound (rows
    often stop early), rounded up, between 1 and ``RETRY_AFTER_MAX_S``.
    """
    assert reserve > 0 and step_s >= 0, (reserve, step_s)
    running = sorted(rows_remaining, key=lambda r: (r[1], r[0]))
    waited_steps = 0
    while running and rows_tokens([r for r, _ in running] + [reserve], slack_tokens) > budget:
        waited_steps = max(waited_steps, running[0][1])
        running.pop(0)
    seconds = math.ceil(waited_steps * step_s)
    return max(1, min(RETRY_AFTER_MAX_S, seconds))


def decide_admission(
    *,
    now: float,
    budget: int,
    rows: Sequence[int],
    reserve: int,
    entries: Sequence[CacheEntry],
    waiting_since: float,
    max_wait_s: float,
    rows_remaining: Sequence[tuple[int, int]] = (),
    step_s: float = 0.0,
    slack_tokens: int = MLX_KV_STEP_TOKENS - 1,
) -> Decision:
    """Admit, wait or refuse the request at the head of the queue (module docstring).

    Inputs: ``rows`` the reserves of the rows decoding or prefilling now,
    ``reserve`` the candidate's (prompt + max_tokens), ``entries`` the cache
    in least-recently-used order (oldest first), when it started waiting and
    how long it may, and (for the Retry-After estimate) each row's reserve
    and steps left with the recent time per step.
    """
    assert reserve > 0, reserve
    assert max_wait_s >= 0 and now >= waiting_since - 1e-9, (max_wait_s, now, waiting_since)
    need = rows_tokens([*rows, reserve], slack_tokens)
    evict = _evict_oldest(entries, budget - need)
    if evict is not None:
        kept = sum(e.tokens for e in entries if e.entry_id not in evict)
        assert need + kept <= budget, (need, kept, budget)
        return Admit(evict=evict)
    short = need - budget
    assert short > 0, (need, budget)
    if now - waiting_since < max_wait_s:
        return Wait(short_tokens=short)
    after = retry_after_s(budget=budget, reserve=reserve, rows_remaining=rows_remaining, step_s=step_s, slack_tokens=slack_tokens)
    message = (
        f"{KV_BUDGET_EXHAUSTED}: this request needs {reserve} KV positions (prompt + max_tokens) beside "
        f"{len(rows)} running request(s) holding {rows_tokens(rows, slack_tokens)}, over the runner's KV budget of "
        f"{budget} positions; it waited {now - waiting_since:.0f}s (SKULK_KV_QUEUE_WAIT_SECONDS={max_wait_s:g}); "
        f"retry after {after}s, or lower max_tokens"
    )
    return Refuse(retry_after_s=after, message=message)


def plan_store(
    *,
    budget: int,
    rows: Sequence[int],
    entries: Sequence[CacheEntry],
    new_tokens: int,
    cap_tokens: int,
    max_entries: int,
    slack_tokens: int = MLX_KV_STEP_TOKENS - 1,
) -> StorePlan:
    """May a leaving row's ``new_tokens`` positions stay as a cache entry?

    ``rows`` are the reserves of the rows that stay (and the one prefilling),
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
