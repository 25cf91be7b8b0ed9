"""The KV budget arithmetic (skulk.core.kv_budget): examples and properties.

Properties (Hypothesis), over random workloads driven through the same
decisions a runner's rank 0 makes (FIFO admission, rows finishing, leaving
rows stored as cache entries, cache hits touching entries):

- the positions mlx-lm's caches really hold (the padded batch of rows at
  their current lengths, the prefill cache, every entry, each buffer with its
  allocation slack) never exceed the budget at any step, for requests that
  stop early or run to ``max_tokens`` and prefills of any chunking;
- a request whose prompt + max_tokens fits the budget alone is admitted at
  the latest once the rows ahead of it have finished (no starvation, FIFO);
- with a bounded wait, every request is admitted or refused with a
  Retry-After of at least one second, never dropped;
- evictions always take the least recently used entries, and only as many
  as needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skulk.core.kv_budget import (
    KV_BUDGET_EXHAUSTED,
    RETRY_AFTER_MAX_S,
    Admit,
    CacheEntry,
    Refuse,
    RowSpan,
    StorePlan,
    Wait,
    budget_tokens,
    decide_admission,
    held_tokens,
    plan_store,
    retry_after_s,
    rows_tokens,
)

SLACK = 255
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def entries(*sizes: int) -> list[CacheEntry]:
    return [CacheEntry(entry_id=i, tokens=n) for i, n in enumerate(sizes)]


# --- examples -----------------------------------------------------------------------------


def row(held: int, final: int, steps: int | None = None) -> RowSpan:
    """A decoding row: ``steps`` defaults to one step per position left."""
    return RowSpan(held=held, final=final, steps=final - held if steps is None else steps)


def test_the_budget_is_the_placement_reservation_or_one_ceiling_request() -> None:
    # 8,192 reserved tokens at 1 KiB each, ceiling 4,096: the reservation wins.
    assert budget_tokens(context_ceiling=4096, reserved_kv_bytes=8192 * 1024, kv_bytes_per_token=1024) == 8192
    # A reservation smaller than one request at the ceiling (say float32 caches where the
    # card assumed fp16): a lone request admission accepted must still fit.
    assert budget_tokens(context_ceiling=8192, reserved_kv_bytes=4096 * 1024, kv_bytes_per_token=1024) == 8192 + SLACK
    # Nothing known yet: the ceiling alone.
    assert budget_tokens(context_ceiling=1000) == 1000 + SLACK


def test_rows_are_counted_at_their_peak_in_the_padded_batch_layout() -> None:
    assert rows_tokens([]) == 0
    assert rows_tokens([row(10, 100)]) == 100 + SLACK
    # Three rows that all run to the end together: three times the longest.
    assert rows_tokens([row(3900, 4000), row(10, 110), row(10, 110)]) == 3 * (4000 + SLACK)
    # A long row and a short one: two rows while the short one lives (the long one at 25
    # positions by then), then the long one alone at its end.
    assert rows_tokens([row(20, 4000), row(5, 12)]) == max(2 * (27 + SLACK), 4000 + SLACK)
    assert held_tokens([row(10, 100)], entries(50, 60)) == 100 + SLACK + 110
    # A request not yet prefilled holds its prompt now and ends after its prefill steps too.
    assert rows_tokens([RowSpan(held=500, final=600, steps=3 + 100), row(10, 60)]) == max(2 * (550 + SLACK), 600 + SLACK)


def test_admission_evicts_the_oldest_entries_first_and_no_more_than_needed() -> None:
    cache = entries(300, 200, 100)  # oldest first
    # Two rows of 1000 running to the end together: 2 x 1255 = 2510; budget 2800 leaves 290.
    kwargs = dict(now=0, rows=[row(0, 1000)], request=row(0, 1000), entries=cache, waiting_since=0, max_wait_s=30)
    assert decide_admission(budget=2800, **kwargs) == Admit(evict=(0, 1))  # type: ignore[arg-type]
    assert decide_admission(budget=3200, **kwargs) == Admit()  # type: ignore[arg-type]


def test_a_short_request_fits_beside_a_long_one() -> None:
    # The long row's final alone nearly fills the budget; a short request only doubles
    # the padded batch while it lives, when the long row is still short.
    decision = decide_admission(now=0, budget=4300, rows=[row(20, 4000)], request=RowSpan(held=10, final=20, steps=12),
                                entries=[], waiting_since=0, max_wait_s=30)  # fmt: skip
    assert decision == Admit()


def test_a_request_that_cannot_fit_waits_then_is_refused_with_retry_after() -> None:
    rows = [row(1400, 1500, 40), row(1400, 1500, 90)]
    kwargs = dict(budget=3000, rows=rows, request=row(900, 1000, 100), entries=entries(10), max_wait_s=30.0, step_s=0.05)
    wait = decide_admission(now=10.0, waiting_since=0.0, **kwargs)  # type: ignore[arg-type]
    assert wait == Wait(short_tokens=rows_tokens([*rows, row(900, 1000, 100)]) - 3000)
    refused = decide_admission(now=30.0, waiting_since=0.0, **kwargs)  # type: ignore[arg-type]
    assert isinstance(refused, Refuse)
    assert refused.message.startswith(KV_BUDGET_EXHAUSTED + ":")
    # After 40 steps one row is left (at 1500): 2 x (1500 + 255) > 3000. After 90, none.
    assert refused.retry_after_s == 5  # 90 steps x 0.05 s, rounded up


def test_retry_after_is_at_least_a_second_and_capped() -> None:
    assert retry_after_s(budget=5000, request=row(0, 100), rows=[], step_s=1.0) == 1
    assert retry_after_s(budget=2000, request=row(0, 1000), rows=[row(0, 1000, 10**9)], step_s=1.0) == RETRY_AFTER_MAX_S


def test_a_leaving_row_is_stored_after_evicting_older_entries_or_not_at_all() -> None:
    cache = entries(400, 300)
    stays = [row(0, 500)]  # 755 at its peak: 1245 left of 2000; the cache's cap is 800
    assert plan_store(budget=2000, rows=stays, entries=cache, new_tokens=500, cap_tokens=800, max_entries=8).evict == (0,)
    assert plan_store(budget=2000, rows=stays, entries=cache, new_tokens=900, cap_tokens=800, max_entries=8) == StorePlan(store=False)
    # The entry count is bounded too.
    assert plan_store(budget=10**6, rows=[], entries=cache, new_tokens=10, cap_tokens=10**6, max_entries=2).evict == (0,)
    assert plan_store(budget=10**6, rows=[], entries=cache, new_tokens=10, cap_tokens=10**6, max_entries=0).store is False


# --- properties: a faithful model of the engine's scheduling, and the memory it really holds ---


CHUNK = 16  # prefill chunk (positions per step while rows decode)


@st.composite
def budgets(draw: st.DrawFn) -> tuple[int, int]:
    """(ceiling, budget) as a runner derives them."""
    ceiling = draw(st.integers(16, 2048))
    per_token = draw(st.integers(1, 4096))
    reserved = draw(st.integers(0, 8 * 2048)) * per_token
    return ceiling, budget_tokens(context_ceiling=ceiling, reserved_kv_bytes=reserved, kv_bytes_per_token=per_token)


@dataclass
class Req:
    prompt: int
    max_tokens: int
    generates: int  # tokens it really generates before it stops (<= max_tokens)
    keeps: bool  # whether its KV is worth keeping as a cache entry
    since: float
    prefilled: int = 0
    scheduled: int = 0

    @property
    def final(self) -> int:
        return self.prompt + self.max_tokens

    def span(self, joined: bool) -> RowSpan:
        """Exactly what the engine tells the budget (``Engine._span``)."""
        if joined:
            return RowSpan(held=self.prompt - 1 + self.scheduled, final=self.final, steps=self.max_tokens - self.scheduled)
        prefill_steps = -(-max(0, self.prompt - 1 - self.prefilled) // CHUNK) + 1
        return RowSpan(held=self.prompt, final=self.final, steps=prefill_steps + self.max_tokens)


@dataclass
class Runner:
    """Rank 0's scheduling (one prefill at a time, FIFO, chunked, padded batch), driven only
    through the functions under test; ``memory()`` is what mlx-lm's caches would really hold."""

    budget: int
    cap: int
    max_entries: int
    max_wait_s: float
    queue: list[Req] = field(default_factory=list)
    prefilling: Req | None = None
    rows: list[Req] = field(default_factory=list)
    cache: list[CacheEntry] = field(default_factory=list)  # LRU order, oldest first
    next_id: int = 0
    admitted: int = 0
    refused: int = 0
    now: float = 0.0

    def memory(self) -> int:
        """Positions really held: the padded batch, the prefill cache, every entry (each buffer with its slack)."""
        held = sum(e.tokens for e in self.cache)
        if self.rows:
            held += len(self.rows) * (max(r.prompt - 1 + r.scheduled for r in self.rows) + SLACK)
        if self.prefilling is not None:
            held += self.prefilling.prefilled + SLACK
        return held

    def spans(self) -> list[RowSpan]:
        out = [r.span(True) for r in self.rows]
        return out + ([self.prefilling.span(False)] if self.prefilling is not None else [])

    def check(self) -> None:
        assert self.memory() <= self.budget, (self.memory(), self.budget, self.rows, self.prefilling, self.cache)
        assert sum(e.tokens for e in self.cache) <= self.cap
        assert len(self.cache) <= self.max_entries

    def evict(self, ids: tuple[int, ...]) -> None:
        oldest = [e.entry_id for e in self.cache[: len(ids)]]
        assert list(ids) == oldest, "evictions take the least recently used entries first"
        self.cache = [e for e in self.cache if e.entry_id not in ids]

    def touch(self, index: int) -> None:
        if self.cache:
            entry = self.cache.pop(index % len(self.cache))
            self.cache.append(entry)

    def step(self, prefill_chunk: int) -> None:
        """One engine step: rows leave (maybe kept as entries), the head may start, prefill, decode."""
        self.now += 0.1
        leaving = [r for r in self.rows if r.scheduled >= r.generates]
        self.rows = [r for r in self.rows if r.scheduled < r.generates]
        for r in leaving:
            if r.keeps:
                positions = r.prompt - 1 + r.scheduled
                plan = plan_store(budget=self.budget, rows=self.spans(), entries=self.cache, new_tokens=positions,
                                  cap_tokens=self.cap, max_entries=self.max_entries)  # fmt: skip
                if plan.store:
                    self.evict(plan.evict)
                    self.cache.append(CacheEntry(entry_id=self.next_id, tokens=positions))
                    self.next_id += 1
                else:
                    assert plan.evict == ()
        while self.prefilling is None and self.queue:
            head = self.queue[0]
            decision = decide_admission(now=self.now, budget=self.budget, rows=self.spans(), request=head.span(False),
                                        entries=self.cache, waiting_since=head.since, max_wait_s=self.max_wait_s,
                                        step_s=0.1)  # fmt: skip
            if isinstance(decision, Wait):
                assert decision.short_tokens > 0
                break
            self.queue.pop(0)
            if isinstance(decision, Refuse):
                assert 1 <= decision.retry_after_s <= RETRY_AFTER_MAX_S
                self.refused += 1
                continue
            self.evict(decision.evict)
            self.prefilling = head
            self.admitted += 1
        if self.prefilling is not None:
            p = self.prefilling
            # The engine's chunk is CHUNK while rows decode, larger (up to 4x here) when none do.
            p.prefilled = min(p.prompt - 1, p.prefilled + (CHUNK if self.rows else prefill_chunk))
            if p.prefilled == p.prompt - 1:
                self.rows.append(p)
                self.prefilling = None
        for r in self.rows:
            r.scheduled += 1
        self.check()


@st.composite
def workloads(draw: st.DrawFn) -> tuple[Runner, list[tuple[str, int, int, int, int]], int]:
    ceiling, budget = draw(budgets())
    cap = draw(st.sampled_from((0, budget // 4, budget)))
    runner = Runner(budget=budget, cap=cap, max_entries=draw(st.integers(0, 6)), max_wait_s=float("inf"))
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(("arrive", "arrive", "step", "step", "step", "touch")),
                st.integers(1, ceiling),  # prompt + max_tokens: admission never lets it pass the ceiling
                st.integers(1, 10**6),  # how it splits into prompt and max_tokens, and how much it generates
                st.integers(0, 1),  # whether its KV is worth keeping
                st.sampled_from((CHUNK, 2 * CHUNK, 4 * CHUNK)),  # the prefill chunk when nothing decodes
            ),
            max_size=80,
        )
    )
    return runner, ops, ceiling


def run_ops(runner: Runner, ops: list[tuple[str, int, int, int, int]]) -> int:
    arrived = 0
    for op, total, split, keep, chunk in ops:
        if op == "arrive":
            if total < 2:
                total = 2
            prompt = 1 + split % (total - 1)
            max_tokens = total - prompt
            generates = 1 + (split // total) % max_tokens
            runner.queue.append(Req(prompt=prompt, max_tokens=max_tokens, generates=generates, keeps=bool(keep), since=runner.now))
            arrived += 1
        elif op == "touch":
            runner.touch(split)
        else:
            runner.step(chunk)
        runner.check()
    return arrived


def drain(runner: Runner, arrived: int) -> None:
    """No new arrivals: rows finish and the queue drains, within a generous bound of steps."""
    for _ in range(4200 * (arrived + 1)):
        if not runner.queue and not runner.rows and runner.prefilling is None:
            return
        runner.step(CHUNK)


@SETTINGS
@given(workloads())
def test_never_over_budget_and_every_request_is_eventually_admitted(case: tuple[Runner, list, int]) -> None:
    runner, ops, _ = case
    arrived = run_ops(runner, ops)
    drain(runner, arrived)
    assert not runner.queue and runner.prefilling is None and not runner.rows, "requests still waiting"
    assert runner.admitted == arrived and runner.refused == 0


@SETTINGS
@given(workloads(), st.floats(0.0, 2.0))
def test_with_a_bounded_wait_every_request_completes_or_is_refused_cleanly(case: tuple[Runner, list, int], wait_s: float) -> None:
    runner, ops, _ = case
    runner.max_wait_s = wait_s
    arrived = run_ops(runner, ops)
    drain(runner, arrived)
    assert not runner.queue
    assert runner.admitted + runner.refused == arrived


@SETTINGS
@given(
    budgets(),
    st.lists(st.tuples(st.integers(1, 2048), st.integers(0, 2048)), max_size=6),
    st.lists(st.integers(1, 3000), max_size=8),
    st.tuples(st.integers(1, 2048), st.integers(0, 2048)),
)
def test_an_admission_fits_with_the_fewest_oldest_evictions(
    budget_case: tuple[int, int], shapes: list[tuple[int, int]], sizes: list[int], shape: tuple[int, int]
) -> None:
    ceiling, budget = budget_case
    rows = [row(min(h, ceiling - 1) // 2, min(h, ceiling)) for h, _ in shapes]
    request = RowSpan(held=min(shape[0], ceiling) // 2, final=min(shape[0], ceiling), steps=min(shape[0], ceiling) + shape[1] % 64)
    cache = entries(*sizes)
    decision = decide_admission(now=0, budget=budget, rows=rows, request=request, entries=cache, waiting_since=0, max_wait_s=1)
    need = rows_tokens([*rows, request])
    if isinstance(decision, Admit):
        kept = [e for e in cache if e.entry_id not in decision.evict]
        assert need + sum(e.tokens for e in kept) <= budget
        assert list(decision.evict) == [e.entry_id for e in cache[: len(decision.evict)]]
        if decision.evict:  # one fewer eviction would not have fitted
            fewer = cache[len(decision.evict) - 1 :]
            assert need + sum(e.tokens for e in fewer) > budget
    else:
        assert need > budget, "a request is kept waiting only when even an empty cache leaves no room"
    if not rows:
        assert isinstance(decision, Admit), "a request that fits alone is admitted when nothing runs"


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 500), st.integers(1, 500), st.integers(0, 600)), min_size=1, max_size=6),
       st.integers(0, 700))  # fmt: skip
def test_the_peak_bounds_every_later_step(shapes: list[tuple[int, int, int]], later: int) -> None:
    """rows_tokens is an upper bound on the padded batch at every step to come, and never grows with time."""
    rows = [RowSpan(held=h, final=h + extra, steps=max(extra, s)) for h, extra, s in shapes]
    peak = rows_tokens(rows)
    alive = [r.after(later) for r in rows if r.steps >= later]
    if alive:
        assert len(alive) * (max(r.held for r in alive) + SLACK) <= peak
    assert rows_tokens([r.after(later) for r in rows if r.steps > later]) <= peak
