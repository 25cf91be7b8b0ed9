"""Run budgets (chaos.budget) and what counts as a failure of the core (issue 17, items 2 and 4).

No simulated run may hang: a run past its budget of core steps (in total, or
per simulated second) or of time fails as a liveness failure with the replay
line and the last simulated seconds of its trace. Any exception raised inside
the core, not only an assertion, is a safety failure, never a harness error.
"""

from __future__ import annotations

import pytest

from chaos import exitcodes
from chaos.budget import Budget
from chaos.harness import run_scenario
from skulk.core.reporter import Reporter


def test_a_run_past_its_step_budget_fails_as_liveness_with_the_last_seconds_of_trace() -> None:
    r = run_scenario("partition_heal", 1, quiet=True, budget=Budget(steps_max=3_000, window_steps=4_096, check_every_steps=512))
    assert (r.status, r.exit_code, r.caught_by) == ("liveness", exitcodes.LIVENESS, "budget (steps)")
    assert "budget exceeded (steps)" in r.message and "3,000" in r.message
    assert "last 2 simulated s of the trace" in r.message, r.message
    assert r.replay == "python -m chaos run partition_heal --seed 1"
    assert 3_000 < r.steps <= 3_000 + 512


def test_more_steps_per_simulated_second_than_the_budget_is_a_storm() -> None:
    r = run_scenario("partition_heal", 1, quiet=True,
                     budget=Budget(steps_per_sim_s_max=50.0, window_steps=2_048, check_every_steps=256))
    assert (r.status, r.caught_by) == ("liveness", "budget (rate)"), r.message
    assert "per simulated second, budget 50" in r.message


def test_the_default_budget_leaves_a_healthy_run_alone() -> None:
    r = run_scenario("partition_heal", 1, quiet=True)
    assert r.ok, r.message
    assert r.digest == run_scenario("partition_heal", 1, quiet=True, budget=None).digest


def test_any_exception_raised_inside_the_core_is_a_safety_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Reporter, *args: object, **kw: object) -> None:
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(Reporter, "on_link", broken)
    r = run_scenario("partition_heal", 1, quiet=True)
    assert (r.status, r.exit_code, r.caught_by) == ("safety", exitcodes.SAFETY, "core ZeroDivisionError"), r.message
    assert "core exception ZeroDivisionError" in r.message and "planted" in r.message


def test_a_loop_in_the_core_that_never_returns_is_stopped_by_the_cpu_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    def spin(self: Reporter, *args: object, **kw: object) -> None:
        while True:
            pass

    monkeypatch.setattr(Reporter, "on_link", spin)
    r = run_scenario("partition_heal", 1, quiet=True, budget=Budget(cpu_s_max=1.0))
    assert (r.status, r.exit_code, r.caught_by) == ("liveness", exitcodes.LIVENESS, "budget (cpu)"), r.message
    assert "without returning to the simulator" in r.message
