"""The independent oracles (chaos.oracles): the documented arithmetic, reproduced without the core.

The oracles read the documented constants as literals and share no code with
``skulk.core``; these tests tie them to ``docs/placement.md``'s worked
example, so neither the documentation nor the oracle can drift alone. A
mutant of the core's arithmetic (``chaos mutate``) then fails the oracle.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from chaos import oracles
from chaos.harness import run_scenario
from skulk.cards import builtin_cards
from skulk.core.ids import ModelId

GB = 10**9
DOCS = " ".join((Path(__file__).resolve().parents[2] / "docs" / "placement.md").read_text().split())
LLAMA = ModelId("mlx-community/Llama-3.3-70B-Instruct-4bit")


def test_the_worked_example_s_context_ceiling_from_the_documented_formula() -> None:
    card = builtin_cards()[LLAMA]
    assert oracles.kv_bytes_per_token(card) == 327_680 and "327,680 KV bytes per token" in DOCS
    shares = {"A": Fraction(53, 80), "B": Fraction(27, 80)}
    ram = {"A": 64 * GB, "B": 32 * GB}
    assert oracles.node_tokens(card, shares["A"], ram["A"]) == 62_416 and "= 62,416 tokens" in DOCS
    assert oracles.node_tokens(card, shares["B"], ram["B"]) == 57_131 and "= 57,131 tokens" in DOCS
    assert oracles.ceiling(card, shares, ram) == 57_131 and "**57,131** tokens" in DOCS


def test_the_worked_example_s_footprints_and_split_from_the_documented_formula() -> None:
    card = builtin_cards()[LLAMA]
    assert oracles.layer_split(80, {"A": 48 * GB, "B": 24 * GB}) == {"A": 53, "B": 27}
    assert "A holds layers 0-52 (53 layers) and B layers 53-79 (27)" in DOCS
    a = oracles.footprint_bytes(card, Fraction(53, 80))
    b = oracles.footprint_bytes(card, Fraction(27, 80))
    assert f"A needs ~{a / 1e9:.1f} GB" in DOCS and f"B ~{b / 1e9:.1f} GB" in DOCS
    whole = oracles.footprint_bytes(card, Fraction(1))
    assert f"The whole model needs ~{whole / 1e9:.1f} GB" in DOCS


def test_the_layer_split_oracle_breaks_ties_as_documented() -> None:
    assert oracles.layer_split(7, {"a": 1, "b": 1}) == {"a": 4, "b": 3}
    assert oracles.layer_split(3, {"a": 1000, "b": 1, "c": 0}) == {"a": 1, "b": 1, "c": 1}
    assert oracles.layer_split(10, {"a": 0, "b": 0}) == {"a": 5, "b": 5}


def test_the_oracles_are_independent_of_the_core() -> None:
    source = (Path(oracles.__file__)).read_text()
    for module in ("skulk.core.memory", "skulk.core.context", "skulk.core.placement", "skulk.core.runner_policy"):
        assert module not in source, f"the oracles must not use {module}"


@pytest.mark.parametrize("scenario", ["context_admission", "heterogeneous_cluster", "oversized_placement"])
def test_healthy_runs_pass_the_oracles(scenario: str) -> None:
    r = run_scenario(scenario, 1, quiet=True)
    assert r.ok, r.message
    assert r.checks["instances_checked_by_oracles"] >= 1


def test_a_core_that_forgets_the_weight_overhead_fails_the_ceiling_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    from skulk.core import context

    monkeypatch.setattr(context, "WEIGHT_OVERHEAD_FACTOR", Fraction(1))
    r = run_scenario("context_admission", 1, quiet=True)
    assert (r.status, r.caught_by) == ("safety", "oracle O2"), r.message
