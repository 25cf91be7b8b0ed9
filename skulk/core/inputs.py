"""Inputs: everything that can happen to a node, as plain data.

Drivers feed these to ``CoreNode.handle(now, input)``.
"""

from __future__ import annotations

from typing import Literal

from skulk.core.cards import ModelCard
from skulk.core.commands import Command
from skulk.core.files import Coverage, DiskInfo
from skulk.core.ids import CommandId, NodeId, RunnerId
from skulk.core.instances import KvUse, LinkKind, RunnerStatus
from skulk.core.messages import Message
from skulk.core.telemetry import MemoryInfo, NetworkInfo, NodeIdentity, SystemInfo
from skulk.core.records import TaggedRecord
from skulk.core.tasks import TokenChunk

__all__ = [
    "Boot",
    "PeersChanged",
    "Received",
    "TimerFired",
    "InfoObserved",
    "LinkProbed",
    "ModelAvailable",
    "FilesObserved",
    "FilesGone",
    "TransferProgressed",
    "TransferEnded",
    "RunnerStatusObserved",
    "RunnerExited",
    "RunnerOutput",
    "SubmitCommand",
    "AbandonRequest",
    "PersistFailed",
    "Shutdown",
    "Input",
]


class Boot(TaggedRecord, frozen=True, kw_only=True):
    """The node process started (fresh or after a restart)."""


class PeersChanged(TaggedRecord, frozen=True, kw_only=True):
    """The set of peers the transport currently has a live path to (membership).

    A multi-homed peer whose second link flaps stays in the set; only a real
    change of the set matters to the election.
    """

    peers: frozenset[NodeId]


class Received(TaggedRecord, frozen=True, kw_only=True):
    sender: NodeId
    message: Message


class TimerFired(TaggedRecord, frozen=True, kw_only=True):
    """A timer set by ``SetTimer(key, at)`` is due (the key is opaque to drivers; see ``skulk.core.timers``)."""

    key: str


class InfoObserved(TaggedRecord, frozen=True, kw_only=True):
    """Fresh local telemetry; fields left None were not measured this time."""

    identity: NodeIdentity | None = None
    memory: MemoryInfo | None = None
    network: NetworkInfo | None = None
    system: SystemInfo | None = None
    disk: DiskInfo | None = None
    # The KV ledger of every rank-0 runner on this node (all of them: a runner left out is gone).
    runner_kv: dict[RunnerId, KvUse] | None = None


class LinkProbed(TaggedRecord, frozen=True, kw_only=True):
    """A probe of ``address`` (advertised by ``sink``) succeeded or failed."""

    sink: NodeId
    address: str
    kind: LinkKind
    reachable: bool


class ModelAvailable(TaggedRecord, frozen=True, kw_only=True, omit_defaults=True):
    """The files of ``model_id`` are on this node's disk.

    ``card``: the model's card, when the driver found one the node did not
    have (a model directory that appeared after start-up); from then on the
    master on this node can place it. A card for a model the node already
    knows is ignored: built-in and operator cards win. (Omitted when None, so
    the input's canonical bytes, and the simulator's trace digests, are those
    of a card-less input.)
    """

    model_id: str
    card: ModelCard | None = None


class FilesObserved(TaggedRecord, frozen=True, kw_only=True):
    """What this node's disk holds of ``model_id`` now (a scan, or the end of a transfer).

    ``status``: ``verified`` (every file checked against its hash) or
    ``staged`` (found on disk, not hashed yet). ``coverage`` is in layers
    (``skulk.core.files``); ``files`` the verified file names; ``source`` where
    they came from (``hub``, ``peer:<node>``, ``local``).
    """

    model_id: str
    status: Literal["staged", "verified"]
    coverage: Coverage
    bytes: int
    files: tuple[str, ...] = ()
    source: str = "local"


class FilesGone(TaggedRecord, frozen=True, kw_only=True):
    """No file of ``model_id`` is on this node's disk any more (evicted, or deleted by hand)."""

    model_id: str
    freed_bytes: int = 0


class TransferProgressed(TaggedRecord, frozen=True, kw_only=True):
    """Bytes of transfer ``transfer_id`` arrived: done and total, rate over the last seconds, ETA."""

    transfer_id: str
    model_id: str
    done_bytes: int
    total_bytes: int
    rate_bps: int
    eta_s: int | None = None


class TransferEnded(TaggedRecord, frozen=True, kw_only=True):
    """Transfer ``transfer_id`` finished (``ok``) or failed with ``code`` and ``message``.

    On success the driver has already reported the files with ``FilesObserved``.
    Codes: ``not_found``, ``unauthorized``, ``offline``, ``integrity``,
    ``disk_full``, ``network``, ``cancelled``, ``invalid_model``, ``internal``.
    """

    transfer_id: str
    model_id: str
    ok: bool
    code: str = ""
    message: str = ""


class RunnerStatusObserved(TaggedRecord, frozen=True, kw_only=True):
    runner_id: RunnerId
    status: RunnerStatus


class RunnerExited(TaggedRecord, frozen=True, kw_only=True):
    runner_id: RunnerId
    exit_code: int


class RunnerOutput(TaggedRecord, frozen=True, kw_only=True):
    runner_id: RunnerId
    chunk: TokenChunk


class SubmitCommand(TaggedRecord, frozen=True, kw_only=True):
    """A command accepted by this node's API."""

    command: Command


class AbandonRequest(TaggedRecord, frozen=True, kw_only=True):
    """The client of ``command_id`` went away (or asked to cancel)."""

    command_id: CommandId


class Shutdown(TaggedRecord, frozen=True, kw_only=True):
    """The node is going away: stop every runner (their exits are not crashes)."""


class PersistFailed(TaggedRecord, frozen=True, kw_only=True):
    """A disk write failed (full disk, I/O error); the node keeps serving."""

    what: str
    error: str


Input = (
    Boot
    | PeersChanged
    | Received
    | TimerFired
    | InfoObserved
    | LinkProbed
    | ModelAvailable
    | FilesObserved
    | FilesGone
    | TransferProgressed
    | TransferEnded
    | RunnerStatusObserved
    | RunnerExited
    | RunnerOutput
    | SubmitCommand
    | AbandonRequest
    | PersistFailed
    | Shutdown
)
