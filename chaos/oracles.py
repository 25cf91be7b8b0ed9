"""Independent oracles: the figures a scenario checks, derived without the code under test.

Theory of operation
-------------------
A scenario that compares the core's answer with the core's own function
(``context_ceiling(...) == instance.context_ceiling``) checks consistency,
not correctness: drop the 1.30 weight overhead from the core and both sides
move together. The functions here recompute what the documentation says
(``docs/placement.md``, ``shared/REFERENCE.md``) from the raw inputs: the
card's figures, each node's total RAM, the shard's layers. They use the
documented constants as literals and share no code with ``skulk.core``
(``tests/chaos/test_oracles.py`` checks them against the worked example in
``docs/placement.md``, so the documentation and the oracle cannot drift).

``OracleChecker`` applies them to every run, after every step:

O1. **Footprint.** Every new instance's ``memory_by_node`` is, node by node,
    the documented footprint of its shard: weights x share x 1.30 + KV bytes
    for 8,192 tokens x share + 256 MiB, each term rounded up once.
O2. **Context ceiling.** Every new instance's ``context_ceiling`` is the
    documented one: the smallest per-node capacity ``floor((floor(0.75 x
    RAM) - ceil(weights x share x 1.30) - 256 MiB) / (KV bytes per token x
    share))``, capped by the card's context length.
O3. **Memory.** After every new instance, the documented footprints placed
    on each node add up to at most 75 % of its RAM, and the new one fits what
    the node reported as available.
O4. **Exactly once.** A command takes effect once: within a session, one
    ``InstanceCreated`` per command id (retries and duplicated deliveries
    included); and a request cancelled before its submission reached the
    master is never created (a cancel that overtakes its submit still
    cancels it: the master remembers the last ``command_dedupe_max``).
O5. **Streams in order, once.** What a node hands its API for one request
    arrives in strictly increasing chunk order and ends once: no duplicate,
    no chunk after the last.
O6. **A master follows its session.** A node acting as master of a session
    follows that very session (DESIGN.md: a node that loses mastership stops
    acting as master at once; invariant 1).
O7. **Placement is as small and as well linked as possible.** For every
    instance placed for a command, a brute-force search from the documented
    rules (``chaos.placement_oracle``) finds no set of fewer nodes that fits
    with a ring, and no better ring over as many nodes.
O8. **An impossible placement is impossible.** For every
    ``insufficient_memory`` refusal, the same search finds no set of nodes
    that fits with a ring.
O9. **Only the master a command was sent to answers it.** An origin takes a
    command's answer (hands its API the acceptance) only from the master of
    the session it last sent the command in; a deposed master that has not
    heard of it (a zombie) still answers, in its dead session, and that
    answer must not count.

A broken oracle raises ``OracleViolation`` (a safety failure, exit code 3):
the arithmetic or the bookkeeping the cluster relies on is wrong.

Also here, for scenarios: ``layer_split`` (largest remainder, documented
ties) and ``breaker`` (the crash breaker's documented numbers).

Invariants kept: imports nothing from ``skulk.core`` but record types and
the effects it observes; exact integer and fraction arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from skulk.core.cards import ModelCard
from skulk.core.commands import CancelTask, PlaceInstance, SubmitTask
from skulk.core.effects import AppendLog, CommandCompleted, DeliverChunk, Send
from skulk.core.events import InstanceCreated, TaskCreated
from skulk.core.inputs import Received, SubmitCommand
from skulk.core.messages import CommandMessage, CommandResultMessage
from skulk.core.instances import Instance, PipelineShardMetadata, TensorShardMetadata

if TYPE_CHECKING:
    from chaos.checkers import SafetyChecker
    from sim.world import World

__all__ = [
    "OracleViolation",
    "OracleChecker",
    "ORACLES",
    "USABLE",
    "OVERHEAD",
    "REFERENCE_TOKENS",
    "FLOOR_BYTES",
    "kv_bytes_per_token",
    "footprint_bytes",
    "node_tokens",
    "ceiling",
    "layer_split",
    "share_of",
    "BREAKER",
]

ORACLES: dict[str, str] = {
    "O1": "a new instance's footprint per node is the documented one",
    "O2": "a new instance's context ceiling is the documented one",
    "O3": "the documented footprints on a node fit 75 % of its RAM, and a new one fits what it reported",
    "O4": "a command takes effect once",
    "O5": "a request's chunks reach its API in order, once",
    "O6": "a node acting as master follows the session it leads",
    "O7": "a placement uses the fewest nodes and the best ring the documented rules allow",
    "O8": "a placement refused for memory fits nowhere",
    "O9": "a command's answer counts only from the master of the session it was sent in",
}

# The documented numbers (docs/placement.md, shared/REFERENCE.md), written out here on purpose.
USABLE = Fraction(3, 4)  # never plan on more than 75 % of RAM
OVERHEAD = Fraction(13, 10)  # weights x 1.30
REFERENCE_TOKENS = 8_192  # KV cache reserved at placement
FLOOR_BYTES = 256 * 1024 * 1024  # the runner process: 256 MiB
# The crash breaker: 3 failures within 60 s trip it (edge-triggered), it re-arms after 60 s quiet,
# restarts back off 1 s, 2 s, ... at most 8 s; exit code 86 is a wedge, never retried.
BREAKER = {"failures_to_trip": 3, "window_s": 60.0, "rearm_quiet_s": 60.0, "backoff_first_s": 1.0,
           "backoff_max_s": 8.0, "wedge_exit_code": 86}


class OracleViolation(Exception):
    """An independent oracle disagrees with what the core did (``oracle`` is O1..O6)."""

    def __init__(self, oracle: str, message: str, t: float, host: str | None) -> None:
        super().__init__(oracle, message, t, host)  # simpy rebuilds exceptions from their args
        self.oracle = oracle
        self.detail = message
        self.t = t
        self.host = host

    def __str__(self) -> str:
        where = f" on {self.host}" if self.host else ""
        return f"oracle {self.oracle} ({ORACLES[self.oracle]}) violated at t={self.t:.6f}{where}: {self.detail}"


# --- the documented arithmetic ---------------------------------------------------------------------


def kv_bytes_per_token(card: ModelCard) -> int:
    """2 (K and V) x layers x KV heads x head dim x 2 bytes, unless the card states its own."""
    return card.kv_bytes_per_token or 2 * card.n_layers * card.num_kv_heads * card.head_dim * 2


def share_of(shard: Any) -> Fraction:
    """Pipeline: the shard's layers over all layers; tensor: one over the world size."""
    if isinstance(shard, PipelineShardMetadata):
        return Fraction(shard.end_layer - shard.start_layer, shard.n_layers)
    assert isinstance(shard, TensorShardMetadata), shard
    return Fraction(1, shard.world_size)


def _ceil(x: Fraction) -> int:
    return -((-x.numerator) // x.denominator)


def footprint_bytes(card: ModelCard, share: Fraction) -> int:
    """weights x share x 1.30 + KV for 8,192 tokens x share + 256 MiB, each term rounded up once."""
    weights = _ceil(card.weight_bytes * share * OVERHEAD)
    kv = _ceil(kv_bytes_per_token(card) * REFERENCE_TOKENS * share)
    return weights + kv + FLOOR_BYTES


def node_tokens(card: ModelCard, share: Fraction, ram_total_bytes: int) -> int:
    """floor((floor(0.75 x RAM) - ceil(weights x share x 1.30) - 256 MiB) / (KV bytes per token x share))."""
    capacity = math.floor(ram_total_bytes * USABLE)
    room = capacity - _ceil(card.weight_bytes * share * OVERHEAD) - FLOOR_BYTES
    return math.floor(Fraction(room) / (kv_bytes_per_token(card) * share))


def ceiling(card: ModelCard, shares: Mapping[str, Fraction], ram_total: Mapping[str, int]) -> int:
    """The instance's ceiling: the smallest node capacity, capped by the card's context length (at least 0)."""
    return max(0, min([card.context_length] + [node_tokens(card, shares[n], ram_total[n]) for n in shares]))


def layer_split(n_layers: int, weights: Mapping[str, int]) -> dict[str, int]:
    """One layer per node, the rest by largest remainder of rest x weight / total (ties: more weight, then id)."""
    nodes = sorted(weights)
    total = sum(weights.values())
    rest = n_layers - len(nodes)
    share = {n: Fraction(rest * (weights[n] if total else 1), total if total else len(nodes)) for n in nodes}
    counts = {n: 1 + math.floor(share[n]) for n in nodes}
    leftover = n_layers - sum(counts.values())
    for n in sorted(nodes, key=lambda n: (-(share[n] - math.floor(share[n])), -weights[n], n))[:leftover]:
        counts[n] += 1
    return counts


# --- the checker --------------------------------------------------------------------------------------


class OracleChecker:
    """Checks O1-O6 on every step of a simulated run (see the module docstring)."""

    def __init__(self, world: World, safety: SafetyChecker) -> None:
        self.world = world
        self.safety = safety
        self.cards = world.cards
        self.ram_total = {h: world.hosts[h].ram_total_bytes for h in world.host_ids}
        self._seen_instances: set[str] = set()
        self._command_effects: dict[tuple[Any, str], int] = {}
        self._streams: dict[tuple[str, str], tuple[int, bool]] = {}
        # Per session: requests the master saw cancelled (with how many cancels it had seen
        # then), and submissions it received after their cancel (those must never be created).
        self._cancelled: dict[Any, dict[str, int]] = {}
        self._cancels_seen: dict[Any, int] = {}
        self._must_not_create: dict[Any, set[str]] = {}
        self._remembered = world.core_config.command_dedupe_max
        self._placements: dict[str, PlaceInstance] = {}  # every PlaceInstance any API took, by command id
        self._sent_in: dict[tuple[str, str], Any] = {}  # (origin, command id) -> the session it was last sent in
        self.placements_searched = 0
        self.instances_checked = 0
        self.chunks_checked = 0

    def _fail(self, oracle: str, message: str, host: str | None) -> None:
        raise OracleViolation(oracle, message, self.world.env.now, host)

    def after_step(self, host: str, node: Any, inp: Any, effects: list[Any]) -> None:
        kind_in = type(inp)
        if kind_in is Received:
            kind_msg = type(inp.message)
            if kind_msg is CommandMessage:
                if node.is_master:
                    self._command_at_master(node.master.session, inp.message.command)
            elif kind_msg is CommandResultMessage:
                self._answered(host, inp.message, effects)
        elif kind_in is SubmitCommand and type(inp.command) is PlaceInstance:
            self._placements[inp.command.command_id] = inp.command
        refused = None
        for effect in effects:
            kind = type(effect)
            if kind is Send:
                message = effect.message
                kind_msg = type(message)
                if kind_msg is CommandMessage:
                    if message.origin == host:
                        self._sent_in[(host, message.command.command_id)] = node.session
                elif kind_msg is CommandResultMessage and message.result.code == "insufficient_memory":
                    refused = message
            elif kind is AppendLog:
                event = effect.indexed.event
                kind_event = type(event)
                if kind_event is InstanceCreated:
                    self._created(host, effect, event)
                elif kind_event is TaskCreated:
                    self._task_created(host, effect, event)
            elif kind is DeliverChunk:
                self._chunk(host, effect.chunk)
        if refused is not None:
            first_append = next((e for e in effects if type(e) is AppendLog), None)
            self._refused(host, node, refused, first_append)
        master = node.master
        if master is not None and master.active:
            following = node.election.session
            if master.session is not following and master.session != following:
                self._fail("O6", f"{host} acts as master of session {master.session} but follows {following}", host)

    # --- O1-O4 ------------------------------------------------------------------------------------

    def _created(self, host: str, effect: AppendLog, event: InstanceCreated) -> None:
        inst = event.instance
        if event.command_id is not None:
            key = (effect.session, event.command_id)
            count = self._command_effects.get(key, 0) + 1
            self._command_effects[key] = count
            if count > 1:
                self._fail("O4", f"command {event.command_id} created {count} instances in session "
                                 f"{effect.session} (the latest {inst.instance_id})", host)
        if inst.instance_id in self._seen_instances:
            return  # re-adopted after a failover: checked when it was created
        self._seen_instances.add(inst.instance_id)
        self.instances_checked += 1
        card = self.cards.get(inst.shard_assignments.model_id)
        if card is None:
            return
        sa = inst.shard_assignments
        shares = {node: share_of(sa.runner_to_shard[runner]) for node, runner in sa.node_to_runner.items()}
        for node in sorted(shares):
            want = footprint_bytes(card, shares[node])
            got = inst.memory_by_node.get(node)
            if got != want:
                self._fail("O1", f"instance {inst.instance_id} books {got} bytes on {node} for a {shares[node]} share "
                                 f"of {card.model_id}; the documented footprint is {want}", host)
        totals = {node: self.ram_total[node] for node in shares if node in self.ram_total}
        if len(totals) == len(shares):
            want_ceiling = ceiling(card, shares, totals)
            if inst.context_ceiling != want_ceiling:
                self._fail("O2", f"instance {inst.instance_id} of {card.model_id} over {sorted(shares)} has a context "
                                 f"ceiling of {inst.context_ceiling} tokens; the documented arithmetic gives "
                                 f"{want_ceiling}", host)
        self._check_memory(host, effect, inst, shares)
        command = self._placements.get(event.command_id) if event.command_id is not None else None
        if command is not None and inst.generation == 0:
            self._check_placement(host, effect, inst, card, command)

    # --- O9 -----------------------------------------------------------------------------------

    def _answered(self, host: str, msg: Any, effects: list[Any]) -> None:
        cid = msg.result.command_id
        for effect in effects:
            if type(effect) is CommandCompleted and effect.command_id == cid and effect.result.status != "rejected":
                sent = self._sent_in.get((host, cid))
                if sent is not None and msg.session != sent:
                    self._fail("O9", f"{host} took the answer to {cid} ({effect.result.status}) from session "
                                     f"{msg.session}, but sent it in {sent}", host)

    # --- O7 and O8 --------------------------------------------------------------------------------

    def _state_before(self, session: Any, index: int) -> Any:
        log = self.safety.logs.get(session)
        if log is None or index < 1 or index - 1 >= len(log.events):
            return None
        return log.state_at(index - 1)

    def _check_placement(self, host: str, effect: AppendLog, inst: Instance, card: ModelCard, command: Any) -> None:
        from chaos.placement_oracle import Reference, chosen_quality, names

        state = self._state_before(effect.session, effect.indexed.index)
        if state is None:
            return
        self.placements_searched += 1
        ref = Reference(state, self.cards, command)
        k = len(inst.shard_assignments.node_to_runner)
        smaller = ref.smallest(below=k)
        if smaller is not None:
            n, (quality, subset) = smaller
            self._fail("O7", f"{inst.instance_id} takes {k} nodes, but {n} would do: {names(subset)} fit "
                             f"{card.model_id} with a ring (hop ranks {quality}); free memory {ref.free}", host)
        best = ref.best(k)
        chosen = chosen_quality(state, inst)
        if best is None or chosen is None:
            self._fail("O7", f"{inst.instance_id} over {names(inst.shard_assignments.node_to_runner)}: by the "
                             f"documented rules no {k}-node set fits with a ring of observed links "
                             f"(its ring: {[(h.node_id, h.address) for h in inst.ring]}; free memory {ref.free})", host)
            return
        if chosen > best[0]:
            self._fail("O7", f"{inst.instance_id}'s ring has hop ranks {chosen} (worst first; 0 thunderbolt .. "
                             f"4 VPN), but {names(best[1])} allow {best[0]}", host)

    def _refused(self, host: str, node: Any, msg: Any, first_append: AppendLog | None) -> None:
        from chaos.placement_oracle import Reference, names

        command = self._placements.get(msg.result.command_id)
        if command is None or not node.is_master:
            return
        if first_append is not None:
            state = self._state_before(first_append.session, first_append.indexed.index)
        else:
            state = node.replica.current
        if state is None or command.model_id not in self.cards:
            return
        self.placements_searched += 1
        found = Reference(state, self.cards, command).smallest()
        if found is not None:
            n, (quality, subset) = found
            self._fail("O8", f"{command.command_id} ({command.model_id}) was refused for memory, but {names(subset)} "
                             f"fit it with a ring (hop ranks {quality})", host)

    def _check_memory(self, host: str, effect: AppendLog, inst: Instance, shares: Mapping[str, Fraction]) -> None:
        log = self.safety.logs.get(effect.session)
        if log is None or effect.indexed.index >= len(log.events):
            return
        index = effect.indexed.index
        before, after = log.state_at(index - 1), log.state_at(index)
        for node in sorted(shares):
            total = self.ram_total.get(node)
            if total is None:
                continue
            capacity = math.floor(total * USABLE)
            placed = 0
            for other in after.instances.values():
                runner = other.shard_assignments.node_to_runner.get(node)
                card = self.cards.get(other.shard_assignments.model_id)
                if runner is not None and card is not None:
                    placed += footprint_bytes(card, share_of(other.shard_assignments.runner_to_shard[runner]))
            if placed > capacity:
                self._fail("O3", f"after {inst.instance_id}, the instances on {node} need {placed} bytes, beyond "
                                 f"75 % of its {total} bytes of RAM ({capacity})", host)
            reported = before.node_memory.get(node)
            card = self.cards[inst.shard_assignments.model_id]
            need = footprint_bytes(card, shares[node])
            if reported is not None and need > min(reported.ram_available.in_bytes, capacity):
                self._fail("O3", f"{inst.instance_id} needs {need} bytes on {node}, which reported only "
                                 f"{reported.ram_available.in_bytes} available (75 % of RAM: {capacity})", host)

    def _command_at_master(self, session: Any, command: Any) -> None:
        if type(command) is CancelTask:
            seen = self._cancels_seen.get(session, 0) + 1
            self._cancels_seen[session] = seen
            self._cancelled.setdefault(session, {})[command.target] = seen
        elif type(command) is SubmitTask:
            at = self._cancelled.get(session, {}).get(command.command_id)
            if at is not None and self._cancels_seen.get(session, 0) - at < self._remembered:
                self._must_not_create.setdefault(session, set()).add(command.command_id)

    def _task_created(self, host: str, effect: AppendLog, event: TaskCreated) -> None:
        cid = event.task.command_id
        if cid in self._must_not_create.get(effect.session, ()):
            self._fail("O4", f"request {cid} was created in session {effect.session} although its cancel reached the "
                             "master before it did", host)

    # --- O5 ---------------------------------------------------------------------------------------

    def _chunk(self, host: str, chunk: Any) -> None:
        self.chunks_checked += 1
        key = (host, chunk.command_id)
        last = self._streams.get(key)
        if last is not None:
            seq, ended = last
            if ended:
                self._fail("O5", f"{host} handed its API chunk {chunk.seq} of {chunk.command_id} after the last one", host)
            if chunk.seq <= seq:
                self._fail("O5", f"{host} handed its API chunk {chunk.seq} of {chunk.command_id} after chunk {seq}", host)
        self._streams[key] = (chunk.seq, chunk.finish_reason is not None)

    def summary(self) -> dict[str, Any]:
        return {"instances_checked_by_oracles": self.instances_checked, "chunks_checked": self.chunks_checked,
                "placements_searched": self.placements_searched}
