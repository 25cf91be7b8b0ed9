"""Election rules (DESIGN.md section 2, "Election"), on real core nodes.

Each test names the rule it checks. The cluster is hand-stepped
(sim.manual.ManualCluster): nothing happens until the test delivers messages
or fires timers.
"""

from __future__ import annotations

from sim.manual import ManualCluster
from skulk.core.config import CoreConfig


def _settled(n: int = 3, **kw) -> ManualCluster:
    c = ManualCluster(n, **kw)
    c.boot_all()
    c.settle(until=10.0)
    return c


def test_one_master_is_elected_and_everyone_follows_it() -> None:
    c = _settled(3)
    masters = c.masters()
    assert len(masters) == 1
    sessions = {c.node(n).session for n in c.alive()}
    assert len(sessions) == 1
    (session,) = sessions
    assert session is not None and session.master == masters[0]


def test_candidates_are_ordered_by_clock_seniority_commands_then_node_id() -> None:
    # With equal clocks, seniority and commands, the highest node id wins.
    c = _settled(3)
    assert c.masters() == ["n3"]


def test_force_master_wins_regardless_of_node_id() -> None:
    c = ManualCluster(3)
    c.boot("n1")
    c.hosts["n1"].node.config = CoreConfig(force_master=True)  # type: ignore[union-attr]
    c.hosts["n1"].node.election.config = CoreConfig(force_master=True)  # type: ignore[union-attr]
    c.boot("n2")
    c.boot("n3")
    c.settle(until=10.0)
    assert c.masters() == ["n1"]


def test_sitting_master_that_wins_again_keeps_its_session() -> None:
    c = _settled(3)
    before = c.node("n3").session
    c.crash("n1")  # a follower leaves: everyone campaigns, the master wins again
    c.settle(until=c.now + 10.0)
    assert c.node("n3").session == before
    assert c.node("n2").session == before
    assert c.node("n3").election.clock > before.clock  # a campaign did run


def test_master_crash_elects_a_new_master_with_a_higher_clock() -> None:
    c = _settled(3)
    old = c.node("n3").session
    c.crash("n3")
    c.settle(until=c.now + 10.0)
    assert c.masters() == ["n2"]
    new = c.node("n1").session
    assert new is not None and new.master == "n2" and new.clock > old.clock


def test_connection_flap_does_not_start_a_campaign() -> None:
    # A connection that drops and comes back within the settle delay leaves the
    # peer set unchanged: no campaign, so a flapping link cannot livelock us.
    c = _settled(3)
    clocks = {n: c.node(n).election.clock for n in c.alive()}
    for _ in range(20):
        c.partition(["n1"], ["n2", "n3"])
        c.heal()
        c.settle(until=c.now + 0.05)
    c.settle(until=c.now + 5.0)
    assert {n: c.node(n).election.clock for n in c.alive()} == clocks


def test_failover_is_fast_when_every_peer_votes() -> None:
    # A membership-triggered campaign ends as soon as all connected peers voted,
    # long before the campaign timeout.
    c = _settled(3)
    c.crash("n3")
    start = c.now
    while not c.masters() or c.masters() == []:
        assert c.fire_next_timer() or c.inflight
        while c.inflight:
            c.deliver(0)
    assert c.now - start < c.config.campaign_timeout_s


def test_partition_heal_converges_on_one_session() -> None:
    c = _settled(4)
    c.partition(["n1", "n2"], ["n3", "n4"])
    c.settle(until=c.now + 10.0)
    assert len(c.masters()) == 2  # one per side: availability over a split
    c.heal()
    c.settle(until=c.now + 20.0)
    assert len(c.masters()) == 1
    assert len({c.node(n).session for n in c.alive()}) == 1


def test_clock_survives_a_restart() -> None:
    c = _settled(2)
    clock = c.node("n1").election.clock
    c.crash("n1")
    c.settle(until=c.now + 5.0)
    c.boot("n1")
    assert c.node("n1").election.clock >= clock
    c.settle(until=c.now + 10.0)
    assert len(c.masters()) == 1
