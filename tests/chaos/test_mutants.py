"""Mutation testing of the control plane (issue 17, item 1): the catalogue, and the hunt that uses it.

Every mutant must stay applicable as the code moves: its anchor occurs
exactly once in its file and the planted file still compiles; a mutant whose
anchor is gone fails loudly, naming itself. Two hunts run end to end here,
each in a scratch copy (the working tree is never written): a quick mutant
the sweep catches in one run, and the vote-gossip livelock, which must fail
in seconds (an efficiency invariant or the run's budget), never hang.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest

from chaos import mutate
from chaos.mutants import CATALOGUE, FAST, LIVELOCK, Mutant, StaleMutant, by_name

ROOT = Path(__file__).resolve().parents[2]
AREAS = {"election", "log", "placement", "runner policy", "admission", "request routing"}


@pytest.mark.parametrize("mutant", CATALOGUE, ids=[m.name for m in CATALOGUE])
def test_every_mutant_plants_into_its_file_and_still_compiles(mutant: Mutant) -> None:
    text = (ROOT / mutant.path).read_text(encoding="utf-8")
    planted = mutant.apply(text)
    assert planted != text
    ast.parse(planted, filename=mutant.path)
    assert mutant.why and mutant.area in AREAS


def test_the_catalogue_covers_every_area_with_at_least_25_mutants() -> None:
    assert len(CATALOGUE) >= 25
    assert {m.area for m in CATALOGUE} == AREAS
    assert len({m.name for m in CATALOGUE}) == len(CATALOGUE)
    assert by_name(FAST) and by_name(LIVELOCK)
    benign = [m for m in CATALOGUE if m.benign]
    assert len(benign) <= 3 and all(len(m.benign) > 40 for m in benign), "a benign mutant says why"


def test_a_mutant_whose_anchor_is_gone_or_ambiguous_fails_naming_itself() -> None:
    m = by_name(FAST)
    with pytest.raises(StaleMutant, match=FAST):
        m.apply("nothing to see here")
    with pytest.raises(StaleMutant, match="occurs 2 times"):
        m.apply(m.anchor + "\n" + m.anchor)


def test_planting_writes_the_scratch_copy_never_the_working_tree(tmp_path: Path) -> None:
    m = by_name(FAST)
    before = hashlib.sha256((ROOT / m.path).read_bytes()).hexdigest()
    mutate.scratch_copy(tmp_path)
    m.plant(tmp_path)
    assert m.replacement in (tmp_path / m.path).read_text(encoding="utf-8")
    assert hashlib.sha256((ROOT / m.path).read_bytes()).hexdigest() == before


def test_a_hunt_goes_round_by_round_quickest_scenarios_first() -> None:
    order = mutate.hunt_order(["swarm", "ring_deadline", "zzz_new"], [1, 2])
    assert order == [("ring_deadline", 1), ("swarm", 1), ("zzz_new", 1), ("ring_deadline", 2), ("swarm", 2),
                     ("zzz_new", 2)]


def test_a_planted_bug_is_caught_with_the_line_that_replays_it() -> None:
    r = mutate.run_mutant(by_name("election.winner_inverted"), scenarios=["election_ranks"], seeds=2, jobs=1,
                          time_cap_s=120.0)
    assert r.verdict == "caught" and r.hunt is not None, r
    assert r.hunt.scenario == "election_ranks" and r.hunt.seed == 1
    assert r.replay == "python -m chaos mutate --mutant election.winner_inverted --scenario election_ranks --seed 1"


def test_the_vote_gossip_livelock_fails_in_seconds_instead_of_hanging() -> None:
    """Issue 17's first miss: a run of this mutant ran for more than 7 minutes and never finished."""
    r = mutate.run_mutant(by_name(LIVELOCK), scenarios=["membership_churn"], start=2, seeds=1, jobs=1, time_cap_s=120.0)
    assert r.verdict == "caught" and r.hunt is not None, r
    assert r.hunt.caught_by in ("efficiency E1", "budget (rate)", "budget (steps)"), r.hunt.caught_by
    assert r.hunt.cpu_s < 60.0, r.hunt
    assert r.replay == f"python -m chaos mutate --mutant {LIVELOCK} --scenario membership_churn --seed 2"


def test_the_nack_that_asks_for_the_first_gap_only_is_caught_by_e6() -> None:
    """The last survivor of the catalogue: its cost (a backoff per extra gap) fits E3's bound for lost messages."""
    r = mutate.run_mutant(by_name("log.nack_asks_first_gap_only"), scenarios=["oversized_placement"], seeds=3,
                          jobs=1, time_cap_s=120.0)
    assert r.verdict == "caught" and r.hunt is not None, r
    assert r.hunt.caught_by == "efficiency E6", r.hunt.caught_by
