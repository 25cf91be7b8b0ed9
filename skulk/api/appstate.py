"""``AppState``: what every handler reaches through ``request.app.state.skulk``.

The node (through its ``NodePort``), the API's knobs and its counters, plus
the bounded memory of command ids cancelled through ``/v1/cancel``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from starlette.requests import Request

from skulk.api.config import ApiConfig
from skulk.api.port import NodePort
from skulk.api.metrics import ApiMetrics
from skulk.core.ids import CommandId

__all__ = ["AppState", "app_state"]


@dataclass
class AppState:
    node: NodePort
    config: ApiConfig
    metrics: ApiMetrics = field(default_factory=ApiMetrics)
    # Command ids cancelled through /v1/cancel, so their streams end as "cancelled"
    # rather than as lost; bounded (oldest forgotten first).
    _cancelled: OrderedDict[CommandId, None] = field(default_factory=OrderedDict)

    def mark_cancelled(self, command_id: CommandId) -> None:
        self._cancelled[command_id] = None
        self._cancelled.move_to_end(command_id)
        while len(self._cancelled) > self.config.cancelled_memory_max:
            self._cancelled.popitem(last=False)

    def was_cancelled(self, command_id: CommandId) -> bool:
        return command_id in self._cancelled

    def abandon(self, command_id: CommandId) -> None:
        """Abandon through the node and count it."""
        self.metrics.abandoned_total += 1
        self.node.abandon(command_id)


def app_state(request: Request) -> AppState:
    """The ``AppState`` of the app serving ``request``."""
    state = request.app.state.skulk
    assert isinstance(state, AppState)
    return state
