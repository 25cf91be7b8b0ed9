"""``ApiBridge``: the HTTP API's ``NodePort`` over the driver, and the driver's ``ApiSink``.

Theory of operation
-------------------
The API submits commands and reads the replicated state; nothing else. A
submitted command is fed to the core as ``SubmitCommand``; the core's
request tracker retries it (and keeps retrying while the master answers
"pending") until its deadline, and finally emits ``CommandCompleted``, which
resolves the waiting future here. A task's chunks arrive as
``DeliverChunk`` effects and are queued on the task's stream until the chunk
that carries a ``finish_reason``.

The stream of a task is registered *before* the command is submitted, so no
chunk can arrive before there is somewhere to put it. Abandoning a request
feeds ``AbandonRequest`` (the core sends the cancel) and ends the stream.

All methods run on the node's event loop.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Mapping

from skulk.core.cards import ModelCard
from skulk.core.config import CoreConfig
from skulk.core.commands import Command, CommandResult, SubmitTask
from skulk.core.ids import CommandId, NodeId
from skulk.core.inputs import AbandonRequest, Input, SubmitCommand
from skulk.core.node import CoreNode
from skulk.core.session import Session
from skulk.core.state import State
from skulk.core.tasks import TokenChunk

__all__ = ["ApiBridge", "TaskStream"]

# Beyond the core's own deadline: a last resort so an API request can never hang.
_SAFETY_MARGIN_S = 10.0


class TaskStream:
    """An accepted task's chunks, in order; ends after the chunk with a finish_reason."""

    def __init__(self, command_id: CommandId) -> None:
        self.command_id = command_id
        self._queue: asyncio.Queue[TokenChunk | None] = asyncio.Queue()
        self.closed = False

    def put(self, chunk: TokenChunk) -> None:
        if self.closed:
            return
        self._queue.put_nowait(chunk)
        if chunk.finish_reason is not None:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[TokenChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TokenChunk]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item


class ApiBridge:
    """Implements ``skulk.api.port.NodePort`` (for the API) and ``ApiSink`` (for the driver)."""

    def __init__(
        self,
        *,
        core: CoreNode,
        feed: Callable[[Input], None],
        friendly_name: str,
        version: str,
        metrics: Callable[[], Mapping[str, float]],
        runner_diagnostics: Callable[[], list[dict[str, object]]],
        describe_model: Callable[[str], ModelCard] | None = None,
    ) -> None:
        self._core = core
        self._describe_model = describe_model
        self._feed = feed
        self._friendly_name = friendly_name
        self._version = version
        self._metrics = metrics
        self._runner_diagnostics = runner_diagnostics
        self._results: dict[CommandId, asyncio.Future[CommandResult]] = {}
        self._streams: dict[CommandId, TaskStream] = {}
        self.session_listeners: list[Callable[[Session, bool], None]] = []
        self.submitted = 0
        self.completed = 0

    # --- NodePort: identity and state ---------------------------------------------------

    @property
    def node_id(self) -> NodeId:
        return self._core.node_id

    @property
    def friendly_name(self) -> str:
        return self._friendly_name

    @property
    def version(self) -> str:
        return self._version

    @property
    def state(self) -> State:
        return self._core.state

    @property
    def session(self) -> Session | None:
        return self._core.session

    @property
    def is_master(self) -> bool:
        return self._core.is_master

    @property
    def master_id(self) -> NodeId | None:
        return self._core.master_id

    @property
    def core_config(self) -> CoreConfig:
        """The node's core settings (the API shows ring ports in placement previews)."""
        return self._core.config

    @property
    def cards(self) -> Mapping[str, ModelCard]:
        """The node's cards, plus those added at run time (``POST /models/add``); the node's win."""
        added = self._core.state.model_cards
        if not added:
            return self._core.cards
        return {**added, **self._core.cards}

    def new_command_id(self) -> CommandId:
        return CommandId(f"cmd-{secrets.token_hex(10)}")

    # --- NodePort: commands -------------------------------------------------------------

    async def submit(self, command: Command) -> CommandResult:
        """Submit ``command``; the master's final answer (or "unavailable" at the deadline)."""
        cid = command.command_id
        fut = self._results.get(cid)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._results[cid] = fut
            self.submitted += 1
            self._feed(SubmitCommand(command=command))
        deadline = self._core.config.command_deadline_s + _SAFETY_MARGIN_S
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout=deadline)
        except asyncio.TimeoutError:
            self._results.pop(cid, None)
            return CommandResult(
                command_id=cid, status="rejected", code="unavailable",
                message=f"no answer from the cluster within {deadline:g} s",
            )

    async def open_task(self, command: Command) -> tuple[CommandResult, TaskStream | None]:
        """Submit a ``SubmitTask``; on acceptance, the stream of its chunks."""
        assert isinstance(command, SubmitTask), f"open_task takes a SubmitTask, got {type(command).__name__}"
        cid = command.command_id
        stream = self._streams.get(cid) or TaskStream(cid)
        self._streams[cid] = stream
        try:
            result = await self.submit(command)
        except BaseException:
            self._drop_stream(cid)
            raise
        if result.status != "accepted":
            self._drop_stream(cid)
            return result, None
        return result, stream

    def abandon(self, command_id: CommandId) -> None:
        """The client went away: cancel in the cluster, end the stream here."""
        self._feed(AbandonRequest(command_id=command_id))
        self._drop_stream(command_id)

    def _drop_stream(self, cid: CommandId) -> None:
        stream = self._streams.pop(cid, None)
        if stream is not None:
            stream.close()

    # --- NodePort: observability ----------------------------------------------------------

    def metrics(self) -> Mapping[str, float]:
        out = dict(self._metrics())
        # (skulk_api_* names are reserved for the API's own metrics.)
        out["skulk_handle_commands_submitted_total"] = float(self.submitted)
        out["skulk_handle_commands_completed_total"] = float(self.completed)
        out["skulk_handle_open_streams"] = float(len(self._streams))
        return out

    def runner_diagnostics(self) -> list[dict[str, object]]:
        return self._runner_diagnostics()

    async def describe_model(self, model_id: str) -> ModelCard:
        """A card from the hub (blocking I/O, so in a thread); ``LookupError`` with the reason."""
        if self._describe_model is None:
            raise LookupError("this node cannot reach a model hub")
        return await asyncio.to_thread(self._describe_model, model_id)

    # --- ApiSink (called by the driver) ------------------------------------------------------

    def deliver_chunk(self, chunk: TokenChunk) -> None:
        stream = self._streams.get(chunk.command_id)
        if stream is None:
            return  # abandoned: the core already sent the cancel
        stream.put(chunk)
        if chunk.finish_reason is not None:
            self._streams.pop(chunk.command_id, None)

    def command_completed(self, command_id: CommandId, result: CommandResult) -> None:
        self.completed += 1
        fut = self._results.pop(command_id, None)
        if fut is not None and not fut.done():
            fut.set_result(result)

    def session_changed(self, session: Session, is_master: bool) -> None:
        for listener in list(self.session_listeners):
            listener(session, is_master)
