"""Placement feasibility from a brute-force reference (the oracle behind O7 and O8).

Theory of operation
-------------------
Placement searches cleverly (subsets inside strongly connected components,
ring orders pruned by a lower bound, largest-remainder splits); this module
searches stupidly, from the documented rules alone (``docs/placement.md``):

- a node's *free* memory is ``min(usable - reserved, 0.75 x RAM -
  committed)`` with ``usable = min(available, 0.75 x RAM)``; ``committed``
  is the footprint of every instance placed on it, ``reserved`` the part of
  those footprints whose runner there has not loaded (a loading runner
  reserves the layers it has still to load);
- a node set *fits* when every node's documented footprint (pipeline: layers
  split by free memory, largest remainder; tensor: ``1/k`` each, allowed
  when the card supports it and ``k`` divides the hidden size and the KV
  heads) is within its free memory;
- a set has a *ring* when some order of its nodes has an observed link for
  every hop (rank ``r - 1`` reaches rank ``r`` at an address of ``r``); a
  ring's quality is its hops' kind ranks, worst first (thunderbolt 0,
  ethernet 1, wifi 2, unknown 3, VPN 4, a VPN recognised by its address),
  smaller is better;
- placement takes the smallest node count with any set that fits and has a
  ring, and among those the best ring.

Every subset and every order is tried (the simulator has at most six
nodes: 64 subsets, 120 orders each), which is exactly what makes it a
reference. ``OracleChecker`` asks it after each placement the master indexes
(O7: no smaller set would have done, and no better ring existed for that
many nodes) and after each ``insufficient_memory`` refusal (O8: no set would
have fitted with a ring).

Invariants kept: shares no code with ``skulk.core.placement``,
``skulk.core.memory`` or ``skulk.core.interconnect``.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from skulk.core.cards import ModelCard
from skulk.core.instances import (
    Instance,
    RunnerLoaded,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerShuttingDown,
    RunnerWarmingUp,
)

from chaos.oracles import USABLE, footprint_bytes, layer_split, share_of

__all__ = ["KIND_ORDER", "free_bytes", "fits", "ring_quality", "best_ring", "search", "Reference"]

KIND_ORDER = ("thunderbolt", "ethernet", "wifi", "unknown", "vpn")
_VPN = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd7a:115c:a1e0::/48"))
_LOADED = (RunnerLoaded, RunnerWarmingUp, RunnerReady, RunnerRunning, RunnerShuttingDown)


def _rank(address: str, kind: str) -> int | None:
    """A link's rank (None: unusable, an IPv6 link-local address)."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    if ip.is_unspecified or ip.is_multicast or (ip.version == 6 and ip.is_link_local):
        return None
    if any(ip in net for net in _VPN if net.version == ip.version):
        return KIND_ORDER.index("vpn")
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else KIND_ORDER.index("unknown")


def best_links(state: Any, thunderbolt_only: bool = False) -> dict[tuple[str, str], int]:
    """The best rank on which ``source`` reaches ``sink``, per ordered pair with an observed link."""
    out: dict[tuple[str, str], int] = {}
    for c in state.topology.connections:
        rank = _rank(c.address, c.kind)
        if rank is None or c.source == c.sink:
            continue
        if thunderbolt_only and rank != 0:
            continue
        key = (c.source, c.sink)
        if key not in out or rank < out[key]:
            out[key] = rank
    return out


def free_bytes(state: Any, cards: Mapping[str, ModelCard], node: str) -> int | None:
    """The documented free memory of ``node`` for a new shard (None: no memory reported)."""
    mem = state.node_memory.get(node)
    if mem is None:
        return None
    capacity = math.floor(mem.ram_total.in_bytes * USABLE)
    usable = min(mem.ram_available.in_bytes, capacity)
    reserved = committed = 0
    for inst in state.instances.values():
        runner = inst.shard_assignments.node_to_runner.get(node)
        if runner is None:
            continue
        need = inst.memory_by_node.get(node, 0)
        committed += need
        status = state.runners.get(runner)
        if isinstance(status, _LOADED):
            continue
        if isinstance(status, RunnerLoading) and 0 < status.layers_loaded <= status.layers_total:
            reserved += math.ceil(Fraction(need * (status.layers_total - status.layers_loaded), status.layers_total))
        else:
            reserved += need
    return max(0, min(usable - reserved, capacity - committed))


def fits(card: ModelCard, sharding: str, free: Mapping[str, int]) -> bool:
    """Does every node of ``free``'s set hold its documented share?"""
    nodes = sorted(free)
    k = len(nodes)
    if sharding == "Tensor":
        if not card.supports_tensor or card.hidden_size % k or card.num_kv_heads % k:
            return False
        shares = {n: Fraction(1, k) for n in nodes}
    else:
        if k > card.n_layers:
            return False
        split = layer_split(card.n_layers, free)
        shares = {n: Fraction(split[n], card.n_layers) for n in nodes}
    return all(footprint_bytes(card, shares[n]) <= free[n] for n in nodes)


def ring_quality(order: Sequence[str], links: Mapping[tuple[str, str], int]) -> tuple[int, ...] | None:
    """The hop ranks of the ring ``order``, worst first (None: some hop has no link)."""
    if len(order) == 1:
        return ()
    ranks = []
    for i in range(len(order)):
        rank = links.get((order[i - 1], order[i]))
        if rank is None:
            return None
        ranks.append(rank)
    return tuple(sorted(ranks, reverse=True))


def best_ring(nodes: Sequence[str], links: Mapping[tuple[str, str], int], *, full_mesh: bool = False) -> tuple[int, ...] | None:
    """The best ring quality over every order of ``nodes`` (None: no ring)."""
    ordered = sorted(nodes)
    if full_mesh and not all((a, b) in links for a in ordered for b in ordered if a != b):
        return None
    best: tuple[int, ...] | None = None
    for rest in itertools.permutations(ordered[1:]):
        q = ring_quality((ordered[0], *rest), links)
        if q is not None and (best is None or q < best):
            best = q
    return best


class Reference:
    """The brute-force answer to one placement question."""

    def __init__(self, state: Any, cards: Mapping[str, ModelCard], command: Any) -> None:
        self.card = cards[command.model_id]
        self.sharding = command.sharding
        jaccl = command.instance_meta == "MlxJaccl"
        self.full_mesh = jaccl
        self.links = best_links(state, thunderbolt_only=jaccl)
        excluded = set(command.excluded_nodes)
        self.free: dict[str, int] = {}
        for node in sorted(state.topology.nodes):
            if node in excluded:
                continue
            f = free_bytes(state, cards, node)
            if f is not None:
                self.free[node] = f
        self.min_nodes = max(1, command.min_nodes)

    def best(self, k: int) -> tuple[tuple[int, ...], tuple[str, ...]] | None:
        """The best ring quality of any ``k``-node set that fits (and the first such set)."""
        found: tuple[tuple[int, ...], tuple[str, ...]] | None = None
        for subset in itertools.combinations(sorted(self.free), k):
            if not fits(self.card, self.sharding, {n: self.free[n] for n in subset}):
                continue
            q = best_ring(subset, self.links, full_mesh=self.full_mesh)
            if q is not None and (found is None or q < found[0]):
                found = (q, subset)
        return found

    def smallest(self, below: int | None = None) -> tuple[int, tuple[tuple[int, ...], tuple[str, ...]]] | None:
        """The smallest node count (under ``below``) with a set that fits and has a ring."""
        top = len(self.free) if below is None else min(below - 1, len(self.free))
        for k in range(self.min_nodes, top + 1):
            found = self.best(k)
            if found is not None:
                return k, found
        return None


def chosen_quality(state: Any, inst: Instance) -> tuple[int, ...] | None:
    """The quality of the ring ``inst`` uses: each hop's observed link at the hop's address."""
    hops = sorted(inst.ring, key=lambda h: h.rank)
    if len(hops) <= 1:
        return ()
    ranks = []
    for i, hop in enumerate(hops):
        prev = hops[i - 1].node_id
        ip = hop.address.rsplit(":", 1)[0].strip("[]")
        links = [c for c in state.topology.connections if c.source == prev and c.sink == hop.node_id and c.address == ip]
        rank = min((r for r in (_rank(c.address, c.kind) for c in links) if r is not None), default=None)
        if rank is None:
            return None
        ranks.append(rank)
    return tuple(sorted(ranks, reverse=True))


def search(state: Any, cards: Mapping[str, ModelCard], command: Any) -> Reference:
    return Reference(state, cards, command)


def names(nodes: Iterable[str]) -> str:
    return ",".join(sorted(nodes))
