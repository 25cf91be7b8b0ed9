"""What the HTTP API needs from the node it runs in: its port onto the node.

The API talks to the node only through commands and the replicated state
(DESIGN.md section 1). ``NodePort`` is that surface; the production runtime
implements it on top of the asyncio driver (``skulk.runtime.api_bridge``). Keeping it a
small Protocol lets the API stay a thin layer: validate, submit, stream,
render.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

from skulk.core.cards import ModelCard
from skulk.core.commands import Command, CommandResult
from skulk.core.config import CoreConfig
from skulk.core.ids import CommandId, NodeId
from skulk.core.session import Session
from skulk.core.state import State
from skulk.core.tasks import TokenChunk

__all__ = ["NodePort", "RequestStream"]


class RequestStream(Protocol):
    """An accepted task's output. Iterate for chunks; the last has a finish_reason."""

    command_id: CommandId

    def __aiter__(self) -> AsyncIterator[TokenChunk]: ...


class NodePort(Protocol):
    @property
    def node_id(self) -> NodeId: ...

    @property
    def friendly_name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def state(self) -> State:
        """The node's current replicated state (read-only snapshot)."""
        ...

    @property
    def session(self) -> Session | None: ...

    @property
    def is_master(self) -> bool: ...

    @property
    def core_config(self) -> CoreConfig:
        """The node's core configuration (placement previews use its ring port range)."""
        ...

    @property
    def cards(self) -> Mapping[str, ModelCard]:
        """Model cards known to this node (built-ins, operator cards, local models)."""
        ...

    def new_command_id(self) -> CommandId:
        """A fresh, unique command id."""
        ...

    async def submit(self, command: Command) -> CommandResult:
        """Submit a non-task command and wait for the master's final answer.

        Retries while the answer is "pending" until the node's deadline, then
        returns a rejected result with code "unavailable" (the API answers 503).
        """
        ...

    async def open_task(self, command: Command) -> tuple[CommandResult, RequestStream | None]:
        """Submit a ``SubmitTask``; on acceptance return the stream of its chunks."""
        ...

    def abandon(self, command_id: CommandId) -> None:
        """The client went away or asked to cancel: cancel the task, close the stream."""
        ...

    def metrics(self) -> Mapping[str, float]:
        """Counters and gauges for /metrics (name -> value); names are Prometheus-safe."""
        ...

    async def describe_model(self, model_id: str) -> ModelCard:
        """A card for ``model_id`` from the hub (its ``config.json`` and weight sizes).

        Raises ``LookupError`` with a message for the client when the hub has
        no such model, cannot be reached, or the repository is not an mlx-lm
        model. (``POST /models/add``.)
        """
        ...

    def runner_diagnostics(self) -> list[dict[str, object]]:
        """This node's runners (id, instance, status, pid, uptime) for /v1/diagnostics/node."""
        ...
