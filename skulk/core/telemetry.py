"""Telemetry: what a node tells the cluster about its machine.

Telemetry (identity, memory, network interfaces, system) is gathered by the
driver (``skulk.runtime.telemetry`` measures it, the simulator draws it), fed
to the core as ``InfoObserved``, reported as ``NodeGatheredInfo`` local events
(``skulk.core.reporter``) and indexed by the master. Wire shapes follow
Skulk's API: ``nodeMemory: {nodeId: {"ramTotal": {"inBytes": n}}}``.
"""

from __future__ import annotations

from skulk.core.instances import LinkKind
from skulk.core.records import Record

__all__ = [
    "Memory",
    "NodeIdentity",
    "MemoryInfo",
    "NetworkInterface",
    "NetworkInfo",
    "SystemInfo",
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
