"""Simulated model files: each host's disk, and transfers as timed flows over links.

Theory of operation
-------------------
A host's ``SimDisk`` holds, per model, the *verified* coverage (layer runs and
the head, ``skulk.core.files.Coverage``) and the bytes of a transfer that
arrived but are not verified yet (*partial*: they survive a crash, like the
runtime's ``.skulk/partial/`` files, and a later transfer of the same model
resumes from them). Which hosts hold which models at start follows
``models_on_disk`` (everywhere, only the store node, nobody).

A ``StartTransfer`` becomes a ``Flow``: every ``transfer_tick_s`` it moves
bytes at the rate of its path, if the path works at that moment:

- from a peer: the peer's process runs (not crashed, not paused), the link
  the core chose (its ``address``) is up, and neither direction between the
  two hosts is cut or clogged; the rate is that link kind's
  (``link_rate_mbps_*``);
- from the hub: ``hub_available``; the rate is ``hub_rate_mbps``;
- the receiving host's process runs and is not paused (a crashed host's flow
  simply ends: its partial bytes stay on disk).

A tick without bytes is a stall; the core's keeper notices (its stall timer)
and re-sources. A receiving disk that is full (the ``disk_full`` fault) ends
the flow with ``disk_full``; partial bytes are never counted as verified.
Progress goes to the node as ``TransferProgressed`` every
``transfer_report_s``; the end as ``FilesObserved`` (success) then
``TransferEnded``, exactly as the runtime reports them.

Bytes: a need's size is ``skulk.core.files.fetch_bytes`` of the model's card
(the core's own estimate), so the simulated flows move what placement expects.

Invariants kept: coverage only grows by a flow that completed, or shrinks by
``DeleteFiles``; a flow moves bytes only over a path that works at that tick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from skulk.core.effects import StartTransfer
from skulk.core.files import Coverage, DiskInfo, Need, covers, fetch_bytes, whole
from skulk.core.ids import ModelId, NodeId
from skulk.core.inputs import FilesGone, FilesObserved, TransferEnded, TransferProgressed

if TYPE_CHECKING:
    from sim.host import SimHost
    from sim.world import World

__all__ = ["SimDisk", "Flow", "start_flow", "whole_coverage"]

_MB = 1_000_000
GIB = 1024**3


def whole_coverage(n_layers: int) -> Coverage:
    w = whole(n_layers)
    return Coverage(n_layers=n_layers, layers=((w.start, w.end),), head=True)


def need_coverage(need: Need) -> Coverage:
    return Coverage(n_layers=need.n_layers, layers=((need.start, need.end),), head=need.head)


@dataclass
class SimDisk:
    """One host's model files (they outlive the node process)."""

    verified: dict[ModelId, Coverage] = field(default_factory=dict)
    partial: dict[ModelId, int] = field(default_factory=dict)  # bytes arrived, not yet verified
    source: dict[ModelId, str] = field(default_factory=dict)  # where the verified files last came from

    def covers(self, model: ModelId, need: Need) -> bool:
        return covers(self.verified.get(model), need)

    def verified_bytes(self, model: ModelId, weight_bytes: int) -> int:
        cov = self.verified.get(model)
        if cov is None or cov.n_layers == 0:
            return 0
        held = cov.layer_count() + (1 if cov.head else 0)
        return weight_bytes * held // (cov.n_layers + 1)

    def used_bytes(self, weights: dict[ModelId, int]) -> int:
        return sum(self.verified_bytes(m, weights.get(m, 0)) for m in self.verified) + sum(self.partial.values())


@dataclass
class Flow:
    """One transfer in flight on ``host``."""

    effect: StartTransfer
    total: int
    done: int
    last_report: float
    incarnation: int
    cancelled: bool = False
    stalled_ticks: int = 0


def observed(host: SimHost, model: ModelId) -> FilesObserved:
    world = host.world
    cov = host.disk.verified[model]
    card = world.cards[model]
    return FilesObserved(model_id=model, status="verified", coverage=cov, source=host.disk.source.get(model, "local"),
                         bytes=host.disk.verified_bytes(model, card.weight_bytes))


def disk_info(host: SimHost) -> DiskInfo:
    world = host.world
    total = int(world.opts.disk_total_gib * GIB)
    used = host.disk.used_bytes({ModelId(m): c.weight_bytes for m, c in world.cards.items()})
    return DiskInfo(total_bytes=total, free_bytes=max(0, total - used), models_bytes=used)


def initial_disk(world: World, host_id: NodeId) -> SimDisk:
    mode = world.opts.models_on_disk
    disk = SimDisk()
    if mode == "everywhere" or (mode == "store" and host_id == world.opts.core.store_node):
        for model in sorted(world.cards):
            if model not in world.opts.hub_only_models:
                disk.verified[ModelId(model)] = whole_coverage(world.cards[model].n_layers)
    return disk


def _rate_mbps(world: World, host: SimHost, effect: StartTransfer) -> float:
    """Bytes per second the flow's path carries now (0: the path is broken)."""
    opts = world.opts
    if effect.source is None:
        return opts.hub_rate_mbps * _MB if opts.hub_available else 0.0
    src = world.hosts.get(effect.source)
    if src is None or src.node is None or src.paused:
        return 0.0
    net = world.network
    if (host.id, src.id) in net.cut or (src.id, host.id) in net.cut:
        return 0.0
    if (host.id, src.id) in net.clogged or (src.id, host.id) in net.clogged:
        return 0.0
    for link in net.links_between(host.id, src.id):
        if link.up and link.address_of(src.id) == effect.address:
            return getattr(opts, f"link_rate_mbps_{link.kind}") * _MB
    return 0.0


def start_flow(host: SimHost, effect: StartTransfer) -> None:
    world = host.world
    card = world.cards[effect.model_id]
    need = effect.need if effect.need is not None else whole(card.n_layers)
    total = max(1, fetch_bytes(host.disk.verified.get(effect.model_id), need, card.weight_bytes))
    done = min(host.disk.partial.get(effect.model_id, 0), total)  # resume what an earlier flow left
    flow = Flow(effect, total, done, world.env.now, host.incarnation)
    host.flows[effect.transfer_id] = flow
    world.call_later(world.opts.transfer_tick_s, _tick, host, flow)


def cancel_flow(host: SimHost, transfer_id: str) -> None:
    flow = host.flows.pop(transfer_id, None)
    if flow is None:
        return
    flow.cancelled = True
    e = flow.effect
    host.world.call_later(0.0, host.feed_if, flow.incarnation,
                          TransferEnded(transfer_id=e.transfer_id, model_id=e.model_id, ok=False, code="cancelled",
                                        message="cancelled"))


def delete_files(host: SimHost, model: ModelId) -> None:
    host.disk.verified.pop(model, None)
    host.disk.partial.pop(model, None)
    host.disk.source.pop(model, None)
    host.world.call_later(0.0, host.feed_if, host.incarnation, FilesGone(model_id=model))


def _tick(host: SimHost, flow: Flow) -> None:
    world = host.world
    e = flow.effect
    if flow.cancelled or host.incarnation != flow.incarnation or host.flows.get(e.transfer_id) is not flow:
        return  # cancelled, or the node died (its partial bytes stay on disk)
    if host.paused:
        world.call_later(world.opts.transfer_tick_s, _tick, host, flow)
        return
    if host.disk_full:
        del host.flows[e.transfer_id]
        host.feed(TransferEnded(transfer_id=e.transfer_id, model_id=e.model_id, ok=False, code="disk_full",
                                message="[Errno 28] No space left on device"))
        return
    rate = _rate_mbps(world, host, e)
    step = int(rate * world.opts.transfer_tick_s)
    if step > 0:
        flow.done = min(flow.total, flow.done + step)
        host.disk.partial[e.model_id] = flow.done
    if flow.done >= flow.total:
        del host.flows[e.transfer_id]
        card = world.cards[e.model_id]
        got = need_coverage(e.need) if e.need is not None else whole_coverage(card.n_layers)
        old = host.disk.verified.get(e.model_id)
        host.disk.verified[e.model_id] = got if old is None else old.union(got)
        host.disk.partial.pop(e.model_id, None)
        host.disk.source[e.model_id] = "hub" if e.source is None else f"peer:{e.source}"
        host.feed(observed(host, e.model_id))
        host.feed(TransferEnded(transfer_id=e.transfer_id, model_id=e.model_id, ok=True))
        return
    if world.env.now - flow.last_report >= world.opts.transfer_report_s and step > 0:
        flow.last_report = world.env.now
        eta = int((flow.total - flow.done) / rate) if rate > 0 else None
        host.feed(TransferProgressed(transfer_id=e.transfer_id, model_id=e.model_id, done_bytes=flow.done,
                                     total_bytes=flow.total, rate_bps=int(rate), eta_s=eta))
    world.call_later(world.opts.transfer_tick_s, _tick, host, flow)
