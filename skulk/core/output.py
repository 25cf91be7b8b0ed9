"""``Output``: what one component made of one input, in the one shape they all return.

Theory of operation
-------------------
The node's components (election, replica, master, outbox, worker, requests,
reporter) each take an input and return an ``Output``:

- ``effects``: for the driver, in order;
- ``events``: local events for the master, raised by the node after the
  effects (through the outbox, or indexed in place when this node is master);
- ``persist``: the component moved something that must survive a restart
  (the election clock): the node writes its record *before* the effects, so
  nothing goes out at a clock a restarted node could forget;
- ``session``: the election moved to a new session; the node follows it after
  the effects (deposes or starts its master, re-points its replica, resets the
  outbox, ends requests open on the old master), then asks the election to
  announce the result if the change concluded a campaign.

A component never calls back into the node: whatever it needs the node to do
is in its output. ``CoreNode`` turns an output into effects in exactly one
place (``CoreNode._take``), so the order above holds for every input.
"""

from __future__ import annotations

from skulk.core.effects import Effect
from skulk.core.events import Event
from skulk.core.records import Record
from skulk.core.session import Session

__all__ = ["Output", "SessionChange"]


class SessionChange(Record, frozen=True, kw_only=True):
    """The election moved from ``old`` to ``new``.

    ``announce``: the change concluded a campaign here, so once the node has
    moved, the election tells its peers at once (a heartbeat) and stragglers
    converge.
    """

    old: Session | None
    new: Session
    announce: bool = False


class Output:
    """Effects, then local events, plus two requests to the node (see the module doc)."""

    __slots__ = ("effects", "events", "persist", "session")

    def __init__(
        self,
        effects: list[Effect] | None = None,
        events: list[Event] | None = None,
        *,
        persist: bool = False,
        session: SessionChange | None = None,
    ) -> None:
        self.effects: list[Effect] = effects if effects is not None else []
        self.events: list[Event] = events if events is not None else []
        self.persist = persist
        self.session = session

    def __repr__(self) -> str:
        return f"Output(effects={self.effects!r}, events={self.events!r}, persist={self.persist}, session={self.session!r})"

    def __bool__(self) -> bool:
        return bool(self.effects or self.events or self.persist or self.session is not None)
