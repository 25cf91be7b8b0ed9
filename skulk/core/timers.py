"""Timers: a typed key for every timer in the core, one string each for the driver.

Theory of operation
-------------------
A driver keeps timers by an opaque string (``SetTimer.key``,
``CancelTimer.key``, ``TimerFired.key``): it needs an identity to replace or
cancel a timer, nothing more. Inside the core every timer is a typed record,
so a handler gets a ``RunnerId`` rather than the tail of a string, and the
node routes a fired timer by its type (``CoreNode``'s timer table).

A timer kind is a class with a ``KIND`` string. A kind without fields has one
timer (``"election.campaign"``); a kind with one field has one timer per value
of it, keyed ``KIND + "." + value`` (``"worker.restart.<runner id>"``).
``key(timer)`` writes the string, ``parse(key)`` reads it back; the strings
are what drivers and simulator traces have always seen, so typing them
changed no trace.

Adding a timer kind: one class here, one entry in ``TIMER_KINDS``, one route
in the node (an import-time check names a kind without a route).

Invariants kept: ``parse(key(t)) == t`` for every timer ``t``; no kind's
``KIND`` is a prefix of another's key space, so parsing is unambiguous.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar, cast

from skulk.core.effects import CancelTimer, SetTimer
from skulk.core.ids import CommandId, RunnerId

__all__ = [
    "Timer",
    "CampaignTimer",
    "SettleTimer",
    "HeartbeatTimer",
    "NackTimer",
    "OutboxTimer",
    "PruneTimer",
    "TelemetryTimer",
    "MasterLostTimer",
    "RequestTimer",
    "RunnerRestartTimer",
    "RunnerDeadlineTimer",
    "TransferStallTimer",
    "TransferRetryTimer",
    "TIMER_KINDS",
    "key",
    "parse",
    "set_timer",
    "cancel_timer",
]


@dataclass(frozen=True, slots=True)
class Timer:
    """Base of every timer kind; ``KIND`` names it in the driver's key."""

    KIND: ClassVar[str] = ""


# --- one timer per node ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CampaignTimer(Timer):
    """Election: the campaign's timeout (the fallback end of a campaign)."""

    KIND: ClassVar[str] = "election.campaign"


@dataclass(frozen=True, slots=True)
class SettleTimer(Timer):
    """Election: the peer set stayed changed for ``settle_delay_s``: maybe campaign."""

    KIND: ClassVar[str] = "election.settle"


@dataclass(frozen=True, slots=True)
class HeartbeatTimer(Timer):
    """Election: a settled node re-announces its session."""

    KIND: ClassVar[str] = "election.heartbeat"


@dataclass(frozen=True, slots=True)
class NackTimer(Timer):
    """Replica: ask the master again for what is missing."""

    KIND: ClassVar[str] = "replica.nack"


@dataclass(frozen=True, slots=True)
class OutboxTimer(Timer):
    """Outbox: re-send undelivered local events."""

    KIND: ClassVar[str] = "outbox.retry"


@dataclass(frozen=True, slots=True)
class PruneTimer(Timer):
    """Master: look for nodes silent past ``node_timeout_s``."""

    KIND: ClassVar[str] = "master.prune"


@dataclass(frozen=True, slots=True)
class TelemetryTimer(Timer):
    """Node: re-report telemetry (keeps ``last_seen`` fresh)."""

    KIND: ClassVar[str] = "node.telemetry"


@dataclass(frozen=True, slots=True)
class MasterLostTimer(Timer):
    """Node: this follower's master has been missing from its peers for a grace period."""

    KIND: ClassVar[str] = "node.master_lost"


# --- one timer per thing -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestTimer(Timer):
    """Requests: re-send, give up on, or stop lingering for one command."""

    KIND: ClassVar[str] = "request"
    command_id: CommandId


@dataclass(frozen=True, slots=True)
class RunnerRestartTimer(Timer):
    """Worker: a crashed (or refused) runner may be started again."""

    KIND: ClassVar[str] = "worker.restart"
    runner_id: RunnerId


@dataclass(frozen=True, slots=True)
class RunnerDeadlineTimer(Timer):
    """Worker: a runner's first-report, group-connect or warmup deadline."""

    KIND: ClassVar[str] = "worker.deadline"
    runner_id: RunnerId


@dataclass(frozen=True, slots=True)
class TransferStallTimer(Timer):
    """Files: the transfer of a model has had no new bytes for ``transfer_stall_s``? Look again."""

    KIND: ClassVar[str] = "files.stall"
    model_id: str


@dataclass(frozen=True, slots=True)
class TransferRetryTimer(Timer):
    """Files: a failed transfer's backoff ended; choose a source again."""

    KIND: ClassVar[str] = "files.retry"
    model_id: str


TIMER_KINDS: tuple[type[Timer], ...] = (
    CampaignTimer,
    SettleTimer,
    HeartbeatTimer,
    NackTimer,
    OutboxTimer,
    PruneTimer,
    TelemetryTimer,
    MasterLostTimer,
    RequestTimer,
    RunnerRestartTimer,
    RunnerDeadlineTimer,
    TransferStallTimer,
    TransferRetryTimer,
)

_FIXED: dict[str, Timer] = {}  # key -> the one timer of a kind without fields
_KEYED: dict[str, Callable[[str], Timer]] = {}  # "KIND." -> the kind (built from the key's tail)
_FIELD: dict[type[Timer], str | None] = {}  # kind -> the name of its one field, if any
for _kind in TIMER_KINDS:
    _fields = [f.name for f in fields(_kind)]
    assert _kind.KIND, f"{_kind.__name__} has no KIND"
    assert len(_fields) <= 1, f"{_kind.__name__}: a timer kind has at most one field, not {list(_fields)}"
    _FIELD[_kind] = _fields[0] if _fields else None
    if _fields:
        _KEYED[_kind.KIND + "."] = cast("Callable[[str], Timer]", _kind)
    else:
        _FIXED[_kind.KIND] = _kind()
for _a in [*_FIXED, *_KEYED]:
    for _b in _KEYED:
        assert _a == _b or not _a.startswith(_b), f"timer keys {_a!r} and {_b!r}... overlap"
del _kind, _fields, _a, _b


def key(timer: Timer) -> str:
    """The driver's key of ``timer``."""
    name = _FIELD[type(timer)]
    return timer.KIND if name is None else f"{timer.KIND}.{getattr(timer, name)}"


def parse(timer_key: str) -> Timer | None:
    """The timer a driver's key names; None for a key no kind owns (a stale or foreign timer)."""
    fixed = _FIXED.get(timer_key)
    if fixed is not None:
        return fixed
    for prefix, kind in _KEYED.items():
        if timer_key.startswith(prefix) and len(timer_key) > len(prefix):
            return kind(timer_key[len(prefix) :])
    return None


def set_timer(timer: Timer, at: float) -> SetTimer:
    """Fire ``timer`` at absolute time ``at`` (replacing it if set)."""
    return SetTimer(key=key(timer), at=at)


def cancel_timer(timer: Timer) -> CancelTimer:
    return CancelTimer(key=key(timer))
