"""Golden transcripts: readable records of whole interactions on the hand-stepped cluster.

Theory of operation
-------------------
A ``Transcript`` watches a ``sim.manual.ManualCluster`` (as one of its
observers) and writes one line per thing a reader of an election or a
failover cares about, in the order it happened::

    t=3.200 n2 <- n3  election clock=1 campaigning fast votes=n1,n2,n3
    t=3.200 n3        becomes master of n3@1
    t=3.200 n3        indexes #0 SessionStarted

Messages are shown when delivered (``<-``, with the sender); timers when they
fire; sessions when a node moves to one; events when the master indexes them;
command answers, runner starts and stops, and what the test did to the
cluster (boot, crash, partition, heal, submit). Timer bookkeeping, persisted
records and log lines are left out: they are how, not what.

The scenarios are in ``SCENARIOS``; each is a function that drives a cluster.
``tests/sim/test_transcripts.py`` regenerates every transcript on each test
run and compares it with the checked-in file under
``tests/sim/transcripts/``; when behaviour changes on purpose, rewrite them
with one command and review the diff::

    python -m sim.transcript --update

Invariants kept: a transcript is a pure function of its scenario (the manual
cluster has no randomness); lines never depend on dict or set order.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skulk.core.cards import ModelCard
from skulk.core.commands import Command, PlaceInstance, SubmitTask
from skulk.core.config import CoreConfig
from skulk.core.effects import AppendLog, CommandCompleted, DeliverChunk, SessionChanged, StartRunner, StopRunner
from skulk.core.events import RunnerStatusUpdated, TaskCreated
from skulk.core.ids import CommandId, ModelId
from skulk.core.inputs import PeersChanged, Received, SubmitCommand, TimerFired
from skulk.core.messages import (
    ChunkMessage,
    CommandMessage,
    CommandResultMessage,
    ElectionMessage,
    GlobalEvent,
    LocalEventAck,
    LocalEventMessage,
    Message,
    SyncRequest,
    SyncResponse,
)
from skulk.core.tasks import ChatMessage, GenerationParams

from sim.manual import ManualCluster

__all__ = ["Transcript", "SCENARIOS", "render", "main", "DEFAULT_DIR"]

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "tests" / "sim" / "transcripts"


class Transcript:
    """An observer of a ``ManualCluster`` that writes what happened, line by line."""

    def __init__(self, cluster: ManualCluster) -> None:
        self.cluster = cluster
        self.lines: list[str] = []
        cluster.observers.append(self)

    # --- what the test does ----------------------------------------------------------

    def note(self, text: str) -> None:
        self.lines.append(f"t={self.cluster.now:.3f} {'':<4} ## {text}")

    def node_booted(self, nid: str) -> None:
        self._line(nid, "boots")

    def node_crashed(self, nid: str) -> None:
        self._line(nid, "crashes")

    def cluster_changed(self, text: str) -> None:
        self.note(text)

    # --- what the nodes do -----------------------------------------------------------

    def after_step(self, nid: str, node: Any, inp: Any, effects: list[Any]) -> None:
        if isinstance(inp, Received):
            self._line(nid, f"<- {inp.sender:<4} {_message(inp.message)}")
        elif isinstance(inp, TimerFired):
            self._line(nid, f"timer {inp.key}")
        elif isinstance(inp, PeersChanged):
            self._line(nid, f"peers {','.join(sorted(inp.peers)) or '-'}")
        elif isinstance(inp, SubmitCommand):
            self._line(nid, f"api submits {_command(inp.command)}")
        for effect in effects:
            if isinstance(effect, SessionChanged):
                verb = "becomes master of" if effect.is_master else "follows"
                self._line(nid, f"{verb} {effect.session}")
            elif isinstance(effect, AppendLog):
                self._line(nid, f"indexes #{effect.indexed.index} {_event(effect.indexed.event)}")
            elif isinstance(effect, CommandCompleted):
                result = effect.result
                extra = f" instance={result.instance_id}" if result.instance_id else ""
                extra += f" code={result.code}" if result.code else ""
                self._line(nid, f"answers {effect.command_id}: {result.status}{extra}")
            elif isinstance(effect, StartRunner):
                shard = effect.spec.shard
                self._line(nid, f"starts runner {effect.spec.runner_id} rank {shard.device_rank}/{shard.world_size}")
            elif isinstance(effect, DeliverChunk):
                chunk = effect.chunk
                end = f" ({chunk.finish_reason})" if chunk.finish_reason else ""
                self._line(nid, f"delivers {chunk.command_id} #{chunk.seq} {chunk.text!r}{end} to the API")
            elif isinstance(effect, StopRunner):
                self._line(nid, f"stops runner {effect.runner_id} ({effect.reason})")

    def _line(self, nid: str, text: str) -> None:
        self.lines.append(f"t={self.cluster.now:.3f} {nid:<4} {text}")

    def text(self, title: str) -> str:
        return f"# {title}\n" + "\n".join(self.lines) + "\n"


def _message(msg: Message) -> str:
    if isinstance(msg, ElectionMessage):
        votes = ",".join(v.candidate.node_id for v in msg.votes)
        if msg.campaigning:
            return f"election clock={msg.clock} campaigning{' fast' if msg.fast else ''} votes={votes}"
        session = msg.sender_vote.session
        log = f" log_next={msg.log_next}" if msg.log_next is not None else ""
        return f"heartbeat clock={msg.clock} session={session if session else '-'}{log}"
    if isinstance(msg, CommandMessage):
        return f"command {_command(msg.command)}"
    if isinstance(msg, CommandResultMessage):
        return f"result {msg.result.command_id}: {msg.result.status}"
    if isinstance(msg, LocalEventMessage):
        return f"local event #{msg.origin_idx} {_event(msg.event)}"
    if isinstance(msg, LocalEventAck):
        return f"local ack next={msg.next_idx}{' gap' if msg.gap else ''}"
    if isinstance(msg, GlobalEvent):
        return f"event #{msg.indexed.index} {_event(msg.indexed.event)}"
    if isinstance(msg, SyncRequest):
        return f"sync request from #{msg.from_index}" + (f" to #{msg.to_index}" if msg.to_index is not None else "")
    if isinstance(msg, SyncResponse):
        indices = [e.index for e in msg.events]
        span = f"#{indices[0]}..#{indices[-1]}" if indices else "nothing"
        return f"sync response {span}" + (f" + snapshot at #{msg.snapshot.index}" if msg.snapshot else "")
    if isinstance(msg, ChunkMessage):
        return f"chunk {msg.chunk.command_id} #{msg.chunk.seq}" + (f" ({msg.chunk.finish_reason})" if msg.chunk.finish_reason else "")
    raise AssertionError(f"no rendering for {type(msg).__name__}")


def _command(command: Command) -> str:
    return f"{type(command).__name__} {command.command_id}"


def _event(event: Any) -> str:
    name = type(event).__name__
    if isinstance(event, RunnerStatusUpdated):
        return f"{name} {event.runner_id} on {event.node_id}: {type(event.status).__name__.removeprefix('Runner')}"
    if isinstance(event, TaskCreated):
        return f"{name} {event.task.task_id} for {event.task.command_id} on {event.task.instance_id}"
    for attr in ("node_id", "task_id", "runner_id"):
        value = getattr(event, attr, None)
        if value is not None:
            return f"{name} {value}"
    instance = getattr(event, "instance", None)
    if instance is not None:
        return f"{name} {instance.instance_id}"
    connection = getattr(event, "connection", None)
    if connection is not None:
        return f"{name} {connection.source}->{connection.sink}"
    return name


# --- the scenarios ----------------------------------------------------------------------------------

_QUIET = CoreConfig(telemetry_interval_s=1_000.0)  # telemetry once per session: the transcript shows the protocol

MODEL = ModelId("sim/small")
_CARD = ModelCard(
    model_id=MODEL,
    family="qwen2",
    weight_bytes=2 * 10**9,
    n_layers=24,
    hidden_size=1024,
    num_kv_heads=2,
    head_dim=64,
    context_length=8_192,
    supports_tensor=False,
)


def election() -> tuple[str, ManualCluster, Transcript]:
    c = ManualCluster(3, config=_QUIET)
    t = Transcript(c)
    c.boot_all()
    c.settle(until=6.0)
    return ("three nodes boot; their lone boot campaigns at clock 1 give way to one fast campaign at clock 2 "
            "once the peer sets settle, and the highest node id, n3, becomes master"), c, t


def failover() -> tuple[str, ManualCluster, Transcript]:
    c = ManualCluster(3, config=_QUIET)
    t = Transcript(c)
    c.boot_all()
    c.settle(until=6.0)
    c.crash("n3")
    c.settle(until=c.now + 6.0)
    return "the master n3 crashes; n1 and n2 campaign at once and n2 takes over at a higher clock", c, t


def partition_heal() -> tuple[str, ManualCluster, Transcript]:
    c = ManualCluster(3, config=_QUIET)
    t = Transcript(c)
    c.boot_all()
    c.settle(until=6.0)
    c.partition(["n3"], ["n1", "n2"])
    c.settle(until=c.now + 6.0)
    c.heal()
    c.settle(until=c.now + 6.0)
    return ("the master n3 is cut off; the majority elects n2 (n2@3); after the heal one more campaign "
            "elects n3 (n3@4), whom everyone follows"), c, t


def placement() -> tuple[str, ManualCluster, Transcript]:
    c = ManualCluster(2, config=_QUIET, cards={MODEL: _CARD}, ram_gib=[8, 8])
    t = Transcript(c)
    c.boot_all()
    c.settle(until=6.0)
    t.note("the API on n1 asks to place sim/small over both nodes")
    c.submit("n1", SubmitCommand(command=PlaceInstance(command_id=CommandId("place-1"), model_id=MODEL, min_nodes=2)))
    c.settle(until=c.now + 4.0)
    t.note("the API on n1 sends a chat request")
    params = GenerationParams(messages=(ChatMessage(role="user", content="hi"),), max_tokens=3)
    c.submit("n1", SubmitCommand(command=SubmitTask(command_id=CommandId("chat-1"), model_id=MODEL, params=params)))
    c.settle(until=c.now + 4.0)
    return "a model placed across two nodes: the instance, its two runners, one request served", c, t


SCENARIOS: dict[str, Callable[[], tuple[str, ManualCluster, Transcript]]] = {
    "election": election,
    "failover": failover,
    "partition_heal": partition_heal,
    "placement": placement,
}


def render(name: str) -> str:
    """The transcript of scenario ``name``, as checked in."""
    title, _, transcript = SCENARIOS[name]()
    return transcript.text(f"{name}: {title}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.transcript", description=__doc__.split("\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite the checked-in transcripts")
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help="where the transcripts live")
    parser.add_argument("names", nargs="*", help="scenarios (default: all)")
    args = parser.parse_args(argv)
    folder = Path(args.dir)
    names = args.names or sorted(SCENARIOS)
    changed = 0
    for name in names:
        text = render(name)
        path = folder / f"{name}.txt"
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        if old == text:
            print(f"{path}: unchanged")
            continue
        changed += 1
        if args.update:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"{path}: rewritten")
        else:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True), str(path), "now"))
    return 0 if args.update or not changed else 1


if __name__ == "__main__":
    raise SystemExit(main())
