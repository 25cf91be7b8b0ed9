"""What a node tells the cluster about itself, and the links between nodes.

Telemetry (identity, memory, network interfaces, system) is gathered by the
driver, turned into local events by the core, and indexed by the master; link
observations come from probing each address a peer advertises. Wire shapes
follow Skulk's API: ``nodeMemory: {nodeId: {"ramTotal": {"inBytes": n}}}``.
"""

from __future__ import annotations

from skulk.core.ids import NodeId
from skulk.core.instances import LinkKind
from skulk.core.records import Record

__all__ = [
    "Memory",
    "NodeIdentity",
    "MemoryInfo",
    "NetworkInterface",
    "NetworkInfo",
    "SystemInfo",
    "Connection",
    "Topology",
]


class Memory(Record, frozen=True, kw_only=True):
    in_bytes: int


class NodeIdentity(Record, frozen=True, kw_only=True):
    friendly_name: str
    version: str = ""


class MemoryInfo(Record, frozen=True, kw_only=True):
    """``ram_available`` is GPU-wireable memory on macOS, available memory on Linux."""

    ram_total: Memory
    ram_available: Memory


class NetworkInterface(Record, frozen=True, kw_only=True):
    name: str
    ip_address: str
    kind: LinkKind = "unknown"


class NetworkInfo(Record, frozen=True, kw_only=True):
    interfaces: tuple[NetworkInterface, ...] = ()


class SystemInfo(Record, frozen=True, kw_only=True):
    platform: str = ""
    chip: str = ""
    os_version: str = ""
    cpu_count: int = 0


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
