"""The KV budget arithmetic (skulk.core.kv_budget): examples and properties.

Properties (Hypothesis), over random workloads driven through the same
decisions a runner's rank 0 makes (FIFO admission, rows finishing, leaving
rows stored as cache entries, cache hits touching entries):

- the positions held (rows in mlx-lm's padded layout plus every cache entry)
  never exceed the budget, after any decision;
- a request whose reserve fits the budget alone is admitted at the latest
  once the rows ahead of it have finished (no starvation, FIFO);
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


def test_the_budget_is_the_placement_reservation_or_one_ceiling_request() -> None:
    # 8,192 reserved tokens at 1 KiB each, ceiling 4,096: the reservation wins.
    assert budget_tokens(context_ceiling=4096, reserved_kv_bytes=8192 * 1024, kv_bytes_per_token=1024) == 8192
    # A reservation smaller than one request at the ceiling (say float32 caches where the
    # card assumed fp16): a lone request admission accepted must still fit.
    assert budget_tokens(context_ceiling=8192, reserved_kv_bytes=4096 * 1024, kv_bytes_per_token=1024) == 8192 + SLACK
    # Nothing known yet: the ceiling alone.
    assert budget_tokens(context_ceiling=1000) == 1000 + SLACK


def test_rows_are_counted_in_the_padded_batch_layout() -> None:
    assert rows_tokens([]) == 0
    assert rows_tokens([100]) == 100 + SLACK
    # One long row makes every row of the batch as long (left padding).
    assert rows_tokens([4000, 10, 10]) == 3 * (4000 + SLACK)
    assert held_tokens([100], entries(50, 60)) == 100 + SLACK + 110


def test_admission_evicts_the_oldest_entries_first_and_no_more_than_needed() -> None:
    cache = entries(300, 200, 100)  # oldest first
    # 1 row of 1000 + a new one of 1000: 2 x 1255 = 2510 positions; budget 2800 leaves 290.
    decision = decide_admission(now=0, budget=2800, rows=[1000], reserve=1000, entries=cache, waiting_since=0, max_wait_s=30)
    assert decision == Admit(evict=(0, 1))  # 600 -> 100 held: evicting only entry 0 would leave 300 > 290
    assert decide_admission(now=0, budget=3200, rows=[1000], reserve=1000, entries=cache, waiting_since=0, max_wait_s=30) == Admit()


def test_a_request_that_cannot_fit_waits_then_is_refused_with_retry_after() -> None:
    kwargs = dict(budget=3000, rows=[1500, 1500], reserve=1000, entries=entries(10), max_wait_s=30.0,
                  rows_remaining=[(1500, 40), (1500, 90)], step_s=0.05)
    wait = decide_admission(now=10.0, waiting_since=0.0, **kwargs)  # type: ignore[arg-type]
    assert wait == Wait(short_tokens=3 * (1500 + SLACK) - 3000)
    refused = decide_admission(now=30.0, waiting_since=0.0, **kwargs)  # type: ignore[arg-type]
    assert isinstance(refused, Refuse)
    assert refused.message.startswith(KV_BUDGET_EXHAUSTED + ":")
    # Both rows must finish before 1,000 more fit beside... 1 row: 2 x 1755 = 3510 > 3000; none: 1255.
    assert refused.retry_after_s == 5  # the slower row's 90 steps x 0.05 s, rounded up


def test_retry_after_is_at_least_a_second_and_capped() -> None:
    assert retry_after_s(budget=5000, reserve=100, rows_remaining=[], step_s=1.0) == 1
    assert retry_after_s(budget=2000, reserve=1000, rows_remaining=[(1000, 10**9)], step_s=1.0) == RETRY_AFTER_MAX_S


def test_a_leaving_row_is_stored_after_evicting_older_entries_or_not_at_all() -> None:
    cache = entries(400, 300)
    # Budget 2000, one row of 500 stays (755 held): 1245 left; the cap is 800.
    assert plan_store(budget=2000, rows=[500], entries=cache, new_tokens=500, cap_tokens=800, max_entries=8).evict == (0,)
    assert plan_store(budget=2000, rows=[500], entries=cache, new_tokens=900, cap_tokens=800, max_entries=8).store is False
    assert plan_store(budget=2000, rows=[500], entries=cache, new_tokens=900, cap_tokens=800, max_entries=8).evict == ()
    # The entry count is bounded too.
    assert plan_store(budget=10**6, rows=[], entries=cache, new_tokens=10, cap_tokens=10**6, max_entries=2).evict == (0,)
    assert plan_store(budget=10**6, rows=[], entries=cache, new_tokens=10, cap_tokens=10**6, max_entries=0).store is False


# --- properties ---------------------------------------------------------------------------


@st.composite
def budgets(draw: st.DrawFn) -> tuple[int, int]:
    """(ceiling, budget) as a runner derives them."""
    ceiling = draw(st.integers(16, 4096))
    per_token = draw(st.integers(1, 4096))
    reserved = draw(st.integers(0, 16 * 4096)) * per_token
    return ceiling, budget_tokens(context_ceiling=ceiling, reserved_kv_bytes=reserved, kv_bytes_per_token=per_token)


@dataclass
class Row:
    reserve: int
    steps_left: int
    stores: int  # positions it would leave in the cache (0: nothing worth keeping)


@dataclass
class Runner:
    """A model of rank 0's bookkeeping, driven only through the functions under test."""

    budget: int
    cap: int
    max_entries: int
    max_wait_s: float
    queue: list[tuple[int, float, int, int]] = field(default_factory=list)  # (reserve, since, steps, stores)
    rows: list[Row] = field(default_factory=list)
    cache: list[CacheEntry] = field(default_factory=list)  # LRU order, oldest first
    next_id: int = 0
    admitted: int = 0
    refused: int = 0
    now: float = 0.0

    def held(self) -> int:
        return held_tokens([r.reserve for r in self.rows], self.cache, SLACK)

    def check(self) -> None:
        assert self.held() <= self.budget, (self.held(), self.budget, self.rows, self.cache)
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

    def admit_head(self) -> None:
        while self.queue:
            reserve, since, steps, stores = self.queue[0]
            decision = decide_admission(
                now=self.now, budget=self.budget, rows=[r.reserve for r in self.rows], reserve=reserve,
                entries=self.cache, waiting_since=since, max_wait_s=self.max_wait_s,
                rows_remaining=[(r.reserve, r.steps_left) for r in self.rows], step_s=0.1,
            )  # fmt: skip
            if isinstance(decision, Wait):
                assert decision.short_tokens > 0
                return
            self.queue.pop(0)
            if isinstance(decision, Refuse):
                assert 1 <= decision.retry_after_s <= RETRY_AFTER_MAX_S
                self.refused += 1
                continue
            self.evict(decision.evict)
            self.rows.append(Row(reserve, steps, stores))
            self.admitted += 1
            self.check()
            return  # one prefill starts per step

    def step(self) -> None:
        self.now += 0.1
        for r in self.rows:
            r.steps_left -= 1
        leaving = [r for r in self.rows if r.steps_left <= 0]
        self.rows = [r for r in self.rows if r.steps_left > 0]
        for r in leaving:
            if r.stores:
                plan = plan_store(
                    budget=self.budget, rows=[x.reserve for x in self.rows], entries=self.cache,
                    new_tokens=r.stores, cap_tokens=self.cap, max_entries=self.max_entries,
                )  # fmt: skip
                if plan.store:
                    self.evict(plan.evict)
                    self.cache.append(CacheEntry(entry_id=self.next_id, tokens=r.stores))
                    self.next_id += 1
                else:
                    assert plan.evict == ()
            self.check()
        self.admit_head()
        self.check()


@st.composite
def workloads(draw: st.DrawFn) -> tuple[Runner, list[tuple[str, int, int, int]], int]:
    ceiling, budget = draw(budgets())
    cap = draw(st.sampled_from((0, budget // 4, budget)))
    runner = Runner(budget=budget, cap=cap, max_entries=draw(st.integers(0, 6)), max_wait_s=float("inf"))
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(("arrive", "arrive", "step", "step", "step", "touch")),
                st.integers(1, ceiling),  # reserve: admission never lets prompt + max_tokens pass the ceiling
                st.integers(1, 12),  # steps the request runs
                st.integers(0, 1),  # whether its KV is worth keeping
            ),
            max_size=80,
        )
    )
    return runner, ops, ceiling


def run_ops(runner: Runner, ops: list[tuple[str, int, int, int]]) -> int:
    arrived = 0
    for op, reserve, steps, keep in ops:
        if op == "arrive":
            runner.queue.append((reserve, runner.now, steps, min(reserve, reserve * keep)))
            arrived += 1
        elif op == "touch":
            runner.touch(reserve)
        else:
            runner.step()
        runner.check()
    return arrived


@SETTINGS
@given(workloads())
def test_never_over_budget_and_every_request_is_eventually_admitted(case: tuple[Runner, list, int]) -> None:
    runner, ops, _ = case
    arrived = run_ops(runner, ops)
    # Liveness: with no new arrivals, rows finish and the queue drains. Each request
    # runs at most 12 steps, so a bound of 13 steps per request is generous.
    for _ in range(13 * (arrived + 1)):
        if not runner.queue and not runner.rows:
            break
        runner.step()
    assert not runner.queue, f"requests still waiting: {runner.queue}"
    assert runner.admitted == arrived and runner.refused == 0


@SETTINGS
@given(workloads(), st.floats(0.0, 2.0))
def test_with_a_bounded_wait_every_request_completes_or_is_refused_cleanly(case: tuple[Runner, list, int], wait_s: float) -> None:
    runner, ops, _ = case
    runner.max_wait_s = wait_s
    arrived = run_ops(runner, ops)
    for _ in range(13 * (arrived + 1)):
        if not runner.queue and not runner.rows:
            break
        runner.step()
    assert not runner.queue
    assert runner.admitted + runner.refused == arrived


@SETTINGS
@given(
    budgets(),
    st.lists(st.integers(1, 4096), max_size=6),
    st.lists(st.integers(1, 3000), max_size=8),
    st.integers(1, 4096),
)
def test_an_admission_fits_with_the_fewest_oldest_evictions(
    budget_case: tuple[int, int], rows: list[int], sizes: list[int], reserve: int
) -> None:
    ceiling, budget = budget_case
    reserve = min(reserve, ceiling)
    rows = [min(r, ceiling) for r in rows]
    cache = entries(*sizes)
    decision = decide_admission(now=0, budget=budget, rows=rows, reserve=reserve, entries=cache, waiting_since=0, max_wait_s=1)
    need = rows_tokens([*rows, reserve])
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
