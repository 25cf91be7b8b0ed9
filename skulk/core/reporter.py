"""The reporter: what this node tells the master about itself.

Theory of operation
-------------------
A node reports three kinds of facts as local events: its telemetry
(``NodeGatheredInfo``: identity, memory, network, system), the links it
probed (``ConnectionObserved``/``ConnectionLost``) and the models it has on
disk (``DownloadCompleted``). The reporter remembers the latest observation
of each, always, and turns an observation into events only while the node's
session has been applied (``reporting``): before that there is no master to
tell, and the *rebuild* that follows the first applied event of a session
re-reports everything the new master's state lacks.

Telemetry is reported as a delta against what was last reported in this
session: a field goes out when it changed; available memory only when it
moved by more than 2 % of total (at least 64 MiB), so a noisy reading does not
become an event every few seconds. The KV ledgers of the node's runners
(``runner_kv``) change with every request, so they ride only on the periodic
report (``periodic``), which goes out every telemetry interval anyway: at most
one update per interval, never an event of their own. A new session forgets
what was reported.

Invariants kept: events are pure functions of the observations and the
state; order never depends on set or dict iteration (links and models are
reported sorted).
"""

from __future__ import annotations

import msgspec

from skulk.core.files import DiskInfo
from skulk.core.events import ConnectionLost, ConnectionObserved, DownloadCompleted, Event, NodeGatheredInfo
from skulk.core.ids import ModelId, NodeId
from skulk.core.inputs import InfoObserved, LinkProbed
from skulk.core.instances import LinkKind
from skulk.core.output import Output
from skulk.core.state import State
from skulk.core.telemetry import MemoryInfo
from skulk.core.topology import Connection

__all__ = ["Reporter", "MEMORY_REPORT_FRACTION", "MEMORY_REPORT_MIN_BYTES"]

# Report memory again only when available memory moved by more than this share of total...
MEMORY_REPORT_FRACTION = 0.02
# ...and by at least this much.
MEMORY_REPORT_MIN_BYTES = 64 * 1024 * 1024

_INFO_FIELDS = ("identity", "memory", "network", "system", "runner_kv", "disk")

# Report the models disk again when its free space moved by more than this share of total
# (at least 64 MiB), or when the bytes used by models or the budget changed.
DISK_REPORT_FRACTION = 0.01


class Reporter:
    def __init__(self, node_id: NodeId) -> None:
        self.node_id = node_id
        self._info = InfoObserved()  # the latest observation of each field
        self._reported = InfoObserved()  # what the current session's master was told
        self._links: dict[tuple[NodeId, str], tuple[LinkKind, bool]] = {}
        self._models: set[ModelId] = set()

    # --- observations ----------------------------------------------------------------

    def on_info(self, inp: InfoObserved, *, reporting: bool) -> Output:
        changes = {f: getattr(inp, f) for f in _INFO_FIELDS if getattr(inp, f) is not None}
        self._info = msgspec.structs.replace(self._info, **changes)
        if not reporting:
            return Output()
        event = self.info_event()
        if all(getattr(event, f) is None for f in _INFO_FIELDS):
            return Output()
        return Output(events=[event])

    def on_link(self, inp: LinkProbed, state: State, *, reporting: bool) -> Output:
        self._links[(inp.sink, inp.address)] = (inp.kind, inp.reachable)
        if not reporting:
            return Output()
        conn = Connection(source=self.node_id, sink=inp.sink, address=inp.address, kind=inp.kind)
        events: list[Event] = []
        for old in state.topology.connections:
            if old.source == self.node_id and old.sink == inp.sink and old.address == inp.address:
                if old != conn or not inp.reachable:
                    events.append(ConnectionLost(connection=old))
        if inp.reachable and conn not in state.topology.connections:
            events.append(ConnectionObserved(connection=conn))
        return Output(events=events)

    def on_model(self, model: ModelId, state: State, *, reporting: bool) -> Output:
        self._models.add(model)
        if reporting and model not in state.downloads.get(self.node_id, ()):
            return Output(events=[DownloadCompleted(node_id=self.node_id, model_id=model)])
        return Output()

    # --- sessions ---------------------------------------------------------------------

    def new_session(self) -> None:
        """A new master knows nothing this node reported to the last one."""
        self._reported = InfoObserved()

    def rebuild(self, state: State) -> list[Event]:
        """Everything a new session's state lacks: full telemetry, links, models."""
        events: list[Event] = [self.info_event(full=True)]
        mine = {c for c in state.topology.connections if c.source == self.node_id}
        live = set()
        for (sink, address), (kind, reachable) in sorted(self._links.items()):
            if reachable:
                conn = Connection(source=self.node_id, sink=sink, address=address, kind=kind)
                live.add(conn)
                if conn not in mine:
                    events.append(ConnectionObserved(connection=conn))
        for conn in sorted(mine - live, key=lambda c: (c.sink, c.address, c.kind)):
            events.append(ConnectionLost(connection=conn))
        have = state.downloads.get(self.node_id, ())
        for model in sorted(self._models):
            if model not in have:
                events.append(DownloadCompleted(node_id=self.node_id, model_id=model))
        return events

    def info_event(self, *, full: bool = False, periodic: bool = False) -> NodeGatheredInfo:
        """Telemetry that changed since it was last reported in this session (all of it when ``full``).

        Runners' KV ledgers go out only with the periodic report (or ``full``).
        """
        info, rep = self._info, self._reported
        identity = info.identity if (full or info.identity != rep.identity) else None
        network = info.network if (full or info.network != rep.network) else None
        system = info.system if (full or info.system != rep.system) else None
        memory = info.memory if (full or _memory_moved(rep.memory, info.memory)) else None
        runner_kv = info.runner_kv if (full or periodic) and info.runner_kv != rep.runner_kv else None
        disk = info.disk if (full or _disk_moved(rep.disk, info.disk)) else None
        changes = {
            k: v
            for k, v in (
                ("identity", identity), ("network", network), ("system", system), ("memory", memory), ("runner_kv", runner_kv),
                ("disk", disk),
            )
            if v is not None
        }  # fmt: skip
        if changes:
            self._reported = msgspec.structs.replace(self._reported, **changes)
        return NodeGatheredInfo(
            node_id=self.node_id, identity=identity, memory=memory, network=network, system=system, runner_kv=runner_kv,
            disk=disk,
        )


def _memory_moved(old: MemoryInfo | None, new: MemoryInfo | None) -> bool:
    if new is None:
        return False
    if old is None or old.ram_total != new.ram_total:
        return True
    delta = abs(old.ram_available.in_bytes - new.ram_available.in_bytes)
    return delta > max(MEMORY_REPORT_MIN_BYTES, int(new.ram_total.in_bytes * MEMORY_REPORT_FRACTION))


def _disk_moved(old: DiskInfo | None, new: DiskInfo | None) -> bool:
    if new is None:
        return False
    if old is None or (old.total_bytes, old.models_bytes, old.budget_bytes) != (new.total_bytes, new.models_bytes,
                                                                               new.budget_bytes):
        return True
    delta = abs(old.free_bytes - new.free_bytes)
    return delta > max(MEMORY_REPORT_MIN_BYTES, int(new.total_bytes * DISK_REPORT_FRACTION))
