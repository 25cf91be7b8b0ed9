"""interconnect_selection: the ring takes the best link, re-forms when it goes, and uses the VPN last.

Every pair of nodes is joined by a Thunderbolt cable, by Ethernet (Wi-Fi for
a node on Wi-Fi) and by a VPN (Tailscale, 100.64.0.0/10). Runner rings
follow the links (``ring_data_plane``): a ring only forms over links that
are up, and a formed ring breaks when a hop's link goes.

1. The model is placed over every node (``min_nodes`` = the node count), so
   there is a ring; every hop must be Thunderbolt.
2. A Thunderbolt cable between two ring neighbours is pulled. The ring
   breaks, the restarted ranks cannot reach the old address, group connect
   fails at its deadline and the master re-places the instance (generation
   + 1). The new ring must use the best link still up for every hop: for
   two or three nodes (where every pair is adjacent) the pulled pair's hops
   go over Ethernet (or Wi-Fi), never the VPN.
3. Every direct link between two ring neighbours goes down, so only the VPN
   joins them. The instance is re-placed again; a hop between that pair may
   now use the VPN (for two or three nodes it must), and no other hop may.

In half the seeds each node's VPN interface is called ``eth1`` and labelled
"ethernet" (as a name-based classifier would), and one node is on Wi-Fi so
the pulled pair's next best link is Wi-Fi: the VPN address must still rank
last (recognised by its address), so the ring takes Wi-Fi over an
"ethernet"-labelled VPN and, where the VPN is the only path, the hop's kind
is "vpn".

After each phase every hop is compared with the ground truth of the
simulated network: its kind is the best link up between its two nodes, its
address that link's address at the listening node with the instance's port
+ rank, and the ring's quality (hop kinds, worst first) is the best any
ring order over those nodes could have.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator
from typing import Any

import msgspec

from skulk.core.instances import Instance
from skulk.core.interconnect import KIND_RANK, classify_interface, is_vpn_address

from chaos.scenarios import Stage, scenario
from chaos.scenarios._support import (
    Ledger,
    expect,
    place_on,
    served_after,
    wait_links_observed,
    wait_serving,
)
from sim.options import SimOptions

MODEL = "sim/qwen-7b"


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    n = rng.choice((2, 3, 3, 4))
    mislabel = rng.random() < 0.5
    # One node on Wi-Fi (round(1/n x n) = 1) in every mislabelled seed, in some others.
    wifi = 1.0 / n if (mislabel or rng.random() < 0.3) else 0.0
    return opts.with_(
        node_count=n,
        ram_total_gib=(64,) * n,
        model_id=MODEL,
        thunderbolt_pair_fraction=1.0,
        wifi_node_fraction=wifi,
        vpn_pairs=True,
        vpn_interface_name="eth1" if mislabel else "utun3",
        vpn_interface_kind="ethernet" if mislabel else "vpn",
        ring_data_plane=True,
        fault_kinds=(),
        client_count=min(opts.client_count, 3),
        # A ring that breaks fails its running tasks: created, running, failed, deleted.
        abandoned_events_max=4,
        core=msgspec.structs.replace(opts.core, group_connect_deadline_s=rng.choice((20.0, 60.0, 120.0))),
    )


def _best_kinds(stage: Stage) -> dict[tuple[str, str], str]:
    """Ground truth: the best link up from a to b, by true kind (VPN last), for every ordered pair."""
    net = stage.world.network
    out: dict[tuple[str, str], str] = {}
    for a in stage.world.host_ids:
        for b in stage.world.host_ids:
            if a != b:
                up = [link.kind for link in net.links_between(a, b) if link.up]
                if up:
                    out[(a, b)] = min(up, key=lambda k: KIND_RANK[k])
    return out


def _link_address(stage: Stage, a: str, b: str, kind: str) -> str:
    """The address at ``b`` of the link of ``kind`` up between ``a`` and ``b``."""
    for link in stage.world.network.links_between(a, b):  # type: ignore[arg-type]
        if link.up and link.kind == kind:
            return link.address_of(b)  # type: ignore[arg-type]
    raise AssertionError(f"no {kind} link up between {a} and {b}")


def _quality(kinds: list[str]) -> tuple[int, ...]:
    return tuple(sorted((KIND_RANK[k] for k in kinds), reverse=True))


def _check_ring(stage: Stage, inst: Instance, phase: str) -> None:
    """Every hop takes the best link up; the ring order is the best possible (see the docstring)."""
    best = _best_kinds(stage)
    ring = inst.ring
    nodes = [h.node_id for h in ring]
    expect(len(ring) == stage.opts.node_count, f"{phase}: a ring over all {stage.opts.node_count} nodes, got {nodes}")
    for h in ring:
        pred = ring[h.rank - 1].node_id
        want = best[(pred, h.node_id)]
        expect(h.kind == want, f"{phase}: hop into rank {h.rank} ({pred} -> {h.node_id}) over {want}, got {h.kind} "
                               f"at {h.address}")
        ip, port = h.address.rsplit(":", 1)
        expect(ip == _link_address(stage, pred, h.node_id, want) and int(port) == inst.ephemeral_port + h.rank,
               f"{phase}: rank {h.rank} listens on its {want} address at port {inst.ephemeral_port + h.rank}, "
               f"got {h.address}")
        expect((h.kind == "vpn") == is_vpn_address(ip), f"{phase}: hop kind 'vpn' exactly for a VPN address, got "
                                                         f"{h.kind} at {h.address}")
        if h.kind == "vpn":
            direct = [link for link in stage.world.network.links_between(pred, h.node_id)  # type: ignore[arg-type]
                      if link.up and link.kind != "vpn"]
            expect(not direct, f"{phase}: the VPN only as the only path, but {pred} -> {h.node_id} has {direct}")
    first, *rest = sorted(nodes)
    optimum = min(
        _quality([best[(order[i - 1], order[i])] for i in range(len(order))])
        for order in ((first, *p) for p in itertools.permutations(rest))
        if all((order[i - 1], order[i]) in best for i in range(len(order)))
    )
    got = _quality([h.kind for h in ring])
    expect(got == optimum, f"{phase}: the best ring (hop ranks worst first) {optimum}, got {got}")


def _adjacent(inst: Instance, a: str, b: str) -> bool:
    ring = inst.ring
    return any({ring[i - 1].node_id, ring[i].node_id} == {a, b} for i in range(len(ring)))


def _pick_pair(stage: Stage, inst: Instance, prefer_wifi: bool) -> tuple[str, str]:
    """Two ring neighbours (sorted), preferring a pair whose LAN is Wi-Fi when asked."""
    ring = inst.ring
    pairs = sorted({tuple(sorted((ring[i - 1].node_id, ring[i].node_id))) for i in range(len(ring))})
    if prefer_wifi:
        wifi = [p for p in pairs if any(link.kind == "wifi" for link in stage.world.network.links_between(*p))]
        if wifi:
            pairs = wifi
    a, b = stage.rng.choice(pairs)
    return a, b


def _replaced(stage: Stage, ledger: Ledger, old: Instance, phase: str) -> Generator[Any, Any, Instance]:
    """Wait for the one re-placement of ``old`` and check how it came about."""
    opts = stage.opts
    deadline = opts.core.group_connect_deadline_s
    new = yield from wait_serving(
        stage, MODEL, min_generation=old.generation + 1,
        timeout_s=deadline + opts.ready_deadline_s + 2 * opts.probe_interval_s, what=f"after {phase}",
    )
    expect(new.generation == old.generation + 1, f"{phase}: exactly one re-placement (generation "
                                                 f"{old.generation + 1}), got generation {new.generation}")
    expect(new.ephemeral_port != old.ephemeral_port, f"{phase}: a fresh port, got {new.ephemeral_port} again")
    timeouts = [f for (_, _, iid, f) in ledger.failures if iid == old.instance_id and f.code == "group_connect_timeout"]
    expect(bool(timeouts), f"{phase}: the re-placement to follow a group-connect timeout of {old.instance_id}")
    return new


@scenario(
    "interconnect_selection",
    "rings take thunderbolt, re-form over ethernet when it is pulled, and use the VPN (by address) only as the last path",
    adjust=_adjust,
)
def interconnect_selection(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    opts = stage.opts
    n = opts.node_count
    mislabel = opts.vpn_interface_kind != "vpn"
    ledger = Ledger(stage)
    # A VPN address is VPN whatever the interface is called (the node-side classifier).
    for host in world.hosts.values():
        for iface in host.interfaces:
            if is_vpn_address(iface.ip_address):
                expect(classify_interface(iface.name, iface.ip_address) == "vpn",
                       f"{iface.name} at {iface.ip_address} classified as vpn")
    yield from wait_links_observed(stage)
    yield from place_on(stage, MODEL, min_nodes=n)
    inst = yield from wait_serving(stage, MODEL, timeout_s=opts.ready_deadline_s)
    _check_ring(stage, inst, "boot")
    expect(all(h.kind == "thunderbolt" for h in inst.ring), f"an all-thunderbolt ring, got {[h.kind for h in inst.ring]}")
    if mislabel:
        # The mislabel is real: the master's topology carries VPN addresses as "ethernet" links.
        state = world.hosts[world.masters()[0]].node.replica.current  # type: ignore[union-attr]
        labels = {c.kind for c in state.topology.connections if is_vpn_address(c.address)}
        expect(labels == {"ethernet"}, f"VPN connections labelled 'ethernet', got {sorted(labels)}")
    stage.start_clients(world.env.now + 10_000.0)
    yield stage.sleep(stage.rng.uniform(2.0, 6.0))

    # Phase 2: pull a Thunderbolt cable between ring neighbours.
    a, b = _pick_pair(stage, inst, prefer_wifi=mislabel)
    pulled = world.faults.interconnect_loss(a, b)  # type: ignore[arg-type]
    expect(pulled is not None and "thunderbolt" in pulled.target, f"a thunderbolt cable between {a} and {b}")
    cut_at = world.env.now
    inst2 = yield from _replaced(stage, ledger, inst, "the thunderbolt cut")
    _check_ring(stage, inst2, "after the thunderbolt cut")
    lan = {h.kind for h in inst2.ring if {inst2.ring[h.rank - 1].node_id, h.node_id} == {a, b}}
    if n <= 3:
        want = "wifi" if any(link.kind == "wifi" for link in world.network.links_between(a, b)) else "ethernet"  # type: ignore[arg-type]
        expect(lan == {want}, f"the {a}-{b} hops over {want} after the cut, got {sorted(lan)}")
    expect("vpn" not in {h.kind for h in inst2.ring}, f"no VPN hop while direct links remain: {inst2.ring}")
    stage.metrics["reform_after_cut_s"] = round(world.env.now - cut_at, 3)
    stage.metrics["lan_after_cut"] = ",".join(sorted(lan)) or "(pair not adjacent)"

    # Phase 3: only the VPN is left between two ring neighbours.
    c, d = _pick_pair(stage, inst2, prefer_wifi=False)
    only = world.faults.vpn_only(c, d)  # type: ignore[arg-type]
    expect(only is not None, f"direct links between {c} and {d} to pull")
    cut_at = world.env.now
    inst3 = yield from _replaced(stage, ledger, inst2, "the VPN-only cut")
    _check_ring(stage, inst3, "with only the VPN between " + f"{c} and {d}")
    vpn_hops = [h for h in inst3.ring if h.kind == "vpn"]
    for h in vpn_hops:
        expect({inst3.ring[h.rank - 1].node_id, h.node_id} == {c, d}, f"VPN hops only between {c} and {d}: {h}")
    if n <= 3:
        expect(len(vpn_hops) == (2 if n == 2 else 1), f"the {c}-{d} hop(s) over the VPN, got {inst3.ring}")
    elif not _adjacent(inst3, c, d):
        expect(not vpn_hops, f"a ring that avoids the VPN-only pair uses no VPN: {inst3.ring}")
    stage.metrics["reform_after_vpn_only_s"] = round(world.env.now - cut_at, 3)
    stage.metrics["vpn_hops"] = len(vpn_hops)
    stage.metrics["vpn_label"] = opts.vpn_interface_kind

    # The re-formed ring serves.
    since = world.env.now
    requests = [r for r in world.clients.requests.values() if r.kind == "SubmitTask"]
    ok = yield from stage.wait_until(
        lambda: served_after([r for r in world.clients.requests.values() if r.kind == "SubmitTask"], since) > 0,
        timeout_s=60.0,
    )
    expect(ok, f"a request served on the re-formed ring within 60 s (of {len(requests)} so far)")
    yield stage.sleep(stage.rng.uniform(2.0, 8.0))
    stage.metrics["instances"] = len(ledger.of_model(MODEL))
