"""ring_deadline: a rank that cannot be reached fails group connect at its deadline, then re-placement.

The model is placed over two or more nodes with runner rings following the
links (``ring_data_plane``). At the very step the master indexes the new
instance (before any runner starts) one rank's ring address is made
unreachable, in one of two ways per seed:

- ``port``: connections to that rank's ``ip:port`` fail (a stale listener
  or a firewall on the ring port) while the node's API and probes still
  answer, so the link stays observed;
- ``link``: the link carrying that address goes down (probes notice),
  when the two nodes have another link to fall back on.

Group connect cannot complete. Expected, beyond the invariants:

- the ranks give up at the group-connect deadline (never earlier, and no
  later than the deadline plus a small slack), and the failure the master
  indexes carries code ``group_connect_timeout`` and a diagnosis naming the
  unreachable rank and its address;
- the master removes the instance and re-places it exactly once: a new
  instance id derived from the old one, generation 1, a fresh port block,
  at least as many nodes, and no hop at the unreachable address;
- the re-placed instance serves requests.

The deadline varies per seed (10 to 120 s; 120 s is Skulk's default).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import msgspec

from skulk.core.effects import AppendLog
from skulk.core.events import InstanceCreated
from skulk.core.ids import InstanceId, derive_id
from skulk.core.instances import GROUP_CONNECT_TIMEOUT, RunnerConnecting

from chaos.scenarios import Stage, scenario
from chaos.scenarios._support import (
    Ledger,
    expect,
    place_on,
    served_after,
    wait_links_observed,
    wait_serving,
)
from sim.network import Link
from sim.options import SimOptions

MODEL = "sim/qwen-7b"
# A runner's report of its own deadline reaches its node within this (spawn
# time and the host's clock drift over the deadline included).
_SLACK_S = 0.5
# Placement to re-placement: the deadline plus delivery both ways (retries on loss included).
_NETWORK_SLACK_S = 10.0


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    n = rng.choice((2, 3, 3, 4))
    return opts.with_(
        node_count=n,
        ram_total_gib=(64,) * n,
        model_id=MODEL,
        ring_data_plane=True,
        fault_kinds=(),
        client_count=min(opts.client_count, 3),
        abandoned_events_max=4,
        core=msgspec.structs.replace(opts.core, group_connect_deadline_s=rng.choice((10.0, 30.0, 60.0, 120.0))),
    )


class _Blocker:
    """Observer: makes one rank of the first generation-0 instance of MODEL unreachable, once."""

    def __init__(self, stage: Stage, mode: str) -> None:
        self.stage = stage
        self.mode = mode
        self.done = False
        self.rank = -1
        self.node = ""
        self.address = ""
        self.instance_id: InstanceId | None = None
        # (rank, "ip:port") a correct diagnosis may name: the blocked rank, or (a
        # downed link carries both directions of a pair) any hop over that link.
        self.unreachable: list[tuple[int, str]] = []
        self.downed: tuple[frozenset[str], frozenset[str]] | None = None  # (the pair, the link's addresses)

    def after_step(self, host: str, node: Any, inp: Any, effects: list[Any]) -> None:
        if self.done:
            return
        for effect in effects:
            if type(effect) is AppendLog and type(effect.indexed.event) is InstanceCreated:
                inst = effect.indexed.event.instance
                if inst.shard_assignments.model_id == MODEL and inst.generation == 0 and len(inst.ring) > 1:
                    self._block(inst)
                    return

    def _block(self, inst: Any) -> None:
        stage = self.stage
        world = stage.world
        self.done = True
        self.instance_id = inst.instance_id
        hop = inst.ring[stage.rng.randrange(len(inst.ring))]
        pred = inst.ring[hop.rank - 1]
        self.rank, self.node, self.address = hop.rank, hop.node_id, hop.address
        ip = hop.address.rsplit(":", 1)[0]
        links = world.network.links_between(pred.node_id, hop.node_id)
        carrier = [link for link in links if link.up and link.address_of(hop.node_id) == ip]
        others = [link for link in links if link.up and link not in carrier]
        if self.mode == "link" and carrier and others:
            link = carrier[0]
            pair = frozenset((link.a, link.b))
            ips = frozenset((link.address_a, link.address_b))
            self.downed = (pair, ips)
            self.unreachable = [
                (h.rank, h.address) for h in inst.ring
                if frozenset((inst.ring[h.rank - 1].node_id, h.node_id)) == pair and h.address.rsplit(":", 1)[0] in ips
            ]
            # After this step (the master's, before any runner exists).
            world.call_later(0.0, self._link_down, link)
        else:
            self.mode = "port"
            self.unreachable = [(hop.rank, hop.address)]
            world.faults.ring_address_unreachable(hop.address)
        world.trace_note("-", "ring_deadline", f"rank {hop.rank} at {hop.address} unreachable ({self.mode})")

    def _link_down(self, link: Link) -> None:
        self.stage.world.faults.set_link(link, kind="ring_link_down")


@scenario(
    "ring_deadline",
    "a rank's ring address is unreachable: group connect fails at its deadline with a diagnosis, then re-placement",
    adjust=_adjust,
)
def ring_deadline(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    opts = stage.opts
    deadline = opts.core.group_connect_deadline_s
    ledger = Ledger(stage)
    blocker = _Blocker(stage, stage.rng.choice(("port", "link")))
    world.observers.append(blocker)
    yield from wait_links_observed(stage)
    k = stage.rng.randint(2, opts.node_count)
    placed_at = world.env.now
    iid = yield from place_on(stage, MODEL, min_nodes=k)
    stage.start_clients(world.env.now + 10_000.0)
    expect(blocker.done and blocker.instance_id == iid, f"the first placement {iid} to get an unreachable rank")
    new = yield from wait_serving(
        stage, MODEL, min_generation=1, timeout_s=deadline + opts.ready_deadline_s + 2 * opts.probe_interval_s,
        what="after the group-connect deadline",
    )
    old = ledger.created[iid].instance
    stage.metrics["mode"] = blocker.mode
    stage.metrics["deadline_s"] = deadline
    stage.metrics["ranks"] = len(old.ring)

    # The failure: at the deadline, with a diagnosis naming the rank and its address.
    timeouts = [(t, node, f) for (t, node, i, f) in ledger.failures if i == iid and f.code == GROUP_CONNECT_TIMEOUT]
    expect(bool(timeouts), f"a group_connect_timeout failure indexed for {iid}; got {ledger.failures}")
    _, first_node, first = timeouts[0]
    names = [f"rank {r} at {a}" for r, a in blocker.unreachable]
    expect(any(n in first.error_message for n in names),
           f"the diagnosis to name one of {names}: {first.error_message!r}")
    expect(not first.permanent, f"a group-connect timeout to be re-placed, not given up: {first}")
    reported = [r for r in ledger.reports if r.instance_id == iid and r.status == first]
    expect(bool(reported), f"the runner on {first_node} to report the failure the master indexed (not a backstop)")
    runner_id = reported[0].runner_id
    # Its connect attempt began at its last Connecting report before the failure.
    began = [r.t for r in ledger.reports
             if r.runner_id == runner_id and type(r.status) is RunnerConnecting and r.t <= reported[0].t]
    expect(bool(began), f"runner {runner_id} to report Connecting before failing")
    took = reported[0].t - began[-1]
    expect(deadline - 1e-6 <= took <= deadline + _SLACK_S,
           f"group connect to fail at its {deadline:g} s deadline, it took {took:.3f} s")
    stage.metrics["failed_after_s"] = round(took, 3)

    # The re-placement: once, generation 1, a derived id, a fresh port, the address avoided.
    gens = sorted(c.instance.generation for c in ledger.of_model(MODEL))
    expect(gens == [0, 1], f"one re-placement (generations 0 and 1), got {gens}")
    expect(iid in ledger.deleted and ledger.deleted[iid][0] <= ledger.created[new.instance_id].t,
           f"{iid} removed before its re-placement is created")
    expect(new.instance_id == derive_id("inst", iid, 1), f"the re-placement's id derived from {iid}, got {new.instance_id}")
    expect(new.ephemeral_port != old.ephemeral_port, f"a fresh port, got {new.ephemeral_port} again")
    expect(len(new.ring) >= len(old.ring), f"at least {len(old.ring)} ranks again, got {len(new.ring)}")
    expect(all(h.address != blocker.address for h in new.ring), f"no hop at {blocker.address}: {new.ring}")
    if blocker.downed is not None:
        pair, ips = blocker.downed
        over = [h for h in new.ring
                if frozenset((new.ring[h.rank - 1].node_id, h.node_id)) == pair and h.address.rsplit(":", 1)[0] in ips]
        expect(not over, f"no hop over the downed link {sorted(pair)} {sorted(ips)}: {over}")
    replaced_after = ledger.created[new.instance_id].t - ledger.created[iid].t
    # Creation reaches the workers, and the failure the master, over a lossy, heavy-tailed network.
    expect(replaced_after <= deadline + _NETWORK_SLACK_S,
           f"re-placement within the deadline + {_NETWORK_SLACK_S:g} s, took {replaced_after:.3f} s")
    stage.metrics["replaced_after_s"] = round(replaced_after, 3)
    stage.metrics["placed_to_serving_s"] = round(world.env.now - placed_at, 3)

    # The re-placed instance serves.
    since = world.env.now
    ok = yield from stage.wait_until(
        lambda: served_after([r for r in world.clients.requests.values() if r.kind == "SubmitTask"], since) > 0,
        timeout_s=60.0,
    )
    expect(ok, "a request served by the re-placed instance within 60 s")
    yield stage.sleep(stage.rng.uniform(2.0, 10.0))
