"""Placement: which nodes host a model, how it is split, and over which ring.

Theory of operation
-------------------
``place(state, command, cards, config)`` is a pure function of the replicated
state. It returns ``Placed`` with a fully built instance, or
``PlacementRefused``: *pending* when information is still missing (memory
telemetry, observed links: the API retries, then answers 503) or *impossible*
(400, with the memory arithmetic; 404 for an unknown model).

The search, for node counts ``k = max(1, min_nodes), ...``:

1. Candidates are the topology's nodes, minus ``excluded_nodes``, that have
   reported memory. Their free memory comes from ``memory.node_budget`` (the
   one memory model; it reserves instances already placed there).
2. For each ``k``, node subsets lie inside one strongly connected component of
   the directed graph of observed links (networkx), since a ring must leave and
   re-enter every node. A single node is a trivial cycle.
3. A subset fits when every node's shard footprint fits its free memory.
   Pipeline: layers proportional to free memory, at least one each, by
   largest remainder (ties: more free memory first, then node id). Tensor:
   an equal share each, allowed only when the card supports it and the hidden
   size and KV heads divide by ``k``.
4. Disk counts like memory: a node must have room (its reported free disk,
   less what its transfers in flight still need, less
   ``CoreConfig.disk_margin_bytes``) for the model files its shard needs and
   it does not hold yet (``files.fetch_bytes``); a node that has not reported
   its disk is not held to it.
5. Among fitting subsets with a ring, the best ring order
   (``interconnect.best_ring_order``: rank 0 is the smallest node id, hops
   ranked worst first, thunderbolt best, VPN worst) wins; then the subset
   that must fetch the fewest bytes of model files (nodes that already hold
   the files are preferred); then the subset with the most free memory left
   on its tightest node; then the smallest node ids.
6. The smallest ``k`` with any result wins.

Every ordering above uses sorted node ids or explicit keys, never the
iteration order of a set or dict, object identity or ``hash()``: the same
state gives the same placement on every master.

Search limits (documented, deterministic): subsets are examined in a fixed
order up to ``MAX_SUBSETS_PER_SIZE`` per ``k``; ring orders are searched as
``interconnect.best_ring_order`` describes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import networkx as nx

from skulk.core import interconnect
from skulk.core.cards import ModelCard
from skulk.core.commands import InstanceMeta, PlaceInstance, Sharding
from skulk.core.config import CoreConfig
from skulk.core.context import context_ceiling
from skulk.core.files import Need, fetch_bytes, need_of
from skulk.core.ids import InstanceId, ModelId, NodeId, RunnerId, derive_id
from skulk.core.instances import (
    Instance,
    MlxJacclInstance,
    MlxRingInstance,
    PipelineShardMetadata,
    RingHop,
    ShardAssignments,
    ShardMetadata,
    SpeculationConfig,
    TensorShardMetadata,
)
from skulk.core.memory import (
    REFERENCE_CONTEXT_TOKENS,
    Footprint,
    NodeBudget,
    describe_shortfall,
    format_gb,
    node_budget,
    shard_footprint,
)
from skulk.core.topology import Connection
from skulk.core.records import Record
from skulk.core.state import State

__all__ = [
    "Placed",
    "PlacementRefused",
    "Preview",
    "MAX_SUBSETS_PER_SIZE",
    "place",
    "previews",
    "replace",
    "fits",
    "layer_split",
]

MAX_SUBSETS_PER_SIZE = 2_000

SHARDINGS: tuple[Sharding, ...] = ("Pipeline", "Tensor")
INSTANCE_METAS: tuple[InstanceMeta, ...] = ("MlxRing", "MlxJaccl")


class Placed(Record, frozen=True, kw_only=True):
    """A placement: ``instance`` is ready to be indexed as ``InstanceCreated``.

    ``transfer_bytes_by_node``: the model files each node must fetch first (nodes with none left out).
    """

    instance: Instance
    transfer_bytes_by_node: dict[NodeId, int] = {}


class PlacementRefused(Record, frozen=True, kw_only=True):
    """No placement. ``pending``: information is missing, retry (then 503); else 400/404.

    Codes: ``model_not_found`` (404), ``invalid_request``, ``tensor_unsupported``,
    ``insufficient_memory``, ``no_nodes``, ``pending_telemetry``, ``no_ring``.
    """

    message: str
    code: str
    pending: bool


class Preview(Record, frozen=True, kw_only=True):
    """One (sharding, instance kind, node count) combination, feasible or not."""

    sharding: Sharding
    instance_meta: InstanceMeta
    node_count: int
    instance: Instance | None = None
    memory_delta_by_node: dict[NodeId, int] = {}
    # Bytes of model files each node would fetch (hub or peer) before its runner starts.
    transfer_bytes_by_node: dict[NodeId, int] = {}
    error: str | None = None
    pending: bool = False


# --- layer split ------------------------------------------------------------------


def layer_split(n_layers: int, weights: Mapping[NodeId, int]) -> dict[NodeId, int]:
    """Split ``n_layers`` in proportion to ``weights``, at least one layer per node.

    Each node gets one layer, then the remaining ``n_layers - k`` go by
    largest remainder of ``remaining x weight / total`` (ties: larger weight,
    then smaller node id). All weights zero splits evenly. Exact integer
    arithmetic; the result sums to ``n_layers``.
    """
    nodes = sorted(weights)
    k = len(nodes)
    assert 1 <= k <= n_layers, (k, n_layers)
    assert all(weights[n] >= 0 for n in nodes), weights
    rest = n_layers - k
    total = sum(weights[n] for n in nodes)
    w = {n: (weights[n] if total > 0 else 1) for n in nodes}
    total = total if total > 0 else k
    # quota = rest x w / total as whole part and remainder (same denominator: compare numerators).
    whole = {n: rest * w[n] // total for n in nodes}
    remainder = {n: rest * w[n] % total for n in nodes}
    counts = {n: 1 + whole[n] for n in nodes}
    leftover = n_layers - sum(counts.values())
    assert 0 <= leftover < k, leftover
    order = sorted(nodes, key=lambda n: (-remainder[n], -w[n], n))
    for n in order[:leftover]:
        counts[n] += 1
    assert sum(counts.values()) == n_layers and min(counts.values()) >= 1, counts
    return counts


# --- the search ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Ask:
    """One placement question, whatever API asked it."""

    model_id: ModelId
    sharding: Sharding
    meta: InstanceMeta
    node_counts: tuple[int, ...]
    excluded: frozenset[NodeId]
    ignore: frozenset[InstanceId] = frozenset()
    avoid: frozenset[Connection] = frozenset()


@dataclass(frozen=True)
class _Fit:
    """A subset that fits in memory, with its shares and footprints."""

    nodes: tuple[NodeId, ...]
    shares: dict[NodeId, Fraction]
    footprints: dict[NodeId, Footprint]
    min_slack: int


@dataclass(frozen=True)
class _Choice:
    fit: _Fit
    order: tuple[NodeId, ...]
    hops: tuple[RingHop, ...]
    fetch: dict[NodeId, int]


@dataclass
class _Notes:
    """What the search learned when it found nothing: used to word the refusal."""

    static_reasons: list[str] = field(default_factory=list)
    ringless: list[tuple[tuple[NodeId, ...], str]] = field(default_factory=list)
    shortfalls: dict[int, str] = field(default_factory=dict)
    disk: list[str] = field(default_factory=list)


def _shares_for(card: ModelCard, sharding: Sharding, budgets: Mapping[NodeId, NodeBudget]) -> dict[NodeId, Fraction]:
    nodes = sorted(budgets)
    if sharding == "Tensor":
        return {n: Fraction(1, len(nodes)) for n in nodes}
    counts = layer_split(card.n_layers, {n: budgets[n].free_bytes for n in nodes})
    return {n: Fraction(counts[n], card.n_layers) for n in nodes}


def _try_subset(
    card: ModelCard, sharding: Sharding, budgets: Mapping[NodeId, NodeBudget], *, explain: bool = False
) -> tuple[_Fit | None, list[str]]:
    """Memory check of one subset: a fit, or (with ``explain``) the shortfall of each failing node."""
    shares = _shares_for(card, sharding, budgets)
    footprints: dict[NodeId, Footprint] = {}
    short: list[str] = []
    for n in sorted(shares):
        fp = footprints[n] = shard_footprint(card, shares[n])
        if fp.total_bytes > budgets[n].free_bytes:
            if not explain:
                return None, []  # the search only needs a yes or no
            short.append(describe_shortfall(n, fp, budgets[n].free_bytes, budget=budgets[n]))
    if short:
        return None, short
    slack = min(budgets[n].free_bytes - footprints[n].total_bytes for n in shares)
    return _Fit(nodes=tuple(sorted(shares)), shares=shares, footprints=footprints, min_slack=slack), []


def _static_reason(card: ModelCard, sharding: Sharding, k: int) -> str | None:
    if sharding == "Pipeline":
        if k > card.n_layers:
            return f"pipeline sharding over {k} nodes needs at least {k} layers; {card.model_id} has {card.n_layers}"
        return None
    if not card.supports_tensor:
        return f"{card.model_id} ({card.family}) does not support tensor sharding"
    if card.hidden_size % k or card.num_kv_heads % k:
        return (
            f"tensor sharding over {k} nodes needs the node count to divide hidden size "
            f"{card.hidden_size} and KV heads {card.num_kv_heads}"
        )
    return None


def _links(state: State, nodes: Sequence[NodeId], ask: _Ask) -> interconnect.LinkTable:
    # JACCL runs over RDMA on Thunderbolt only.
    only = ("thunderbolt",) if ask.meta == "MlxJaccl" else None
    return interconnect.link_table(state, nodes, avoid=ask.avoid, kinds=only)


def _link_graph(nodes: Sequence[NodeId], links: interconnect.LinkTable) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(nodes)
    graph.add_edges_from(sorted(links))
    return graph


def _subsets(
    graph: nx.DiGraph, nodes: Sequence[NodeId], k: int, free: Mapping[NodeId, int]
) -> Iterable[tuple[NodeId, ...]]:
    """Node subsets of size ``k`` that could carry a ring, in a fixed order, capped."""
    if k == 1:
        groups = [sorted(nodes)]
    else:
        # A ring leaves and re-enters every node: it lies inside one strongly connected component.
        groups = sorted(sorted(c) for c in nx.strongly_connected_components(graph) if len(c) >= k)
    produced = 0
    for group in groups:
        # Bigger nodes first, so the cap (if ever hit) keeps the likeliest fits.
        ranked = sorted(group, key=lambda n: (-free[n], n))
        for combo in itertools.combinations(ranked, k):
            if produced >= MAX_SUBSETS_PER_SIZE:
                return
            produced += 1
            yield tuple(sorted(combo))


def _needs(card: ModelCard, sharding: Sharding, fit: _Fit, order: Sequence[NodeId]) -> dict[NodeId, Need]:
    """What each rank's runner will read, in ring ``order`` (the very shards ``_build`` makes)."""
    world = len(order)
    out: dict[NodeId, Need] = {}
    start = 0
    for rank, node in enumerate(order):
        if sharding == "Pipeline":
            layers = int(fit.shares[node] * card.n_layers)
            out[node] = need_of(PipelineShardMetadata(model_id=card.model_id, device_rank=rank, world_size=world,
                                                      start_layer=start, end_layer=start + layers,
                                                      n_layers=card.n_layers))
            start += layers
        else:
            out[node] = need_of(TensorShardMetadata(model_id=card.model_id, device_rank=rank, world_size=world,
                                                    n_layers=card.n_layers))
    return out


def _fetch(state: State, card: ModelCard, needs: Mapping[NodeId, Need]) -> dict[NodeId, int]:
    """Bytes of model files each node must fetch for its need (0 where its copy covers it)."""
    out: dict[NodeId, int] = {}
    for node in sorted(needs):
        copy = state.model_copies.get(node, {}).get(card.model_id)
        out[node] = fetch_bytes(copy.usable if copy is not None else None, needs[node], card.weight_bytes)
    return out


def disk_room(state: State, node: NodeId, margin: int) -> int | None:
    """Free disk ``node`` can give to new model files (None: it has not reported its disk)."""
    disk = state.node_disk.get(node)
    if disk is None:
        return None
    pending = sum(
        max(0, c.total_bytes - c.done_bytes)
        for c in state.model_copies.get(node, {}).values()
        if c.status in ("requested", "downloading")
    )
    return disk.free_bytes - pending - margin


def _disk_shortfalls(state: State, card: ModelCard, fetch: Mapping[NodeId, int], margin: int) -> list[str]:
    out: list[str] = []
    for node in sorted(fetch):
        room = disk_room(state, node, margin)
        if room is not None and fetch[node] > room:
            free = state.node_disk[node].free_bytes
            out.append(f"node {node} needs {format_gb(fetch[node])} of disk for the files of {card.model_id}, "
                       f"has {format_gb(max(0, free))} free")
    return out


def _search(state: State, card: ModelCard, ask: _Ask, port: int, margin: int = 0) -> tuple[_Choice | None, _Notes]:
    notes = _Notes()
    nodes = sorted(n for n in state.topology.nodes if n not in ask.excluded and n in state.node_memory)
    budgets: dict[NodeId, NodeBudget] = {}
    for n in nodes:
        b = node_budget(state, n, ignore=ask.ignore)
        assert b is not None
        budgets[n] = b
    free = {n: budgets[n].free_bytes for n in nodes}
    by_free = sorted(nodes, key=lambda n: (-free[n], n))
    links = _links(state, nodes, ask)
    graph = _link_graph(nodes, links)
    for k in ask.node_counts:
        if k > len(nodes):
            break
        reason = _static_reason(card, ask.sharding, k)
        if reason is not None:
            notes.static_reasons.append(reason)
            continue
        # Candidates in the order of a lower bound on their key, so that the
        # search can stop as soon as no remaining candidate can win.
        candidates: list[tuple[tuple, _Fit]] = []
        for subset in _subsets(graph, nodes, k, free):
            fit, _ = _try_subset(card, ask.sharding, {n: budgets[n] for n in subset})
            if fit is None:
                continue
            bound = interconnect.ring_quality_bound(subset, links)
            if bound is not None:
                # Bytes to fetch are known only once the ring order fixes who holds which
                # layers: 0 is their lower bound here.
                candidates.append(((bound, 0, -fit.min_slack, subset), fit))
        candidates.sort(key=lambda c: c[0])
        best: tuple[tuple, _Fit, tuple[NodeId, ...], dict[NodeId, int]] | None = None
        for lower, fit in candidates:
            if best is not None and best[0] <= lower:
                break
            subset = lower[3]
            order = interconnect.best_ring_order(subset, links, full_mesh=ask.meta == "MlxJaccl")
            if order is None:
                continue
            fetch = _fetch(state, card, _needs(card, ask.sharding, fit, order))
            short = _disk_shortfalls(state, card, fetch, margin)
            if short:
                notes.disk.extend(short)
                continue
            key = (interconnect.ring_quality(order, links), sum(fetch.values()), -fit.min_slack, subset)
            if best is None or key < best[0]:
                best = (key, fit, order, fetch)
        if best is not None:
            _, fit, order, fetch = best
            hops = interconnect.ring_hops(state, order, port, avoid=ask.avoid)
            assert not isinstance(hops, interconnect.RingRefusal), hops
            return _Choice(fit=fit, order=order, hops=hops, fetch=fetch), notes
        if notes.disk:
            continue  # memory and links were fine; disk decides the wording
        # Nothing with a ring: is it memory, or links? The k nodes with the most
        # free memory are the best memory candidate; they decide the wording.
        top = tuple(sorted(by_free[:k]))
        top_fit, top_short = _try_subset(card, ask.sharding, {n: budgets[n] for n in top}, explain=True)
        if top_fit is not None:
            notes.ringless.append((top, "no ring of observed links"))
        else:
            notes.shortfalls[k] = "; ".join(top_short)
    return None, notes


# --- building the instance ------------------------------------------------------------


def _build(
    state: State,
    card: ModelCard,
    ask: _Ask,
    choice: _Choice,
    *,
    instance_id: InstanceId,
    generation: int,
    port: int,
) -> Instance:
    order = choice.order
    world = len(order)
    node_to_runner: dict[NodeId, RunnerId] = {}
    runner_to_shard: dict[RunnerId, ShardMetadata] = {}
    start = 0
    for rank, node in enumerate(order):
        runner = RunnerId(derive_id("runner", instance_id, node))
        node_to_runner[node] = runner
        if ask.sharding == "Pipeline":
            layers = int(choice.fit.shares[node] * card.n_layers)
            assert choice.fit.shares[node] * card.n_layers == layers
            runner_to_shard[runner] = PipelineShardMetadata(
                model_id=card.model_id,
                device_rank=rank,
                world_size=world,
                start_layer=start,
                end_layer=start + layers,
                n_layers=card.n_layers,
            )
            start += layers
        else:
            runner_to_shard[runner] = TensorShardMetadata(
                model_id=card.model_id, device_rank=rank, world_size=world, n_layers=card.n_layers
            )
    assert ask.sharding == "Tensor" or start == card.n_layers, (start, card.n_layers)
    totals = {n: state.node_memory[n].ram_total.in_bytes for n in order}
    ceiling = context_ceiling(card, choice.fit.shares, totals)
    # A shard that fits has room for the reference context (same exact arithmetic).
    assert ceiling >= min(card.context_length, REFERENCE_CONTEXT_TOKENS), ceiling
    cls = MlxJacclInstance if ask.meta == "MlxJaccl" else MlxRingInstance
    return cls(
        instance_id=instance_id,
        shard_assignments=ShardAssignments(
            model_id=card.model_id, runner_to_shard=runner_to_shard, node_to_runner=node_to_runner
        ),
        ring=choice.hops,
        ephemeral_port=port,
        context_ceiling=ceiling,
        memory_by_node={n: choice.fit.footprints[n].total_bytes for n in order},
        kv_bytes_by_node={n: choice.fit.footprints[n].kv_bytes for n in order},
        speculation=speculation_for(card, world),
        generation=generation,
    )


DRAFT_MODEL_DEFAULT_DEPTH = 3  # draft tokens per round for a card's draft model


def speculation_for(card: ModelCard, world_size: int) -> SpeculationConfig:
    """The speculative decoding an instance of ``card`` over ``world_size`` ranks runs.

    MTP heads in the checkpoint (``mtp_max_depth > 0``, the depth measured by
    ``python -m skulk.bench tune``) win over a separate draft model; a card
    that opts out of multi-node speculation gets none on several ranks. The
    runner may still decline (it reports why), and then no rank speculates.
    """
    assert world_size >= 1
    if world_size > 1 and not card.speculative_multi_node:
        return SpeculationConfig()
    if card.mtp_max_depth > 0:
        return SpeculationConfig(drafter="mtp", depth=card.mtp_max_depth)
    if card.draft_model:
        return SpeculationConfig(
            drafter="draft_model", depth=DRAFT_MODEL_DEFAULT_DEPTH, draft_model_id=ModelId(card.draft_model)
        )
    return SpeculationConfig()


def ring_port(port_offset: int, config: CoreConfig) -> int:
    """The first port of the block the ``port_offset``-th placement takes.

    Rank r listens on ``ring_port + r``, so each placement takes a block of
    ``max_ring_ranks`` ports and ranks that share one address (a loopback
    cluster) never collide; blocks cycle through ``port_span``.
    """
    assert config.port_span > 0 and 0 < config.base_port < 65_536, config
    blocks = config.port_span // config.max_ring_ranks
    assert blocks > 0, config
    port = config.base_port + (port_offset % blocks) * config.max_ring_ranks
    assert port + config.max_ring_ranks <= 65_536, f"base_port + port_span exceeds the port range: {port}"
    return port


def _port(state: State, config: CoreConfig) -> int:
    return ring_port(state.next_port_offset, config)


# --- refusals ----------------------------------------------------------------------------


def _refuse(state: State, card: ModelCard, ask: _Ask, notes: _Notes) -> PlacementRefused:
    what = f"{card.model_id} ({ask.sharding}, {ask.meta})"
    known = sorted(n for n in state.topology.nodes if n not in ask.excluded)
    with_mem = [n for n in known if n in state.node_memory]
    waiting = [n for n in known if n not in state.node_memory]
    lo = ask.node_counts[0]
    if not state.topology.nodes:
        return PlacementRefused(
            message=f"cannot place {what} yet: no node has reported to the master", code="no_nodes", pending=True
        )
    if not known:
        return PlacementRefused(
            message=f"cannot place {what}: every node is excluded", code="invalid_request", pending=False
        )
    if notes.disk and not notes.ringless and not notes.shortfalls:
        return PlacementRefused(
            message=f"cannot place {what}: not enough disk for its files: {'; '.join(dict.fromkeys(notes.disk))}",
            code="insufficient_disk",
            pending=False,
        )
    if notes.ringless:
        subset, _ = notes.ringless[0]
        kind = " thunderbolt" if ask.meta == "MlxJaccl" else ""
        return PlacementRefused(
            message=(
                f"cannot place {what} yet: it fits in memory on nodes {', '.join(subset)} but no ring of observed"
                f"{kind} links connects them (links are probed every few seconds)"
            ),
            code="no_ring",
            pending=True,
        )
    if waiting and len(known) >= lo:
        detail = f"; with the nodes reported so far: {_best_shortfall(notes)}" if notes.shortfalls else ""
        return PlacementRefused(
            message=f"cannot place {what} yet: waiting for memory telemetry from node(s) {', '.join(waiting)}{detail}",
            code="pending_telemetry",
            pending=True,
        )
    if len(with_mem) < lo:
        return PlacementRefused(
            message=f"cannot place {what}: min_nodes is {lo} but only {len(with_mem)} node(s) are available",
            code="invalid_request",
            pending=False,
        )
    if notes.shortfalls:
        k = max(notes.shortfalls)
        need = shard_footprint(card, 1).total_bytes
        offered = sum(node_budget(state, n, ignore=ask.ignore).free_bytes for n in with_mem)  # type: ignore[union-attr]
        other = "".join(f"; {r}" for r in dict.fromkeys(notes.static_reasons))
        return PlacementRefused(
            message=(
                f"cannot place {what}: it does not fit in memory on {_counts_text(ask, len(with_mem))} node(s); "
                f"the whole model needs ~{format_gb(need)} and the {len(with_mem)} available node(s) can use "
                f"{format_gb(offered)} in total. Best split over {k} node(s): {notes.shortfalls[k]}{other}"
            ),
            code="insufficient_memory",
            pending=False,
        )
    reasons = "; ".join(dict.fromkeys(notes.static_reasons)) or "no combination of nodes qualifies"
    code = "tensor_unsupported" if ask.sharding == "Tensor" else "invalid_request"
    return PlacementRefused(message=f"cannot place {what}: {reasons}", code=code, pending=False)


def _counts_text(ask: _Ask, available: int) -> str:
    hi = min(ask.node_counts[-1], available)
    lo = ask.node_counts[0]
    return str(lo) if lo >= hi else f"{lo} to {hi}"


def _best_shortfall(notes: _Notes) -> str:
    k = max(notes.shortfalls)
    return f"best split over {k} node(s): {notes.shortfalls[k]}"


# --- public API --------------------------------------------------------------------------


def _run(
    state: State,
    card: ModelCard,
    ask: _Ask,
    config: CoreConfig,
    *,
    instance_id: InstanceId,
    generation: int,
) -> Placed | PlacementRefused:
    port = _port(state, config)
    choice, notes = _search(state, card, ask, port, config.disk_margin_bytes)
    if choice is None:
        return _refuse(state, card, ask, notes)
    inst = _build(state, card, ask, choice, instance_id=instance_id, generation=generation, port=port)
    return Placed(instance=inst, transfer_bytes_by_node={n: b for n, b in sorted(choice.fetch.items()) if b > 0})


def place(
    state: State, command: PlaceInstance, cards: Mapping[ModelId, ModelCard], config: CoreConfig
) -> Placed | PlacementRefused:
    """Place ``command``'s model on the current cluster, or say why not.

    The instance id is ``derive_id("inst", command_id, 0)``; runner ids derive
    from the instance id and node id; the port is ``base_port +
    next_port_offset % port_span``. Invariants: every hosting node's footprint
    is at most its free memory (so at most its usable memory); pipeline shards
    cover every layer exactly once in rank order; the result depends only on
    the arguments' values.
    """
    card = cards.get(command.model_id)
    if card is None:
        return PlacementRefused(
            message=f"model {command.model_id!r} not found: no model card for it", code="model_not_found", pending=False
        )
    if command.min_nodes < 1:
        return PlacementRefused(
            message=f"min_nodes must be at least 1, got {command.min_nodes}", code="invalid_request", pending=False
        )
    total = max(len(state.topology.nodes), command.min_nodes)
    ask = _Ask(
        model_id=command.model_id,
        sharding=command.sharding,
        meta=command.instance_meta,
        node_counts=tuple(range(command.min_nodes, total + 1)),
        excluded=frozenset(command.excluded_nodes),
    )
    iid = InstanceId(derive_id("inst", command.command_id, 0))
    return _run(state, card, ask, config, instance_id=iid, generation=0)


def replace(
    state: State,
    instance: Instance,
    cards: Mapping[ModelId, ModelCard],
    config: CoreConfig,
    *,
    reason: str,
    avoid_nodes: Iterable[NodeId] = (),
    avoid_connections: Iterable[Connection] = (),
) -> Placed | PlacementRefused:
    """Re-place ``instance`` (same model, sharding and kind) after its group connect failed.

    The new instance has ``generation + 1``, id ``derive_id("inst", old id,
    generation + 1)``, a fresh port (the state's next port offset) and at
    least as many nodes as before, less those in ``avoid_nodes``. The old
    instance's memory is not counted (it is being given back); links in
    ``avoid_connections`` are not used. ``reason`` is carried into refusals.
    """
    model_id = instance.shard_assignments.model_id
    card = cards.get(model_id)
    if card is None:
        return PlacementRefused(
            message=f"cannot re-place {instance.instance_id} ({reason}): no model card for {model_id!r}",
            code="model_not_found",
            pending=False,
        )
    shards = instance.shard_assignments.runner_to_shard
    sharding: Sharding = "Tensor" if any(isinstance(s, TensorShardMetadata) for s in shards.values()) else "Pipeline"
    meta: InstanceMeta = "MlxJaccl" if isinstance(instance, MlxJacclInstance) else "MlxRing"
    avoided = frozenset(avoid_nodes)
    hosting = set(instance.shard_assignments.node_to_runner)
    lo = max(1, len(hosting) - len(hosting & avoided))
    total = max(len(state.topology.nodes), lo)
    ask = _Ask(
        model_id=model_id,
        sharding=sharding,
        meta=meta,
        node_counts=tuple(range(lo, total + 1)),
        excluded=avoided,
        ignore=frozenset({instance.instance_id}),
        avoid=frozenset(avoid_connections),
    )
    generation = instance.generation + 1
    iid = InstanceId(derive_id("inst", instance.instance_id, generation))
    out = _run(state, card, ask, config, instance_id=iid, generation=generation)
    if isinstance(out, PlacementRefused):
        message = f"re-placing {instance.instance_id} ({reason}): {out.message}"
        return PlacementRefused(message=message, code=out.code, pending=out.pending)
    return out


def previews(
    state: State,
    model_id: ModelId,
    excluded_nodes: Iterable[NodeId],
    cards: Mapping[ModelId, ModelCard],
    config: CoreConfig,
) -> list[Preview]:
    """Every (sharding, instance kind, node count) combination for ``model_id``.

    Feasible combinations carry their instance and per-node memory; refused
    ones their reason (``pending`` when information is missing). Node counts
    run from 1 to the number of nodes not excluded (at least 1). Order:
    sharding, then kind, then node count. An unknown model gives one refused
    preview per (sharding, kind) with the not-found message.
    """
    excluded = frozenset(excluded_nodes)
    card = cards.get(model_id)
    count = max(1, len([n for n in state.topology.nodes if n not in excluded]))
    out: list[Preview] = []
    for sharding in SHARDINGS:
        for meta in INSTANCE_METAS:
            if card is None:
                missing = f"model {model_id!r} not found: no model card for it"
                out.append(Preview(sharding=sharding, instance_meta=meta, node_count=0, error=missing))
                continue
            for k in range(1, count + 1):
                ask = _Ask(model_id=model_id, sharding=sharding, meta=meta, node_counts=(k,), excluded=excluded)
                iid = InstanceId(derive_id("inst", "preview", model_id, sharding, meta, k))
                res = _run(state, card, ask, config, instance_id=iid, generation=0)
                if isinstance(res, Placed):
                    out.append(
                        Preview(
                            sharding=sharding,
                            instance_meta=meta,
                            node_count=k,
                            instance=res.instance,
                            memory_delta_by_node=dict(res.instance.memory_by_node),
                            transfer_bytes_by_node=dict(res.transfer_bytes_by_node),
                        )
                    )
                else:
                    out.append(
                        Preview(sharding=sharding, instance_meta=meta, node_count=k, error=res.message, pending=res.pending)
                    )
    return out


def fits(state: State, instance: Instance) -> str | None:
    """None when ``instance`` (re-reported after a failover) still fits every hosting node.

    The re-reporting worker's runner is already running, so its memory may
    already show in telemetry: the check is the no-double-booking bound, the
    instance's footprint plus everything else placed on the node within 0.75 x
    the node's total RAM. A hosting node that has not reported memory to this
    master yet passes: nothing can have been placed on it since (placement
    needs its telemetry), and the runner there demonstrably runs, so refusing
    would only lose a placement that survived the failover (invariant 5).
    """
    problems: list[str] = []
    for node in sorted(instance.shard_assignments.node_to_runner):
        budget = node_budget(state, node, ignore={instance.instance_id})
        if budget is None:
            continue
        need = instance.memory_by_node.get(node, 0)
        room = budget.capacity_bytes - budget.committed_bytes
        if need > room:
            problems.append(
                f"node {node} would hold ~{format_gb(need)} for {instance.instance_id} but only "
                f"{format_gb(max(0, room))} of its {format_gb(budget.capacity_bytes)} are not placed already"
            )
    return "; ".join(problems) if problems else None
