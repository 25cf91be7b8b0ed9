"""Builders shared by the core's tests: memory readings, links, cards, commands, states.

States are always built through the real ``apply``, so they are states the
cluster can actually reach.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from skulk.core import placement
from skulk.core.cards import ModelCard
from skulk.core.commands import PlaceInstance
from skulk.core.config import CoreConfig
from skulk.core.events import (
    Carryover,
    ConnectionObserved,
    Event,
    IndexedEvent,
    ModelCopyUpdated,
    NodeGatheredInfo,
    SessionStarted,
)
from skulk.core.files import Coverage, ModelCopy
from skulk.core.inputs import FilesObserved
from skulk.core.keeper import FileKeeper
from skulk.core.ids import CommandId, ModelId, NodeId
from skulk.core.instances import (
    Instance,
    PipelineShardMetadata,
)
from skulk.core.session import Session
from skulk.core.state import EMPTY_STATE, State, apply
from skulk.core.telemetry import Memory, MemoryInfo
from skulk.core.topology import Connection

GB = 10**9


CONFIG = CoreConfig()


def mem(total: int, available: int | None = None) -> MemoryInfo:
    return MemoryInfo(ram_total=Memory(in_bytes=total), ram_available=Memory(in_bytes=total if available is None else available))


def link(source: str, sink: str, address: str, kind: str = "ethernet") -> Connection:
    return Connection(source=NodeId(source), sink=NodeId(sink), address=address, kind=kind)  # type: ignore[arg-type]


def apply_events(state: State, events: Iterable[Event]) -> State:
    for event in events:
        state = apply(state, IndexedEvent(index=state.last_index + 1, event=event, at=float(state.last_index + 1)))
    return state


def build_state(
    nodes: dict[str, MemoryInfo | None],
    links: Sequence[Connection] = (),
    *,
    next_port_offset: int = 0,
) -> State:
    """A session with ``nodes`` (None: no memory telemetry yet) and observed ``links``."""
    state = apply(
        EMPTY_STATE,
        IndexedEvent(
            index=0,
            event=SessionStarted(session=Session(clock=1, master=NodeId("m")), carryover=Carryover(next_port_offset=next_port_offset)),
            at=0.0,
        ),
    )
    events: list[Event] = [NodeGatheredInfo(node_id=NodeId(n), memory=m) for n, m in nodes.items()]
    events += [ConnectionObserved(connection=c) for c in links]
    return apply_events(state, events)


def full_mesh(names: Sequence[str], kind: str = "ethernet", prefix: str = "10.0.0") -> list[Connection]:
    """Links between every ordered pair; node i's address is prefix.(i+1)."""
    addr = {n: f"{prefix}.{i + 1}" for i, n in enumerate(names)}
    return [link(a, b, addr[b], kind) for a in names for b in names if a != b]


def make_card(**over: object) -> ModelCard:
    base: dict[str, object] = dict(
        model_id="test/model",
        family="llama",
        weight_bytes=40 * GB,
        n_layers=80,
        hidden_size=8192,
        num_kv_heads=8,
        head_dim=128,
        context_length=131_072,
        supports_tensor=True,
    )
    base.update(over)
    return ModelCard(**base)  # type: ignore[arg-type]


def cards_of(*cards: ModelCard) -> dict[ModelId, ModelCard]:
    return {c.model_id: c for c in cards}


def command(model_id: str = "test/model", cid: str = "cmd-1", **over: object) -> PlaceInstance:
    return PlaceInstance(command_id=CommandId(cid), model_id=ModelId(model_id), **over)  # type: ignore[arg-type]


def placed(result: placement.Placed | placement.PlacementRefused) -> Instance:
    assert isinstance(result, placement.Placed), result
    return result.instance


def layers_by_node(inst: Instance) -> dict[NodeId, int]:
    sa = inst.shard_assignments
    out = {}
    for node, runner in sa.node_to_runner.items():
        shard = sa.runner_to_shard[runner]
        assert isinstance(shard, PipelineShardMetadata)
        out[node] = shard.end_layer - shard.start_layer
    return out


def rank_order(inst: Instance) -> list[NodeId]:
    sa = inst.shard_assignments
    return sorted(sa.node_to_runner, key=lambda n: sa.runner_to_shard[sa.node_to_runner[n]].device_rank)


# Exactly what Skulk's model generator writes (skulk.engine.models.write_model_card).
GENERATOR_CARD = """\
model_id = "skulk/tiny-qwen2"
family = "qwen2"
weight_bytes = 4608145
n_layers = 6
hidden_size = 128
num_kv_heads = 2
head_dim = 32
context_length = 8192
supports_tensor = true

[runtime]
mtp_max_depth = 0
speculative_multi_node = true
draft_model = ""
"""


LLAMA_31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "quantization": {"group_size": 64, "bits": 4},
}


def whole_copy(card: ModelCard) -> ModelCopy:
    cov = Coverage(n_layers=card.n_layers, layers=((0, card.n_layers),), head=True)
    return ModelCopy(status="verified", coverage=cov, bytes=card.weight_bytes, source="local")


def files_on(state: State, card: ModelCard, nodes: Iterable[str], *, keeper: FileKeeper | None = None) -> State:
    """``state`` in which ``nodes`` hold the whole of ``card``'s model, verified.

    With ``keeper`` (a node's ``FileKeeper``), that node's own disk says so too.
    """
    copy = whole_copy(card)
    events = [ModelCopyUpdated(node_id=NodeId(n), model_id=card.model_id, copy=copy) for n in nodes]
    state = apply_events(state, events)
    if keeper is not None:
        obs = FilesObserved(model_id=card.model_id, status="verified", coverage=copy.coverage, bytes=copy.bytes)
        keeper.on_observed(0.0, obs, state)
    return state
