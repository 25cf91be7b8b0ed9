"""Topology: the nodes of a session and the links observed between them.

Links are observed by probing each address a peer advertises (the driver
probes, the core reports ``ConnectionObserved``/``ConnectionLost``); placement
and ring formation read the topology to choose nodes and the best link for
each ring hop (``skulk.core.interconnect``).
"""

from __future__ import annotations

from skulk.core.ids import NodeId
from skulk.core.instances import LinkKind
from skulk.core.records import Record

__all__ = ["Connection", "Topology"]


class Connection(Record, frozen=True, kw_only=True):
    """``source`` reached ``sink`` at ``address`` (an IP) over a link of ``kind``."""

    source: NodeId
    sink: NodeId
    address: str
    kind: LinkKind


class Topology(Record, frozen=True, kw_only=True):
    """Nodes seen in this session and the links observed between them (sorted)."""

    nodes: tuple[NodeId, ...] = ()
    connections: tuple[Connection, ...] = ()
