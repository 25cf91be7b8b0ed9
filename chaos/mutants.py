"""The mutant catalogue: small, named, realistic bugs planted in ``skulk/core``.

Theory of operation
-------------------
Each ``Mutant`` is one bug a person could plausibly write: a comparison off
by one, a guard dropped, a constant wrong, a branch inverted. It names the
file, an *anchor* (a short snippet that occurs exactly once in that file)
and what the anchor becomes. ``apply`` works on the file's text, never on
the working tree: ``chaos.mutate`` copies the code to a scratch directory and
plants the mutant there.

Anchors are kept small and specific to the line they change, so unrelated
edits elsewhere in the same file leave the catalogue applicable. When an
anchor disappears (the code it targets was rewritten) or becomes ambiguous,
``apply`` raises ``StaleMutant`` naming the mutant, and the catalogue test
(``tests/chaos/test_mutants.py``) fails: update the mutant with the code.

``area`` groups mutants as the issue asked for (election, log, placement,
runner policy, admission, request routing); ``why`` says what real bug the
mutant stands for. ``benign`` is set only for a mutant shown not to change
any outcome a user could see; it is reported apart and left out of the catch
rate, with the reason.

``FAST`` names the mutant that ``python -m chaos ci`` runs next to the
canary: one the sweep catches within a few runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Mutant", "StaleMutant", "CATALOGUE", "FAST", "LIVELOCK", "by_name"]


class StaleMutant(Exception):
    """A mutant's anchor is gone from its file, or no longer unique: the catalogue needs updating."""


@dataclass(frozen=True)
class Mutant:
    name: str  # area.what, unique
    area: str  # election | log | placement | runner policy | admission | request routing
    path: str  # relative to the repository root
    anchor: str  # occurs exactly once in the file
    replacement: str  # what the anchor becomes
    why: str  # the realistic bug this stands for
    benign: str = ""  # non-empty: why no outcome changes (left out of the catch rate)

    def apply(self, text: str) -> str:
        """``text`` (the file's content) with the mutant planted; ``StaleMutant`` if the anchor is not unique."""
        count = text.count(self.anchor)
        if count != 1:
            where = "is gone from" if count == 0 else f"occurs {count} times in"
            raise StaleMutant(f"mutant {self.name}: its anchor {self.anchor.strip()[:80]!r} {where} {self.path}")
        mutated = text.replace(self.anchor, self.replacement)
        assert mutated != text, f"mutant {self.name} changes nothing"
        return mutated

    def plant(self, root: Path) -> None:
        """Plant the mutant in the copy of the code under ``root`` (never the working tree)."""
        target = root / self.path
        target.write_text(self.apply(target.read_text(encoding="utf-8")), encoding="utf-8")


def _m(name: str, area: str, path: str, anchor: str, replacement: str, why: str, benign: str = "") -> Mutant:
    return Mutant(name, area, "skulk/core/" + path, anchor, replacement, why, benign)


CATALOGUE: tuple[Mutant, ...] = (
    # --- election: vote guards, tie-breaks, session comparisons ---------------------------------
    _m("election.stale_vote_flips", "election", "election.py",
       "if known is None or _vote_order(vote) > _vote_order(known):",
       "if known is None or known != vote:",
       "a follower takes any different copy of a peer's vote, not only a later one: stale gossip flips votes "
       "back and forth (the vote-storm livelock)"),
    _m("election.winner_inverted", "election", "election.py",
       "winner_vote = max(votes.values(), key=lambda v: v.candidate.rank())",
       "winner_vote = min(votes.values(), key=lambda v: v.candidate.rank())",
       "the campaign elects the lowest-ranked candidate"),
    _m("election.tie_break_ignores_seniority", "election", "election.py",
       "winner_vote = max(votes.values(), key=lambda v: v.candidate.rank())",
       "winner_vote = max(votes.values(), key=lambda v: (v.candidate.clock, v.candidate.node_id))",
       "the candidate order forgets seniority and commands seen: a sitting master loses to a higher node id"),
    _m("election.keeps_session_without_agreement", "election", "election.py",
       "and all(v.session in (None, sitting) for v in votes.values())",
       "and True",
       "a winner keeps its old session even when some voters follow another session"),
    _m("election.clock_not_persisted", "election", "election.py",
       "out.persist = True  # the clock moved: persisted before the vote goes out",
       "pass",
       "the election clock is not written before the vote goes out: a restarted node campaigns at an old clock"),
    _m("election.campaign_on_every_flap", "election", "election.py",
       "if self.peers != self._campaign_peers:  # else the set flapped back: nothing really changed",
       "if True:",
       "a campaign starts on every membership change, even one that restores the same peer set"),
    _m("election.fast_campaign_ends_on_first_vote", "election", "election.py",
       "if all(p in campaign.votes for p in campaign.peers):",
       "if any(p in campaign.votes for p in campaign.peers):",
       "a fast campaign ends when any peer voted, not every peer"),
    _m("election.deposed_master_keeps_acting", "election", "node.py",
       "            self.master.stop()\n            self.master = None\n",
       "            pass\n",
       "a master that loses the election is not stopped: it keeps indexing into its old session"),
    # --- the log: index checks, dedupe, snapshot offsets, ingest cap ------------------------------
    _m("log.drop_in_order_event", "log", "replica.py",
       "if indexed.index < self.next_index:\n            return Output()  # duplicate of something applied",
       "if indexed.index <= self.next_index:\n            return Output()  # duplicate of something applied",
       "a follower's duplicate check drops the very event it waits for (<= for <): it converges only through "
       "gap-fill retransmission, every event a round of NACK and resend late"),
    _m("log.nack_asks_first_gap_only", "log", "replica.py",
       "            return lo\n        return None",
       "            return lo\n        return lo",
       "a NACK asks for the first gap only, so a follower under loss falls behind one gap per backoff"),
    _m("log.nack_backoff_never_resets", "log", "replica.py",
       "            self._nack_attempt = 0\n            self._nack_armed = False\n",
       "            pass\n",
       "the NACK backoff is not reset by progress: after a few losses every gap waits the 10 s cap"),
    _m("log.command_dedupe_removed", "log", "master.py",
       "cached = self._results.get(command.command_id)",
       "cached = None",
       "the master forgets the commands it answered: a retried or duplicated command is executed again"),
    _m("log.cancel_memory_removed", "log", "master.py",
       "if cid in self._cancelled:",
       "if False:",
       "a cancel that overtakes its submit is forgotten: the task is created after its client walked away"),
    _m("log.snapshot_offset_forgotten", "log", "master.py",
       "events = tuple(self._log[start - self._log_base : end - self._log_base]) if end > start else ()",
       "events = tuple(self._log[start:end]) if end > start else ()",
       "after compaction the master serves a NACK from its retained log without the snapshot's offset"),
    _m("log.ingest_cap_removed", "log", "ingest.py",
       "    if task is None:\n        master.dropped_by_ingest_cap += 1\n        return [], True",
       "    if False:\n        master.dropped_by_ingest_cap += 1\n        return [], True",
       "the ingest cap is gone: task events for tasks the master no longer knows (a cancelled request's) are "
       "indexed"),
    _m("log.ingest_cap_repeats_task_status", "log", "ingest.py",
       "if isinstance(event, TaskStatusUpdated) and task.status == event.status:",
       "if False:",
       "the ingest cap indexes a task status the state already holds",
       benign="no input reaches it: a worker reports a task running once (it never dispatches a task twice, and a "
              "restarted worker fails what it ran before), and a resent local event is dropped by its origin "
              "index before any ingest rule sees it; the guard is defence in depth"),
    _m("log.ingest_repeats_runner_status", "log", "ingest.py",
       "if state.runners.get(event.runner_id) == event.status:",
       "if False:",
       "the master indexes a runner status the state already holds (every re-report after a failover, twice)"),
    _m("log.local_gap_not_reported", "log", "master.py",
       "if held & (held - 1) == 0:",
       "if False:",
       "a master holding a worker's later local events does not report the gap: one lost event stalls the node's "
       "telemetry behind the 5, 10, 20 s retries"),
    _m("log.carryover_forgets_instances", "log", "master.py",
       "instances=dict(last_state.instances),",
       "instances={},",
       "a new master does not carry the instances over: every runner is torn down and re-created on failover"),
    _m("log.prune_without_grace", "log", "master_policy.py",
       "if now - master.started_at < master.config.prune_grace_s:",
       "if False:",
       "a new master prunes nodes before they could re-report (no topology-settle grace)"),
    # --- placement: memory terms, link ranking ----------------------------------------------------
    _m("placement.ignores_free_memory", "placement", "placement.py",
       "if fp.total_bytes > budgets[n].free_bytes:",
       "if fp.total_bytes > budgets[n].capacity_bytes:",
       "placement checks a shard against 0.75 x RAM, ignoring what is used or already placed on the node"),
    _m("placement.footprint_without_overhead", "placement", "memory.py",
       "weights_with_overhead = -(-card.weight_bytes * num * over_num // (den * over_den))",
       "weights_with_overhead = weights",
       "a shard's footprint forgets the 1.30 weight overhead"),
    _m("placement.usable_fraction", "placement", "memory.py",
       "USABLE_FRACTION_OF_TOTAL = Fraction(3, 4)",
       "USABLE_FRACTION_OF_TOTAL = Fraction(4, 5)",
       "usable memory is 80 % of RAM instead of 75 %"),
    _m("placement.even_layer_split", "placement", "placement.py",
       "w = {n: (weights[n] if total > 0 else 1) for n in nodes}",
       "w = {n: 1 for n in nodes}",
       "pipeline layers are split evenly, not by free memory"),
    _m("placement.vpn_by_label", "placement", "interconnect.py",
       'return "vpn" if is_vpn_address(conn.address) else conn.kind',
       "return conn.kind",
       "a VPN link is ranked by its interface's label, not by its address"),
    _m("placement.ring_ranked_best_hop_first", "placement", "interconnect.py",
       "return tuple(sorted(ranks, reverse=True))",
       "return tuple(sorted(ranks))",
       "rings are compared by their best hop instead of their worst"),
    # --- runner policy: breaker thresholds, wedge handling ----------------------------------------
    _m("runner.breaker_trips_on_first_failure", "runner policy", "runner_policy.py",
       "failures_to_trip: int = 3",
       "failures_to_trip: int = 1",
       "the crash breaker's default threshold is one failure"),
    _m("runner.breaker_window_short", "runner policy", "runner_policy.py",
       "window_s: float = 60.0",
       "window_s: float = 2.0",
       "the crash breaker's window is 2 s: a crash loop with restart backoff never trips it"),
    _m("runner.breaker_backoff_not_doubled", "runner policy", "runner_policy.py",
       "after = min(self.policy.backoff_first_s * 2 ** (count - 1), self.policy.backoff_max_s)",
       "after = min(self.policy.backoff_first_s, self.policy.backoff_max_s)",
       "crash restarts do not back off: every restart after the first delay"),
    _m("runner.wedge_retried", "runner policy", "runner_policy.py",
       "if exit_code == WEDGE_EXIT_CODE:",
       "if exit_code == -WEDGE_EXIT_CODE:",
       "a wedged runner (exit 86) is treated as an ordinary crash and restarted"),
    _m("runner.group_connect_backstop_races", "runner policy", "runner_policy.py",
       "at=entered_at + limit + GROUP_CONNECT_REPORT_GRACE_S,",
       "at=entered_at + limit,",
       "the worker's group-connect backstop fires with the runner's own deadline and pre-empts its diagnosis"),
    _m("runner.restarted_worker_reruns_orphans", "runner policy", "worker.py",
       "if task.status == \"running\" and t not in dispatched and t not in settled",
       "if False",
       "a restarted worker does not fail the tasks it was running before the crash",
       benign="the origin already ends a stream whose chunks come from a new incarnation of its runner node once "
              "it has a chunk (runner_restarted), and streams the rerun when it had none: the client sees an error "
              "in the first case either way and is served in the second; the rerun costs one generation"),
    # --- admission: ceiling terms ------------------------------------------------------------------
    _m("admission.ceiling_without_overhead", "admission", "context.py",
       "weights = math.ceil(card.weight_bytes * frac * WEIGHT_OVERHEAD_FACTOR)",
       "weights = math.ceil(card.weight_bytes * frac)",
       "the per-node context ceiling forgets the 1.30 weight overhead"),
    _m("admission.prompt_may_fill_window", "admission", "admission.py",
       "if prompt_tokens >= ceiling:",
       "if prompt_tokens > ceiling:",
       "a prompt exactly as long as the window is admitted"),
    _m("admission.max_tokens_shortened", "admission", "admission.py",
       "        if max_tokens > room:\n            return Refused(",
       "        if max_tokens > room:\n            return Admitted(max_tokens=room, clamped=True)\n            return Refused(",
       "an explicit max_tokens that does not fit is silently shortened instead of refused"),
    # --- request routing ---------------------------------------------------------------------------
    _m("routing.stale_answer_settles", "request routing", "requests.py",
       "if answered_in is not None and answered_in != entry.sent_session:",
       "if False:",
       "a deposed master's answer settles a request sent in a newer session (the zombie master's answer)"),
    _m("routing.requests_survive_session_change", "request routing", "requests.py",
       "            if entry.sent_session == new:\n                continue",
       "            if True:\n                continue",
       "requests open on a master that lost its session are not ended"),
    _m("routing.chunk_duplicates_delivered", "request routing", "requests.py",
       "if chunk.seq < entry.next_seq:\n            return Output()  # a duplicate",
       "if chunk.seq < entry.next_seq - 1:\n            return Output()  # a duplicate",
       "a chunk delivered twice by the network reaches the client twice"),
    _m("routing.task_to_failed_instance", "request routing", "master.py",
       "healthy = [c for c in candidates if not self._instance_failed(state, c)]",
       "healthy = candidates",
       "requests are routed to an instance whose runner failed for good"),
)

_BY_NAME = {m.name: m for m in CATALOGUE}
assert len(_BY_NAME) == len(CATALOGUE), "mutant names are unique"

# The mutant CI runs next to the canary (caught within a few runs), and the livelock of issue 17.
FAST = "log.drop_in_order_event"
LIVELOCK = "election.stale_vote_flips"
assert FAST in _BY_NAME and LIVELOCK in _BY_NAME


def by_name(name: str) -> Mutant:
    mutant = _BY_NAME.get(name)
    if mutant is None:
        raise KeyError(f"unknown mutant {name!r}; known: {', '.join(sorted(_BY_NAME))}")
    return mutant
