"""Sessions: who is master, and since which election.

A session is identified by ``(clock, master)``: the election clock of the
campaign that first elected ``master``. A sitting master that wins again keeps
its session, so nothing is torn down. Sessions are totally ordered by
``(clock, master)``; a node only ever moves to a greater session.
"""

from __future__ import annotations

from skulk.core.ids import NodeId
from skulk.core.records import Record

__all__ = ["Session", "Incarnation"]


class Session(Record, frozen=True, kw_only=True, order=True):
    clock: int
    master: NodeId

    def key(self) -> tuple[int, str]:
        return (self.clock, self.master)

    def __str__(self) -> str:
        return f"{self.master}@{self.clock}"


class Incarnation(Record, frozen=True, kw_only=True, order=True):
    """One life of a node process: a counter persisted across restarts, then the boot time.

    Local event numbers and chunk streams are scoped to an incarnation, so a
    node that restarts (and stays in the same session) is never mistaken for
    its previous life. Ordered by ``(number, boot_at)``: the boot time breaks
    the tie when the counter could not be persisted (a full disk).
    """

    number: int
    boot_at: float
