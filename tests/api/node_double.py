"""An in-process ``NodePort`` over the real pure core, for the API's unit tests.

What is real: the replicated ``State`` is built by the core's own ``apply``
from real events; placements are the core's ``placement.place`` (so refusals
carry the real memory arithmetic); model cards are real ``ModelCard`` records;
``previews`` run the real search.

What stands in: there is no transport and no runner process. A generation's
chunks come from ``ScriptedNode.script`` (a function of the submitted command
returning ``TokenChunk`` records, optionally with delays), so tests can state
exactly what a runner said (a context refusal, a session change mid-stream)
and check how the API renders it. The end-to-end tests in this folder run the
same API against real node processes.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from skulk.core import placement
from skulk.core.cards import ModelCard
from skulk.core.commands import (
    AddModelCard,
    CancelTask,
    Command,
    CommandResult,
    DeleteInstance,
    EvictModel,
    PlaceInstance,
    RequestStoreDownload,
    SubmitTask,
)
from skulk.core.config import CoreConfig
from skulk.core.events import (
    Carryover,
    ConnectionObserved,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    NodeGatheredInfo,
    RunnerStatusUpdated,
    SessionStarted,
)
from skulk.core.files import DiskInfo
from skulk.core.ids import CommandId, ModelId, NodeId, TaskId, derive_id
from skulk.core.instances import RunnerReady, SpeculationConfig
from skulk.core.telemetry import Memory, MemoryInfo, NetworkInfo, NetworkInterface, NodeIdentity, SystemInfo
from skulk.core.topology import Connection
from skulk.core.session import Session
from skulk.core.state import EMPTY_STATE, State, apply
from skulk.core.tasks import GenerationStats, TokenChunk, Usage

GiB = 1024**3

TINY = ModelCard(
    model_id=ModelId("skulk/tiny-qwen2"),
    family="qwen2",
    weight_bytes=4_000_000,
    n_layers=6,
    hidden_size=128,
    num_kv_heads=2,
    head_dim=32,
    context_length=8192,
    supports_tensor=True,
)
HUGE = ModelCard(
    model_id=ModelId("big/huge-405b"),
    family="llama",
    weight_bytes=800 * GiB,
    n_layers=126,
    hidden_size=16384,
    num_kv_heads=8,
    head_dim=128,
    context_length=131072,
    supports_tensor=True,
)

Script = Callable[[SubmitTask], Sequence[TokenChunk | float]]


def words_script(words: Sequence[str] = ("Hello", ",", " world", "!")) -> Script:
    """A runner stand-in: one chunk per word, then a final chunk with usage and stats."""

    def script(command: SubmitTask) -> list[TokenChunk | float]:
        cid = command.command_id
        tid = TaskId(derive_id("task", cid))
        out: list[TokenChunk | float] = []
        for i, word in enumerate(words):
            out.append(TokenChunk(command_id=cid, task_id=tid, seq=i, text=word, token_ids=(100 + i,)))
        n = len(words)
        out.append(
            TokenChunk(
                command_id=cid,
                task_id=tid,
                seq=n,
                finish_reason="stop",
                usage=Usage(prompt_tokens=7, completion_tokens=n, total_tokens=7 + n),
                stats=GenerationStats(prompt_tps=700.0, generation_tps=50.0, prompt_tokens=7, generation_tokens=n),
            )
        )
        return out

    return script


class _Stream:
    """A ``RequestStream`` playing a script; ``close`` ends it (as abandon does)."""

    def __init__(self, command_id: CommandId, items: Sequence[TokenChunk | float]) -> None:
        self.command_id = command_id
        self._items = list(items)
        self._closed = asyncio.Event()

    def close(self) -> None:
        self._closed.set()

    async def _gen(self) -> AsyncIterator[TokenChunk]:
        for item in self._items:
            if self._closed.is_set():
                return
            if isinstance(item, float):
                # A delay: wake early if the stream is closed meanwhile.
                try:
                    await asyncio.wait_for(self._closed.wait(), timeout=item)
                    return
                except TimeoutError:
                    continue
            yield item

    def __aiter__(self) -> AsyncIterator[TokenChunk]:
        return self._gen()


@dataclass
class ScriptedNode:
    """A single-process NodePort; see the module docstring for what is real."""

    node_id: NodeId = NodeId("node-a")
    friendly_name: str = "alpha"
    version: str = "0.1.0"
    local_cards: Mapping[str, ModelCard] = field(default_factory=lambda: {TINY.model_id: TINY, HUGE.model_id: HUGE})
    # What the stand-in hub knows (``describe_model``); a model not here is "not_found".
    hub_cards: dict[str, ModelCard] = field(default_factory=dict)
    core_config: CoreConfig = field(default_factory=CoreConfig)
    script: Script = field(default_factory=words_script)
    # Placement pending: answer submit like the runtime does after its deadline.
    pending_deadline_code: str = "unavailable"
    state: State = EMPTY_STATE
    is_master: bool = True
    submitted: list[Command] = field(default_factory=list)
    abandoned: list[CommandId] = field(default_factory=list)
    open_streams: dict[CommandId, _Stream] = field(default_factory=dict)
    runner_rows: list[dict[str, object]] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=itertools.count)
    _now: float = 1000.0

    # --- building state with the real apply ---------------------------------------------------

    def _apply(self, event: object) -> None:
        index = self.state.last_index + 1
        self._now += 0.5
        self.state = apply(self.state, IndexedEvent(index=index, event=event, at=self._now))

    def start_session(self, clock: int = 1) -> None:
        self.state = apply(
            EMPTY_STATE,
            IndexedEvent(index=0, event=SessionStarted(session=Session(clock=clock, master=self.node_id), carryover=Carryover()), at=self._now),
        )

    def add_node(self, node_id: str, name: str, ram_gib: int, *, ip: str, kind: str = "ethernet") -> None:
        self._apply(
            NodeGatheredInfo(
                node_id=NodeId(node_id),
                identity=NodeIdentity(friendly_name=name, version=self.version),
                memory=MemoryInfo(ram_total=Memory(in_bytes=ram_gib * GiB), ram_available=Memory(in_bytes=ram_gib * GiB * 3 // 4)),
                network=NetworkInfo(interfaces=(NetworkInterface(name="en0", ip_address=ip, kind=kind),)),  # type: ignore[arg-type]
                system=SystemInfo(platform="linux", chip="cpu", os_version="6", cpu_count=2),
                disk=DiskInfo(total_bytes=512 * GiB, free_bytes=400 * GiB, models_bytes=0, path=f"/srv/{node_id}/models"),
            )
        )

    def link(self, a: str, b: str, address: str, kind: str = "ethernet") -> None:
        for src, dst in ((a, b), (b, a)):
            self._apply(ConnectionObserved(connection=Connection(source=NodeId(src), sink=NodeId(dst), address=address, kind=kind)))  # type: ignore[arg-type]

    def place(self, model_id: str, *, min_nodes: int = 1, ready: bool = True, speculation: SpeculationConfig | None = None) -> str:
        """Place with the real placement and mark its runners ready; returns the instance id."""
        result = self._place(
            PlaceInstance(command_id=self.new_command_id(), model_id=ModelId(model_id), min_nodes=min_nodes), ready=ready, speculation=speculation
        )
        assert result.status == "accepted", result
        assert result.instance_id is not None
        return result.instance_id

    def _place(self, command: PlaceInstance, *, ready: bool = True, speculation: SpeculationConfig | None = None) -> CommandResult:
        outcome = placement.place(self.state, command, self.cards, self.core_config)  # type: ignore[arg-type]
        if isinstance(outcome, placement.PlacementRefused):
            if outcome.pending:
                return CommandResult(
                    command_id=command.command_id, status="rejected", code=self.pending_deadline_code,
                    message=f"gave up after 15 s: {outcome.message}",
                )
            return CommandResult(command_id=command.command_id, status="rejected", code=outcome.code, message=outcome.message)
        inst = outcome.instance
        if speculation is not None:
            inst = msgspec.structs.replace(inst, speculation=speculation)
        self._apply(InstanceCreated(instance=inst, command_id=command.command_id))
        if ready:
            for node, runner in sorted(inst.shard_assignments.node_to_runner.items()):
                self._apply(
                    RunnerStatusUpdated(
                        runner_id=runner, node_id=node, instance_id=inst.instance_id,
                        status=RunnerReady(context_ceiling=inst.context_ceiling),
                    )
                )
        return CommandResult(command_id=command.command_id, status="accepted", instance_id=inst.instance_id)

    @classmethod
    def three_nodes(cls, **kwargs: object) -> ScriptedNode:
        """Three 16 GiB nodes on a ring of links (one Thunderbolt, one Ethernet, one Wi-Fi), tiny model placed."""
        node = cls(**kwargs)  # type: ignore[arg-type]
        node.start_session()
        node.add_node("node-a", "alpha", 16, ip="10.0.0.1")
        node.add_node("node-b", "bravo", 16, ip="10.0.0.2")
        node.add_node("node-c", "charlie", 16, ip="10.0.0.3", kind="wifi")
        node.link("node-a", "node-b", "10.0.0.2", "thunderbolt")
        node.link("node-b", "node-c", "10.0.0.3", "ethernet")
        node.link("node-c", "node-a", "10.0.0.1", "wifi")
        return node

    # --- NodePort ------------------------------------------------------------------------------

    @property
    def cards(self) -> Mapping[str, ModelCard]:
        """The node's cards plus those added at run time, as the runtime's bridge answers."""
        return {**self.state.model_cards, **self.local_cards}

    async def describe_model(self, model_id: str) -> ModelCard:
        await asyncio.sleep(0)
        card = self.hub_cards.get(model_id)
        if card is None:
            raise LookupError(f"not_found: {model_id}: repository not found on the hub")
        return card

    def _master_rule(self, command: Command) -> CommandResult:
        """The real master's rule for ``command``, indexing into this double's state."""
        from skulk.core.master import COMMAND_RULES, Master

        assert self.state.session is not None
        master = Master(self.node_id, self.core_config, self.state.session, self.local_cards, self._apply_indexed)
        master.state = self.state
        master.next_index = self.state.last_index + 1
        _, result = COMMAND_RULES[type(command)](master, self._now, self.node_id, command)
        return result

    def _apply_indexed(self, indexed: IndexedEvent) -> State:
        self.state = apply(self.state, indexed)
        return self.state

    @property
    def session(self) -> Session | None:
        return self.state.session

    def new_command_id(self) -> CommandId:
        return CommandId(f"cmd-{next(self._ids):04d}")

    async def submit(self, command: Command) -> CommandResult:
        self.submitted.append(command)
        await asyncio.sleep(0)
        if isinstance(command, PlaceInstance):
            return self._place(command)
        if isinstance(command, DeleteInstance):
            if command.instance_id not in self.state.instances:
                return CommandResult(command_id=command.command_id, status="rejected", code="instance_not_found", message="no such instance")
            self._apply(InstanceDeleted(instance_id=command.instance_id, reason="deleted by request"))
            return CommandResult(command_id=command.command_id, status="accepted", instance_id=command.instance_id)
        if isinstance(command, CancelTask):
            stream = self.open_streams.pop(command.target, None)
            if stream is not None:
                stream.close()
            return CommandResult(command_id=command.command_id, status="accepted")
        if isinstance(command, (AddModelCard, EvictModel, RequestStoreDownload)):
            return self._master_rule(command)
        raise AssertionError(f"submit got {type(command).__name__}; tasks go through open_task")

    async def open_task(self, command: Command) -> tuple[CommandResult, _Stream | None]:
        assert isinstance(command, SubmitTask), command
        self.submitted.append(command)
        await asyncio.sleep(0)
        if not any(i.shard_assignments.model_id == command.model_id for i in self.state.instances.values()):
            return CommandResult(
                command_id=command.command_id, status="rejected", code="model_not_found",
                message=f"model {command.model_id!r} is not placed on this cluster; place it with POST /place_instance",
            ), None
        stream = _Stream(command.command_id, self.script(command))
        self.open_streams[command.command_id] = stream
        return CommandResult(command_id=command.command_id, status="accepted"), stream

    def abandon(self, command_id: CommandId) -> None:
        self.abandoned.append(command_id)
        stream = self.open_streams.pop(command_id, None)
        if stream is not None:
            stream.close()

    def metrics(self) -> Mapping[str, float]:
        return {"skulk_node_commands_submitted_total": float(len(self.submitted)), "skulk_node_open_streams": float(len(self.open_streams))}

    def runner_diagnostics(self) -> list[dict[str, object]]:
        return list(self.runner_rows)

    def tasks_submitted(self) -> list[SubmitTask]:
        return [c for c in self.submitted if isinstance(c, SubmitTask)]
