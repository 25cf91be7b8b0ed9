"""The prefix cache and the KV ledger: conversations don't re-prefill, KV stays in one budget.

Theory of operation
-------------------
A chat client re-sends the whole conversation every turn. When a request
leaves the decode batch, its KV cache (prompt plus generated tokens) can stay
behind as a cache *entry*; a later request whose prompt starts with the same
tokens is seeded with that KV and prefills only the rest. Entries live on
every rank (each holds its own layers), and rank 0 alone decides:

- ``PrefixIndex`` (rank 0) knows which token sequences are cached (mlx-lm's
  ``PromptTrie``), their ids, lengths and least-recently-used order, and
  finds the longest reusable prefix of a prompt;
- ``KvLedger`` (rank 0) owns the runner's KV budget (``skulk.core.kv_budget``)
  and decides, each step, which leaving rows are stored, which entries are
  evicted and whether the next request may start (and from which entry);
- ``PrefixStore`` (every rank) holds the entries' KV and applies those
  decisions, which ride in the step's ``Plan`` (``skulk.engine.batch``):
  ``store`` (row, entry id, positions), ``seed`` (entry id, positions) and
  ``evict`` (entry ids). All ranks apply the same plans, so their stores
  hold the same entries with the same positions; bytes differ by rank (each
  holds its own layers), positions never do.

Reuse follows mlx-lm's prompt cache (``LRUPromptCache.fetch_nearest_cache``):
an entry that is a prefix of the prompt is used whole; an entry that shares
a longer common prefix is trimmed to it (KV caches are trimmable). At most
all but the prompt's last token comes from the cache: that token is the
first decode input. Storing an entry drops the entries that are its prefixes
(it serves them by trimming). Seeding never copies: the new cache starts as a
slice of the entry's arrays and reallocates on its first write, as mlx-lm's
``KVCache`` always does when full, so an entry is never modified.

Only models whose every layer uses mlx-lm's plain ``KVCache`` get a prefix
cache (``prefix_cache_support``): a rotating (sliding-window) cache cannot be
trimmed once it wraps, and ranks must agree on what they can do. The budget
applies to every model.

Invariants: the index and every rank's store hold the same entry ids with
the same positions; an entry's arrays are exactly its positions long (no
allocation slack: ``mx.contiguous`` copies); an entry is never written after
it is stored; the budget's positions (rows in the padded layout plus entries)
never exceed ``KvLedger.budget()``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, PromptTrie

from skulk.core.kv_budget import (
    KV_BUDGET_EXHAUSTED,
    MLX_KV_STEP_TOKENS,
    Admit,
    CacheEntry,
    Decision,
    Refuse,
    RowSpan,
    budget_tokens,
    decide_admission,
    plan_store,
    rows_tokens,
)

__all__ = [
    "KV_BUDGET_EXHAUSTED",
    "SLACK_TOKENS",
    "DEFAULT_MAX_ENTRIES",
    "Hit",
    "KvSnapshot",
    "PrefixIndex",
    "PrefixStore",
    "KvLedger",
    "prefix_cache_support",
    "kv_bytes_per_position",
]

SLACK_TOKENS = KVCache.step - 1  # a cache buffer holds fewer than a step of unused positions
DEFAULT_MAX_ENTRIES = 64  # bounds the index (mlx_lm.server keeps 10 by default)
_TRIE_KEY = 0  # PromptTrie is keyed by model; one runner serves one model
assert KVCache.step == MLX_KV_STEP_TOKENS, "skulk.core.kv_budget models mlx-lm's allocation step"


def prefix_cache_support(cache: list[Any]) -> str | None:
    """None when prefixes of ``cache`` (a fresh per-layer cache list) can be cached; else why not."""
    kinds = sorted({type(c).__name__ for c in cache if type(c) is not KVCache})
    if kinds:
        return f"layers use {', '.join(kinds)} (only mlx-lm's KVCache can be trimmed to any prefix)"
    return None


def kv_bytes_per_position(cache: list[Any] | None) -> int:
    """Bytes one position of one row costs across ``cache``'s layers; 0 when nothing is allocated."""
    if not cache:
        return 0
    total = 0
    for c in cache:
        keys = getattr(c, "keys", None)
        values = getattr(c, "values", None)
        if keys is None or values is None or keys.ndim != 4 or keys.shape[0] * keys.shape[2] == 0:
            return 0
        rows_positions = keys.shape[0] * keys.shape[2]
        total += keys.nbytes // rows_positions + values.nbytes // (values.shape[0] * values.shape[2])
    return total


# --- every rank -------------------------------------------------------------------------------


class PrefixStore:
    """One rank's cache entries: id -> per-layer ``KVCache`` holding exactly the entry's positions."""

    def __init__(self) -> None:
        self.entries: dict[int, list[KVCache]] = {}

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for layers in self.entries.values() for c in layers)

    def store(self, entry_id: int, caches: list[Any], positions: int) -> list[mx.array]:
        """Keep the first ``positions`` of ``caches`` as entry ``entry_id``; returns arrays to evaluate."""
        assert entry_id not in self.entries, f"entry {entry_id} stored twice"
        assert positions > 0, positions
        layers: list[KVCache] = []
        for c in caches:
            assert isinstance(c, KVCache), type(c).__name__
            assert c.offset >= positions, (c.offset, positions)
            kept = KVCache()
            # A copy of exactly these positions: the row's buffer (with its slack) is freed.
            kept.keys = mx.contiguous(c.keys[..., :positions, :])
            kept.values = mx.contiguous(c.values[..., :positions, :])
            kept.offset = positions
            layers.append(kept)
        self.entries[entry_id] = layers
        return [a for c in layers for a in (c.keys, c.values)]

    def seed(self, entry_id: int, positions: int) -> list[Any]:
        """A fresh per-layer cache holding the first ``positions`` of entry ``entry_id``."""
        layers = self.entries[entry_id]
        seeded: list[Any] = []
        for c in layers:
            assert 0 < positions <= c.offset, (positions, c.offset)
            new = KVCache()
            # Slices are new arrays: writes to ``new`` reallocate (it is full) and never touch the entry.
            new.keys = c.keys[..., :positions, :]
            new.values = c.values[..., :positions, :]
            new.offset = positions
            seeded.append(new)
        return seeded

    def evict(self, entry_id: int) -> None:
        del self.entries[entry_id]


def row_caches(decode_cache: list[Any], batch: int, row: int) -> list[Any]:
    """Row ``row`` of the decode batch as per-layer single-row caches."""
    assert 0 <= row < batch, (row, batch)
    if batch == 1:
        return decode_cache
    out = []
    for c in decode_cache:
        assert isinstance(c, BatchKVCache), type(c).__name__
        out.append(c.extract(row))
    return out


# --- rank 0 ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    """Seed a new request with the first ``positions`` of entry ``entry_id``."""

    entry_id: int
    positions: int


class PrefixIndex:
    """Which token sequences the cache holds, in least-recently-used order (rank 0 only)."""

    def __init__(self) -> None:
        self._trie = PromptTrie()
        self._lru: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # oldest first
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._lru)

    def entries(self) -> list[CacheEntry]:
        """Every entry, least recently used first."""
        return [CacheEntry(entry_id=i, tokens=len(t)) for i, t in self._lru.items()]

    @property
    def positions(self) -> int:
        return sum(len(t) for t in self._lru.values())

    def lookup(self, prompt: Sequence[int]) -> Hit | None:
        """The longest reusable prefix of ``prompt`` (at most all but its last token); touches the entry."""
        body = list(prompt[:-1])
        if not body or not self._lru:
            return None
        found = self._trie.search(_TRIE_KEY, body)
        if found.exact is not None:
            hit = Hit(self._trie.get(_TRIE_KEY, found.exact), len(body))
        else:
            short = len(found.shorter) if found.shorter is not None else 0
            if found.longer is not None and found.common_prefix > short:
                hit = Hit(self._trie.get(_TRIE_KEY, found.longer), found.common_prefix)
            elif short > 0:
                assert found.shorter is not None
                hit = Hit(self._trie.get(_TRIE_KEY, found.shorter), short)
            else:
                return None
        assert 0 < hit.positions <= len(self._lru[hit.entry_id]), (hit, len(self._lru[hit.entry_id]))
        self._lru.move_to_end(hit.entry_id)
        return hit

    def add(self, tokens: Sequence[int]) -> tuple[int, tuple[int, ...]]:
        """Index ``tokens`` as a new entry; returns (its id, ids it supersedes, now removed).

        Entries that are prefixes of ``tokens`` (or equal to it) are dropped:
        the new entry serves them by trimming, as mlx-lm's prompt cache does.
        """
        key = tuple(int(t) for t in tokens)
        assert key, "an empty entry"
        entry_id = self._next_id
        self._next_id += 1
        superseded = [prev] if (prev := self._trie.add(_TRIE_KEY, list(key), entry_id)) is not None else []
        superseded += [value for _, value in self._trie.pop_prefixes(_TRIE_KEY, list(key))]
        for old in superseded:
            del self._lru[old]
        self._lru[entry_id] = key
        return entry_id, tuple(superseded)

    def prefixes_of(self, tokens: Sequence[int]) -> list[int]:
        """Ids of the entries that are prefixes of (or equal to) ``tokens``, without changing anything."""
        key = tuple(tokens)
        return [i for i, t in self._lru.items() if len(t) <= len(key) and key[: len(t)] == t]

    def remove(self, entry_id: int) -> None:
        tokens = self._lru.pop(entry_id)
        popped = self._trie.pop(_TRIE_KEY, list(tokens))
        assert popped == entry_id, (popped, entry_id)


@dataclass(frozen=True)
class KvSnapshot:
    """What the ledger holds now, for the runner's status, heartbeats and the tests."""

    budget_positions: int
    rows_positions: int  # the most the rows decoding or prefilling may hold (their peak, padded layout)
    cache_positions: int
    cache_entries: int
    bytes_per_position: int  # this rank's; 0 until measured
    hits: int
    misses: int
    positions_reused: int
    stored: int
    evicted: int
    refused: int


class KvLedger:
    """Rank 0's KV bookkeeping: the budget, the prefix index and the counters.

    ``measure`` returns this rank's bytes per KV position (0 until a cache
    holds something); ``reserved_kv_bytes`` is what placement reserved for
    this shard's KV (0: unknown, the context ceiling decides).
    ``cache_bytes`` bounds the prefix cache (None: whatever the budget
    leaves; 0: no prefix cache).
    """

    def __init__(
        self,
        *,
        context_ceiling: int,
        reserved_kv_bytes: int,
        queue_wait_s: float,
        cache_bytes: int | None,
        measure: Callable[[], int],
        cache_support: str | None = None,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        assert context_ceiling > 0 and reserved_kv_bytes >= 0 and queue_wait_s >= 0
        assert cache_bytes is None or cache_bytes >= 0
        self.context_ceiling = context_ceiling
        self.reserved_kv_bytes = reserved_kv_bytes
        self.queue_wait_s = queue_wait_s
        self.cache_bytes = cache_bytes
        self.max_entries = max_entries
        self._measure = measure
        self._per_position = 0
        self.index = PrefixIndex()
        # Why there is no prefix cache (None: there is one).
        self.cache_off_reason = cache_support or ("SKULK_PREFIX_CACHE_BYTES=0" if cache_bytes == 0 else None)
        self.hits = self.misses = self.positions_reused = self.stored = self.evicted = self.refused = 0

    @property
    def cache_enabled(self) -> bool:
        return self.cache_off_reason is None

    def bytes_per_position(self) -> int:
        if self._per_position == 0:
            self._per_position = self._measure()
        return self._per_position

    def budget(self) -> int:
        """The KV positions this runner may hold (``skulk.core.kv_budget.budget_tokens``)."""
        return budget_tokens(
            context_ceiling=self.context_ceiling,
            slack_tokens=SLACK_TOKENS,
            reserved_kv_bytes=self.reserved_kv_bytes,
            kv_bytes_per_token=self.bytes_per_position(),
        )

    def cache_cap(self) -> int:
        if not self.cache_enabled:
            return 0
        if self.cache_bytes is None:
            return self.budget()
        per = self.bytes_per_position()
        return self.cache_bytes // per if per else 0

    def leave(self, leaving: Sequence[tuple[int, Sequence[int]]], staying: Sequence[RowSpan]) -> tuple[list[tuple[int, int, int]], list[int]]:
        """Rows leave the batch: which to keep as entries, which entries to evict.

        ``leaving`` holds (row index, the tokens its cache holds, in order);
        ``staying`` the rows that stay (and the one prefilling). Returns the
        plan's ``store`` triples (row, entry id, positions) and ``evict`` ids.
        Updates the index to match.
        """
        stores: list[tuple[int, int, int]] = []
        evicts: list[int] = []
        if not self.cache_enabled:
            return stores, evicts
        for row, tokens in leaving:
            if not tokens:
                continue
            covered = set(self.index.prefixes_of(tokens))
            others = [e for e in self.index.entries() if e.entry_id not in covered]
            plan = plan_store(
                budget=self.budget(),
                rows=staying,
                entries=others,
                new_tokens=len(tokens),
                cap_tokens=self.cache_cap(),
                max_entries=self.max_entries,
                slack_tokens=SLACK_TOKENS,
            )
            if not plan.store:
                continue
            for entry_id in plan.evict:
                self.index.remove(entry_id)
                evicts.append(entry_id)
            entry_id, superseded = self.index.add(tokens)
            assert set(superseded) == covered, (superseded, covered)
            evicts += superseded
            self.evicted += len(plan.evict) + len(superseded)
            self.stored += 1
            stores.append((row, entry_id, len(tokens)))
        return stores, evicts

    def admit(
        self,
        *,
        now: float,
        rows: Sequence[RowSpan],
        request: RowSpan,
        prompt: Sequence[int],
        waiting_since: float,
        step_s: float,
    ) -> tuple[Decision, Hit | None]:
        """Decide the head of the queue (``decide_admission``); on admission, its cache hit.

        Evicted entries leave the index here; the plan must carry them after
        the seed (the hit's entry may be among them: it seeds first).
        """
        decision = decide_admission(
            now=now,
            budget=self.budget(),
            rows=rows,
            request=request,
            entries=self.index.entries(),
            waiting_since=waiting_since,
            max_wait_s=self.queue_wait_s,
            step_s=step_s,
            slack_tokens=SLACK_TOKENS,
        )
        if not isinstance(decision, Admit):
            if isinstance(decision, Refuse):
                self.refused += 1
            return decision, None
        hit = self.index.lookup(prompt) if self.cache_enabled else None
        for entry_id in decision.evict:
            self.index.remove(entry_id)
        self.evicted += len(decision.evict)
        if self.cache_enabled:
            if hit is None:
                self.misses += 1
            else:
                self.hits += 1
                self.positions_reused += hit.positions
        return decision, hit

    def evict_all(self) -> list[int]:
        """Forget every entry (the plan must carry the returned ids)."""
        ids = [e.entry_id for e in self.index.entries()]
        for entry_id in ids:
            self.index.remove(entry_id)
        return ids

    def reset_counters(self) -> None:
        self.hits = self.misses = self.positions_reused = self.stored = self.evicted = self.refused = 0

    def snapshot(self, rows: Sequence[RowSpan]) -> KvSnapshot:
        return KvSnapshot(
            budget_positions=self.budget(),
            rows_positions=rows_tokens(rows, SLACK_TOKENS),
            cache_positions=self.index.positions,
            cache_entries=len(self.index),
            bytes_per_position=self.bytes_per_position(),
            hits=self.hits,
            misses=self.misses,
            positions_reused=self.positions_reused,
            stored=self.stored,
            evicted=self.evicted,
            refused=self.refused,
        )
