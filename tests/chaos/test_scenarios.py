"""The placement, ring and runner-policy scenarios: each passes a few seeds, checks its own expectations, and has teeth.

(The scenarios issue 3 asked for; the election, failover and storm scenarios
are exercised by ``test_cli.py`` and ``python -m chaos ci``.)

The 200-seed sweeps live in ``python -m chaos sweep`` / ``nightly`` (see
docs/simulator.md); here a couple of seeds per scenario keep the suite fast.
The "teeth" tests plant a bug in the very rule a scenario is about (trusting
an interface's label over its VPN address, retrying wedged runners, a runner
that shortens instead of refusing, an equal layer split, a refusal without the
arithmetic, a backstop that pre-empts the runner's diagnosis) and require the
scenario to fail on it with an "expected ..." liveness failure.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from skulk.core import interconnect, placement, runner_policy
from skulk.core.admission import Admitted

import sim.runners
from chaos import exitcodes
from chaos.checkers import SafetyViolation
from chaos.harness import RunResult, run_scenario
from chaos.scenarios import load_all

PLACEMENT_SCENARIOS = (
    "interconnect_selection",
    "oversized_placement",
    "ring_deadline",
    "crash_loop",
    "context_admission",
    "heterogeneous_cluster",
)


def _run(name: str, seed: int) -> RunResult:
    return run_scenario(name, seed, quiet=True)


def test_every_placement_scenario_is_registered() -> None:
    registry = load_all()
    for name in PLACEMENT_SCENARIOS:
        assert name in registry and registry[name].summary


@pytest.mark.parametrize("seed", [1, 2])
def test_interconnect_selection(seed: int) -> None:
    r = _run("interconnect_selection", seed)
    assert r.ok, r.message
    # Boot ring, re-formed after the thunderbolt cut, re-formed with only the VPN between two nodes.
    assert r.metrics["instances"] == 3
    assert r.metrics["lan_after_cut"] in ("ethernet", "wifi", "(pair not adjacent)")
    assert r.metrics["vpn_label"] in ("vpn", "ethernet")


@pytest.mark.parametrize("seed", [1, 2])
def test_ring_deadline(seed: int) -> None:
    r = _run("ring_deadline", seed)
    assert r.ok, r.message
    assert r.metrics["failed_after_s"] == pytest.approx(r.metrics["deadline_s"], abs=0.5)
    assert r.metrics["replaced_after_s"] >= r.metrics["deadline_s"]
    assert r.metrics["mode"] in ("port", "link")


@pytest.mark.parametrize("seed", [1, 2])
def test_crash_loop(seed: int) -> None:
    r = _run("crash_loop", seed)
    assert r.ok, r.message
    assert 0 < r.metrics["loop1_trip_after_s"] < runner_policy.BreakerPolicy().window_s
    assert 0 < r.metrics["loop2_trip_after_s"] < runner_policy.BreakerPolicy().window_s
    assert r.metrics["steady_served"] > 0


@pytest.mark.parametrize("seed", [1, 2])
def test_context_admission(seed: int) -> None:
    r = _run("context_admission", seed)
    assert r.ok, r.message
    assert r.metrics["ceiling"] >= 8_192 and r.metrics["ranks"] >= 2


@pytest.mark.parametrize("seed", [1, 2])
def test_oversized_placement(seed: int) -> None:
    r = _run("oversized_placement", seed)
    assert r.ok, r.message
    assert r.metrics["split_nodes"] >= 2


@pytest.mark.parametrize("seed", [1, 2])
def test_heterogeneous_cluster(seed: int) -> None:
    r = _run("heterogeneous_cluster", seed)
    assert r.ok, r.message
    layers = dict(part.split("=") for part in r.metrics["big_layers"].split(","))
    assert sum(int(v) for v in layers.values()) == 80  # the 70B's layers, every one once


def test_a_rerun_gives_the_same_trace() -> None:
    for name in PLACEMENT_SCENARIOS:
        a, b = _run(name, 3), _run(name, 3)
        assert a.ok, (name, a.message)
        assert (a.digest, a.steps, a.metrics) == (b.digest, b.steps, b.metrics), name


# --- teeth: each scenario fails on a planted bug in the rule it checks ----------------------------


def _lenient_admit(*, prompt_tokens: int, max_tokens: int | None, ceiling: int, default_max_tokens: int) -> Admitted:
    """A runner that shortens what does not fit instead of refusing it."""
    room = max(1, ceiling - prompt_tokens)
    return Admitted(max_tokens=min(max_tokens or default_max_tokens, room), clamped=True)


def _even_split(n_layers: int, weights: dict) -> dict:
    nodes = sorted(weights)
    return {n: n_layers // len(nodes) + (1 if i < n_layers % len(nodes) else 0) for i, n in enumerate(nodes)}


PLANTED: dict[str, tuple[str, int, Callable[[pytest.MonkeyPatch], None]]] = {
    "a VPN address ranked by its label": (
        "interconnect_selection", 5, lambda mp: mp.setattr(interconnect, "effective_kind", lambda c: c.kind)),
    "the backstop pre-empts the runner's diagnosis": (
        "ring_deadline", 1, lambda mp: mp.setattr(runner_policy, "GROUP_CONNECT_REPORT_GRACE_S", 0.0)),
    "wedged runners retried": ("crash_loop", 1, lambda mp: mp.setattr(runner_policy, "WEDGE_EXIT_CODE", 999)),
    "over-long requests shortened": ("context_admission", 1, lambda mp: mp.setattr(sim.runners, "admit", _lenient_admit)),
    "an even layer split": ("heterogeneous_cluster", 1, lambda mp: mp.setattr(placement, "layer_split", _even_split)),
    "a refusal without the arithmetic": (
        "oversized_placement", 1,
        lambda mp: mp.setattr(placement, "describe_shortfall", lambda node, fp, can, budget=None: f"node {node} is short")),
}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_each_scenario_catches_a_planted_bug(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name, seed, plant = PLANTED[bug]
    load_all()  # the scenarios hold their own references to what is patched here
    assert _run(name, seed).ok
    plant(monkeypatch)
    r = _run(name, seed)
    assert r.status == "liveness" and r.exit_code == exitcodes.LIVENESS, (bug, r.status, r.message)
    assert r.message.startswith("expected"), (bug, r.message)


def test_a_violation_raised_inside_a_process_survives_simpys_rethrow() -> None:
    # simpy re-raises what escapes a process as type(exc)(*exc.args) (a violation found in a
    # client's or a runner's process): it must come back as the same violation, not a TypeError.
    v = SafetyViolation(6, "4 events indexed for abandoned task t", t=20.5, host="n1")
    again = type(v)(*v.args)
    assert (again.invariant, again.detail, again.t, again.host) == (6, v.detail, 20.5, "n1")
    assert str(again) == str(v) and "invariant 6" in str(v) and "t=20.500000 on n1" in str(v)
