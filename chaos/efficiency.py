"""Efficiency invariants: storms and silent slowness fail a run, not only wrong answers.

Theory of operation
-------------------
A control plane can be safe and still bad: a follower that drops the event
it waits for converges through retransmission, every state change a round
trip late; gossip that flips votes back and forth never stops sending. The
safety invariants (``chaos.checkers``) accept both. ``EfficiencyChecker``
watches the same steps and holds the cluster to four bounds while it is
*quiet*: no fault active, and none started or healed, no node booted or
crashed, for ``quiet_after_s`` (time for membership, the settle delay and a
campaign to run their course).

E1. **Control messages per node per simulated second.** Election messages
    (votes, gossip, heartbeats) and NACKs a node sends in one quiet second
    (a broadcast counts once per peer) stay under
    ``control_msgs_per_node_s_max``.
E2. **NACKs per disturbance.** Within a session, a follower's NACKs sent
    while quiet (its bootstrap request from index 0 aside) are explained by
    messages between it and its master that were lost, cut, clogged,
    overflowed, late or held back so later ones overtook them (the network
    reports each: ``Network.disturbed``; in a storm a NACK timer may fire
    while a reordered event is still on its way):
    at most ``nacks_slack + nacks_per_disturbance x disturbances``. When no
    message is lost, a follower does not NACK.
E3. **Applied within a bound.** An event the master indexes while quiet is
    applied by every follower that was up to date, in the session and
    connected both ways to the master, within ``apply_bound_s``, unless a
    message between the two was disturbed from ``excuse_before_s`` before
    the event until the bound (a NACK-and-resend costs at least the 0.5 s
    NACK backoff, far past the bound).
E5. **A worker's lost local event is resent at once.** The master handles
    each node's local events in order; when it holds later ones and lacks
    one, it reports the gap and the node resends it. While quiet, a gap is
    filled within ``gap_fill_s`` of its opening, unless a message between
    the two was lost afterwards or the missing one was merely late (then it
    fills when it arrives). (It found that a second hole, left once the
    first filled, waited for the node's own 5 s retry: the master now
    reports it at once.)
E4. **No empty events.** No indexed event leaves the state as it was (but
    for its index): the ingest cap exists to drop facts already held.
    Telemetry (``NodeGatheredInfo``) is exempt: it refreshes ``last_seen``
    by design, and the timer's report and a fresh reading may land in the
    same instant.
E6. **A NACK asks for every gap the follower knows of.** When a follower
    sends a ``SyncRequest`` (``[from_index, to_index)``, ``to_index`` None:
    everything), every index it knows to exist and lacks must lie in the
    range: from its applied index up to the highest index it has received
    from its master in the session, or heard announced by the master's
    heartbeat (``log_next``), less the indices it received. The checker
    learns this from the messages the follower received (never from the
    replica's buffer or its gap arithmetic), and reads only its applied
    index. Asking gap by gap costs a NACK backoff per gap and, under
    sustained loss, lets a follower fall behind for good; E3 allows the
    first (each gap is a lost message), so only this catches it. Checked at
    every NACK, quiet or not: the follower's own knowledge decides it, not
    the network. What the master answers does not matter (it may bound the
    batch, or answer with a snapshot). A follower whose buffer may have
    reached its bound (``follower_buffer_max``: it drops, and forgets, what
    arrives early) is not checked for the rest of the session.

The late threshold (``late_s``) is a message slower than any healthy link
delivers it (the heavy latency tail is the network's fault, and excused).

A violation raises ``EfficiencyViolation``; the harness reports it as a
liveness failure (exit code 4): nothing is wrong, but too slowly or at too
high a cost. Figures (peak messages per second, NACKs, events checked) go to
the run's metrics.

Invariants kept: reads only what the simulator and the reference replica
already hold; draws no randomness; never changes what a run does.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from skulk.core.effects import AppendLog, Send, SessionChanged
from skulk.core.events import NodeGatheredInfo
from skulk.core.ids import NodeId
from skulk.core.inputs import Received
from skulk.core.messages import (
    ElectionMessage,
    GlobalEvent,
    LocalEventMessage,
    Message,
    SyncRequest,
    SyncResponse,
)
from skulk.core.session import Session
from skulk.core.state import State

if TYPE_CHECKING:
    from chaos.checkers import SafetyChecker
    from sim.world import World

__all__ = ["EfficiencyBounds", "EfficiencyChecker", "EfficiencyViolation", "EFFICIENCY_INVARIANTS"]

EFFICIENCY_INVARIANTS: dict[str, str] = {
    "E1": "control messages per node per simulated second are bounded (tightly while the cluster is quiet)",
    "E2": "a follower's NACKs are explained by lost or late messages",
    "E3": "an indexed event reaches every connected, up-to-date follower within a bound",
    "E4": "no indexed event leaves the state unchanged",
    "E5": "a gap in a node's local events at the master is filled at once",
    "E6": "a follower's NACK asks for every gap it knows of",
}

_CONTROL = (ElectionMessage, SyncRequest)


@dataclass(frozen=True)
class EfficiencyBounds:
    quiet_after_s: float = 8.0  # s: a fault, boot or crash disturbs the cluster this long
    control_msgs_per_node_s_max: int = 60  # E1: messages per node per quiet simulated second
    control_msgs_per_node_s_storm: int = 2_000  # E1: per node per simulated second, quiet or not (a storm)
    nacks_slack: int = 3  # E2: NACKs per follower per session beyond those disturbances explain
    nacks_per_disturbance: int = 3  # E2: NACKs one disturbed message may explain
    apply_bound_s: float = 0.3  # E3: s from indexing to applied on a connected follower
    excuse_before_s: float = 1.0  # E3: s before an event from which disturbances count against it
    recover_disturbed_max: int = 4  # E3: beyond this many disturbed messages an event is not timed
    late_s: float = 0.2  # s: a message slower than this counts as disturbed
    gap_fill_s: float = 0.5  # E5: s from a gap in an origin's local events at the master to its filling
    late_max_s: float = 2.5  # E5: a late message may arrive this long after it was sent (the latency tail)


class EfficiencyViolation(Exception):
    """An efficiency invariant broke (``invariant`` is E1..E6)."""

    def __init__(self, invariant: str, message: str, t: float, host: str | None) -> None:
        super().__init__(invariant, message, t, host)  # simpy rebuilds exceptions from their args
        self.invariant = invariant
        self.detail = message
        self.t = t
        self.host = host

    def __str__(self) -> str:
        where = f" on {self.host}" if self.host else ""
        return (f"efficiency invariant {self.invariant} ({EFFICIENCY_INVARIANTS[self.invariant]}) violated at "
                f"t={self.t:.6f}{where}: {self.detail}")


_STATE_FIELDS = tuple(f for f in msgspec.structs.fields(State) if f.name != "last_index")


def _same_but_index(before: State, after: State) -> bool:
    """``after`` equals ``before`` but for its index (fields compared by identity first: apply copies only what changes)."""
    for field in _STATE_FIELDS:
        a, b = getattr(before, field.name), getattr(after, field.name)
        if a is not b and a != b:
            return False
    return True


class _Follow:
    """One follower in one session: its NACKs, and the count of disturbed messages with its master before it."""

    __slots__ = ("master", "nacks", "base")

    def __init__(self, master: str, base: int) -> None:
        self.master = master
        self.nacks = 0
        self.base = base


class _Known:
    """E6: what one follower knows of its session's log, from the messages it received from the master.

    ``held``: indices received (some may since have been applied; those at or
    below the applied index are ignored); ``end``: one past the highest index
    known to exist; ``capped``: the follower's buffer may have reached its
    bound, so it may have dropped (and forgotten) what arrived early.
    """

    __slots__ = ("replica", "session", "held", "end", "capped", "prune_at")

    def __init__(self, replica: Any, session: Session) -> None:
        self.replica = replica
        self.session = session
        self.held: set[int] = set()
        self.end = 0
        self.capped = False
        self.prune_at = _PRUNE_AT  # forget applied indices once ``held`` grows to this many


_LOG_MESSAGES = (GlobalEvent, SyncResponse, ElectionMessage)
_PRUNE_AT = 1024


class EfficiencyChecker:
    """Checks E1-E6 on a simulated ``World`` (see the module docstring)."""

    def __init__(self, world: World, safety: SafetyChecker, bounds: EfficiencyBounds | None = None) -> None:
        self.world = world
        self.safety = safety
        self.bounds = bounds or EfficiencyBounds()
        self.peers = max(1, len(world.host_ids) - 1)
        self.active_faults = 0
        self.last_upset_at = 0.0  # boot counts: the cluster is not quiet until it settled
        self._second = -1
        self._sent: dict[str, int] = {}  # quiet control messages per node, this second
        self._sent_any: dict[str, int] = {}  # all control messages per node, this second
        self._follow: dict[tuple[str, Session], _Follow] = {}
        self._pair_count: dict[frozenset[str], int] = {}
        self._pair_times: dict[frozenset[str], deque[float]] = {}
        self._pair_late: dict[frozenset[str], deque[float]] = {}  # late or clogged messages (they still arrive)
        self._origins: dict[tuple[Any, ...], list[Any]] = {}  # (origin, session, incarnation) -> [next, received, gap since]
        self.gaps_filled = 0
        self._applied: dict[tuple[str, Session], int] = {}
        self._seen_state: dict[str, Any] = {}  # the state object last looked at per host
        self._deadlines: list[tuple[float, int, str, Session, int, float]] = []
        self._seq = 0
        self._burst: tuple[Session | None, float, int] = (None, -1.0, 0)  # (session, t, first index at t)
        self._known: dict[str, _Known] = {}  # E6, per follower
        self._buffer_max = world.core_config.follower_buffer_max
        # Figures.
        self.peak_control_msgs = 0
        self.peak_control_msgs_any = 0
        self.events_recovered = 0
        self.quiet_nacks = 0
        self.events_timed = 0
        self.disturbances = 0
        self.nacks_checked = 0
        world.network.disturbed = self._disturbed
        world.network.late_s = self.bounds.late_s

    # --- quiet ------------------------------------------------------------------------------------

    def quiet(self) -> bool:
        return self.active_faults == 0 and self.world.env.now - self.last_upset_at >= self.bounds.quiet_after_s

    def _upset(self) -> None:
        self.last_upset_at = self.world.env.now

    def fault_started(self, fault: Any) -> None:
        self._upset()
        if fault.active:
            self.active_faults += 1

    def fault_healed(self, fault: Any) -> None:
        self._upset()
        self.active_faults = max(0, self.active_faults - 1)

    def node_booted(self, host: str) -> None:
        self._upset()

    def node_crashed(self, host: str) -> None:
        self._upset()

    def _disturbed(self, src: str, dst: str, message: Message, why: str) -> None:
        self.disturbances += 1
        pair = frozenset((src, dst))
        self._pair_count[pair] = self._pair_count.get(pair, 0) + 1
        times = self._pair_times.get(pair)
        if times is None:
            times = self._pair_times[pair] = deque(maxlen=64)
        times.append(self.world.env.now)
        if why in ("late", "clogged", "reordered"):
            late = self._pair_late.get(pair)
            if late is None:
                late = self._pair_late[pair] = deque(maxlen=64)
            late.append(self.world.env.now)

    def _disturbances(self, a: str, b: str, since: float, until: float) -> int:
        times = self._pair_times.get(frozenset((a, b)))
        return 0 if times is None else sum(1 for t in times if since <= t <= until)

    # --- the step ---------------------------------------------------------------------------------

    def after_step(self, host: str, node: Any, inp: Any, effects: list[Any]) -> None:
        now = self.world.env.now
        # Bounds that passed before this step, judged on what was applied before it.
        if self._deadlines and self._deadlines[0][0] < now - 1e-9:
            self._expire(now)
        quiet = self.active_faults == 0 and now - self.last_upset_at >= self.bounds.quiet_after_s
        if type(inp) is Received:
            kind = type(inp.message)
            if kind is LocalEventMessage and node.is_master:
                self._local_event(host, node, inp.message, quiet, now)
            elif kind in _LOG_MESSAGES:
                self._learn(host, node, inp)
        for effect in effects:
            kind = type(effect)
            if kind is Send:
                message = effect.message
                if type(message) in _CONTROL:
                    self._count_control(host, effect, now, quiet)
                    if type(message) is SyncRequest:
                        self._asks_every_gap(host, node, message, now)
                        if message.from_index > 0:
                            self._nack(host, message, quiet, now)
            elif kind is AppendLog:
                self._indexed(host, effect, quiet, now)
            elif kind is SessionChanged and not effect.is_master:
                master = effect.session.master
                self._follow[(host, effect.session)] = _Follow(master, self._pair_count.get(frozenset((host, master)), 0))
        current = node.replica.current
        if current is not None and current is not self._seen_state.get(host) and current.session is not None:
            self._seen_state[host] = current
            self._applied[(host, current.session)] = current.last_index

    # --- E1 ---------------------------------------------------------------------------------------

    def _count_control(self, host: str, effect: Send, now: float, quiet: bool) -> None:
        second = int(now)
        if second != self._second:
            self._second = second
            self._sent.clear()
            self._sent_any.clear()
        k = self.peers if effect.to is None else 1
        n = self._sent_any.get(host, 0) + k
        self._sent_any[host] = n
        if n > self.peak_control_msgs_any:
            self.peak_control_msgs_any = n
        if n > self.bounds.control_msgs_per_node_s_storm:
            raise EfficiencyViolation(
                "E1", f"{host} sent {n} election messages and NACKs within the second {second}..{second + 1} "
                      f"(a storm: bound {self.bounds.control_msgs_per_node_s_storm} even while faults heal); "
                      f"the last: {type(effect.message).__name__}", now, host)
        if not quiet:
            return
        n = self._sent.get(host, 0) + k
        self._sent[host] = n
        if n > self.peak_control_msgs:
            self.peak_control_msgs = n
        if n > self.bounds.control_msgs_per_node_s_max:
            raise EfficiencyViolation(
                "E1", f"{host} sent {n} election messages and NACKs within the second {second}..{second + 1} "
                      f"while the cluster was quiet (bound {self.bounds.control_msgs_per_node_s_max}); "
                      f"the last: {type(effect.message).__name__}", now, host)

    # --- E2 ---------------------------------------------------------------------------------------

    def _nack(self, host: str, message: SyncRequest, quiet: bool, now: float) -> None:
        entry = self._follow.get((host, message.session))
        if entry is None or not quiet:
            return
        entry.nacks += 1
        self.quiet_nacks += 1
        b = self.bounds
        disturbed = self._pair_count.get(frozenset((host, entry.master)), 0) - entry.base
        allowed = b.nacks_slack + b.nacks_per_disturbance * disturbed
        if entry.nacks > allowed:
            raise EfficiencyViolation(
                "E2", f"{host} sent {entry.nacks} NACKs in session {message.session} while the cluster was quiet, "
                      f"with {disturbed} lost or late messages to or from its master to explain them "
                      f"(bound {allowed}); the last asked for index {message.from_index}", now, host)

    # --- E6 ---------------------------------------------------------------------------------------

    def _known_for(self, host: str, node: Any) -> _Known | None:
        """``host``'s knowledge of its current session's log (fresh after a restart or a new session)."""
        replica = node.replica
        session = replica.session
        if session is None or session.master == host:
            return None
        known = self._known.get(host)
        if known is None or known.replica is not replica or known.session != session:
            known = self._known[host] = _Known(replica, session)
        return known

    def _learn(self, host: str, node: Any, inp: Received) -> None:
        """The follower received a message about its log: what it now knows exists, and holds."""
        msg = inp.message
        if isinstance(msg, ElectionMessage) and (msg.log_next is None or msg.campaigning):
            return  # not a settled master's heartbeat
        known = self._known_for(host, node)
        if known is None or inp.sender != known.session.master:
            return
        if isinstance(msg, ElectionMessage):  # the master's heartbeat announces its log length
            assert msg.log_next is not None
            known.end = max(known.end, msg.log_next)
            return
        if isinstance(msg, GlobalEvent):
            if msg.session != known.session:
                return
            if len(known.held) >= known.prune_at:
                self._prune(node, known)
                known.prune_at = max(_PRUNE_AT, 2 * len(known.held))
            if len(known.held) >= self._buffer_max:
                self._prune(node, known)
                if len(known.held) >= self._buffer_max:
                    known.capped = True  # the follower may drop what arrives early, and forget it
            indices: tuple[int, ...] = (msg.indexed.index,)
        elif isinstance(msg, SyncResponse):
            if msg.session != known.session:
                return
            current = node.replica.current
            if msg.snapshot is not None and (current is None or current.last_index < msg.snapshot.index):
                return  # a snapshot it rejected: it dropped the whole answer
            indices = tuple(e.index for e in msg.events)
        else:
            return
        for index in indices:
            known.held.add(index)
            if index >= known.end:
                known.end = index + 1

    @staticmethod
    def _prune(node: Any, known: _Known) -> None:
        current = node.replica.current
        if current is not None:
            applied = current.last_index
            known.held = {i for i in known.held if i > applied}

    def _asks_every_gap(self, host: str, node: Any, message: SyncRequest, now: float) -> None:
        known = self._known_for(host, node)
        if known is None or known.capped or message.session != known.session:
            return
        self.nacks_checked += 1
        current = node.replica.current
        first = 0 if current is None else current.last_index + 1  # the first index it lacks
        held, end = known.held, known.end
        if first >= end:
            return  # it knows of nothing it lacks (it asks for the tail it merely suspects)
        last = end - 1
        while last >= first and last in held:
            last -= 1
        if last < first:
            return
        if message.from_index > first or (message.to_index is not None and message.to_index <= last):
            self._prune(node, known)
            missing = [i for i in range(first, end) if i not in known.held]
            shown = ", ".join(str(i) for i in missing[:12]) + (", ..." if len(missing) > 12 else "")
            raise EfficiencyViolation(
                "E6", f"{host} asked its master {message.session.master} for indices "
                      f"[{message.from_index}, {'end' if message.to_index is None else message.to_index}) of "
                      f"session {message.session}, but it knew it lacked {shown} (it has applied up to "
                      f"{first - 1} and knows the log reaches {end - 1}): each gap left out costs a NACK backoff",
                now, host)

    # --- E5 ---------------------------------------------------------------------------------------

    def _local_event(self, master: str, node: Any, msg: LocalEventMessage, quiet: bool, now: float) -> None:
        if node.master.session != msg.session:
            return
        key = (msg.origin, msg.session, msg.incarnation)
        entry = self._origins.get(key)
        if entry is None:
            # [next expected, later ones held, when the gap opened, whether it opened while quiet]
            entry = self._origins[key] = [0, set(), None, False]
        received: set[int] = entry[1]
        if msg.origin_idx < entry[0]:
            return
        received.add(msg.origin_idx)
        before = entry[0]
        while entry[0] in received:
            received.discard(entry[0])
            entry[0] += 1
        gap_since = entry[2]
        if gap_since is not None and entry[0] > before:
            entry[2] = None
            if entry[3]:
                self._gap_filled(master, msg.origin, gap_since, now)
        if received and entry[2] is None:
            # The gap's clock starts when it opens. One that opened while not quiet is not
            # timed at all: the loss behind it may predate the quiet period, and timing it
            # from a later arrival blamed the master for a resend lost before that
            # (oversized_placement seed 239, a false E5 in the 10,000-seed nightly).
            entry[2] = now
            entry[3] = quiet

    def _gap_filled(self, master: str, origin: str, since: float, now: float) -> None:
        b = self.bounds
        self.gaps_filled += 1
        if now - since <= b.gap_fill_s + 1e-9 or self.last_upset_at > since or self.active_faults:
            return
        pair = frozenset((master, origin))
        if self._disturbances(master, origin, since, now):
            return  # the resend (or the report of the gap) was lost too
        late = self._pair_late.get(pair)
        if late is not None and any(since - b.late_max_s <= t <= now for t in late):
            return  # the missing event was late, not lost: it filled the gap when it arrived
        raise EfficiencyViolation(
            "E5", f"{master} held later local events of {origin} for {now - since:.3f} s before the missing one "
                  f"arrived (bound {b.gap_fill_s:g} s), though nothing was lost after the gap opened", now, master)

    # --- E3 and E4 --------------------------------------------------------------------------------

    def _indexed(self, master: str, effect: AppendLog, quiet: bool, now: float) -> None:
        session, indexed = effect.session, effect.indexed
        self._check_not_empty(master, session, indexed.index, now)
        b_session, b_t, b_first = self._burst
        if b_session != session or b_t != now:
            self._burst = (session, now, indexed.index)
            b_first = indexed.index
        if not quiet or indexed.index == 0:
            return
        world = self.world
        net = world.network
        deadline = now + self.bounds.apply_bound_s
        for fid in world.host_ids:
            if fid == master:
                continue
            h = world.hosts[fid]
            fnode = h.node
            if fnode is None or h.paused:
                continue
            current = fnode.replica.current
            # Up to date (all but this instant's burst), in the session, connected both ways.
            if current is None or current.session != session or current.last_index < b_first - 1:
                continue
            if not (net.hears(fid, master) and net.hears(master, fid)):
                continue
            self._seq += 1
            heapq.heappush(self._deadlines, (deadline, self._seq, fid, session, indexed.index, now))
            self.events_timed += 1

    def _expire(self, now: float) -> None:
        """Events whose bound passed before ``now``: each must have been applied by then."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] < now - 1e-9:
            deadline, _, host, session, index, at = heapq.heappop(deadlines)
            if self._applied.get((host, session), -1) >= index:
                continue
            self._late(host, session, index, at, deadline, now)

    def _late(self, host: str, session: Session, index: int, at: float, deadline: float, now: float) -> None:
        """``index`` was not applied by ``deadline``: a violation, unless the cluster or the pair was disturbed.

        Undisturbed, the bound is ``apply_bound_s``. With ``d`` disturbed
        messages between the follower and its master, the follower may first
        learn of the gap from the master's next heartbeat, then NACK with the
        documented backoff (base x 2^n, reset by progress): the bound becomes
        ``apply_bound_s + heartbeat + base x (2^(d+1) - 1)``.
        """
        b = self.bounds
        if self.last_upset_at > at or self.active_faults:
            return  # the cluster stopped being quiet meanwhile
        node = self.world.hosts[NodeId(host)].node
        if node is None or node.session != session:
            return  # it crashed or moved on to another session
        d = self._disturbances(host, session.master, at - b.excuse_before_s, now)
        if d > b.recover_disturbed_max:
            return
        config = self.world.core_config
        bound = at + b.apply_bound_s
        if d:
            bound += config.heartbeat_interval_s + config.nack_base_s * (2 ** (d + 1) - 1)
            if now <= bound + 1e-9:
                self._seq += 1
                heapq.heappush(self._deadlines, (bound, self._seq, host, session, index, at))
                self.events_recovered += 1
                return
        why = ("though no message between them was lost or late" if not d else
               f"though only {d} message(s) between them were lost or late (a NACK with its backoff recovers sooner)")
        raise EfficiencyViolation(
            "E3", f"event {index} indexed by {session.master} at t={at:.6f} was not applied by {host} within "
                  f"{bound - at:.3f} s, {why}", now, host)

    def _check_not_empty(self, master: str, session: Session, index: int, now: float) -> None:
        log = self.safety.logs.get(session)
        if log is None or index == 0 or index >= len(log.events):
            return
        event = log.events[index].event
        if type(event) is NodeGatheredInfo:
            return  # telemetry refreshes last_seen by design; two reports in one instant repeat it
        before, after = log.state_at(index - 1), log.state_at(index)
        if _same_but_index(before, after):
            raise EfficiencyViolation(
                "E4", f"{master} indexed {type(event).__name__} at {index} of session {session}, which changes "
                      f"nothing the state did not already hold", now, master)

    # --- figures ----------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        return {
            "peak_control_msgs_per_node_s": self.peak_control_msgs,
            "peak_control_msgs_per_node_s_any": self.peak_control_msgs_any,
            "events_recovered": self.events_recovered,
            "local_gaps_filled": self.gaps_filled,
            "quiet_nacks": self.quiet_nacks,
            "events_timed": self.events_timed,
            "nacks_checked": self.nacks_checked,
            "messages_disturbed": self.disturbances,
        }
