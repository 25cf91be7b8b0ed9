"""Simulated API clients: submit, stream, abandon and retry.

Theory of operation
-------------------
A client talks to one node's API (its *origin*): it submits a command with
``SubmitCommand`` and then sees exactly what the API would: the command's
answer (``CommandCompleted``) and the stream of chunks (``DeliverChunk``). The
``ClientHub`` keeps one ``Request`` per command id and closes it when the
stream ends (a chunk with a finish reason), the command is refused, the client
walks away (``AbandonRequest``), or the origin host dies (connection reset).

``chat_client`` is a client loop: think, pick a live node (its home node
first), send a chat request with a prompt and maybe an explicit
``max_tokens``, maybe walk away part-way, and retry a failed request after a
backoff. ``place_model`` places a model with ``PlaceInstance`` and retries
until the cluster can answer.

Observers (the checkers) hear every submission, session stamp and ending, so
invariant 8 (requests on a lost master end, never hang) and invariant 6
(events per abandoned request) can be checked as the run goes.

Invariants kept: a request ends at most once; an ended request ignores
anything that arrives later; command ids are derived from the client and its
counter, never from randomness, so they replay identically.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import simpy

from skulk.core.commands import Command, CommandResult, PlaceInstance, SubmitTask
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId
from skulk.core.inputs import AbandonRequest, SubmitCommand
from skulk.core.session import Session
from skulk.core.tasks import ChatMessage, GenerationParams, TokenChunk

if TYPE_CHECKING:
    from sim.host import SimHost
    from sim.world import World

__all__ = ["Request", "ClientHub", "chat_client", "place_model", "PlacementFailed"]

# Answers a placing client retries: the cluster is not ready yet, or a failover interrupted it.
RETRYABLE_CODES = frozenset({"unavailable", "session_changed", "pending", "origin_crashed"})


class PlacementFailed(Exception):
    """A model could not be placed before the deadline (the message says why)."""


class Request:
    """One command as its client sees it."""

    __slots__ = (
        "command",
        "cid",
        "kind",
        "host",
        "incarnation",
        "client",
        "submitted_at",
        "session_sent",
        "accepted_at",
        "accepted_session",
        "instance_id",
        "first_chunk_at",
        "chunks",
        "tokens",
        "ended_at",
        "outcome",
        "code",
        "message",
        "finish_reason",
        "abandoned",
        "end_deadline",
        "done",
    )

    def __init__(self, command: Command, host: SimHost, client: int | None, now: float, done: simpy.Event) -> None:
        self.command = command
        self.cid: CommandId = command.command_id
        self.kind = type(command).__name__
        self.host: NodeId = host.id
        self.incarnation = host.incarnation
        self.client = client
        self.submitted_at = now
        self.session_sent: Session | None = None
        self.accepted_at: float | None = None
        self.accepted_session: Session | None = None
        self.instance_id: InstanceId | None = None
        self.first_chunk_at: float | None = None
        self.chunks = 0
        self.tokens = 0
        self.ended_at: float | None = None
        self.outcome = ""  # ok | rejected | error | abandoned | origin_crashed | accepted
        self.code: str | None = None
        self.message = ""
        self.finish_reason: str | None = None
        self.abandoned = False
        # Invariant 8: when set, the request must have ended by this (simulated) time.
        self.end_deadline: float | None = None
        self.done = done

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    @property
    def served(self) -> bool:
        """The stream ended normally (stop or length)."""
        return self.outcome == "ok" and self.finish_reason in ("stop", "length")


class ClientHub:
    """Every request of the run, by command id, and the open ones per origin host."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.env = world.env
        self.requests: dict[CommandId, Request] = {}
        self.open: dict[NodeId, dict[CommandId, Request]] = {h: {} for h in world.host_ids}
        self.stopping = False
        self.submitted = 0
        self.served = 0
        self.abandoned = 0
        self.failed = 0

    # --- from clients ---------------------------------------------------------------

    def submit(self, host: SimHost, command: Command, client: int | None = None) -> Request:
        """Send ``command`` to ``host``'s API; returns the request to wait on (``done``)."""
        assert command.command_id not in self.requests, f"command id {command.command_id} reused"
        req = Request(command, host, client, self.env.now, self.env.event())
        self.requests[req.cid] = req
        self.submitted += 1
        self.world.trace_note(host.id, "submit", f"{req.kind} {req.cid}")
        self.world.notify("request_submitted", req)
        if host.node is None:
            self._end(req, "origin_crashed", code="origin_crashed", message="connection refused")
            return req
        self.open[host.id][req.cid] = req
        host.feed(SubmitCommand(command=command))
        return req

    def abandon(self, req: Request) -> None:
        """The client walks away from ``req`` (closes its connection)."""
        if req.ended:
            return
        host = self.world.hosts[req.host]
        req.abandoned = True
        self.abandoned += 1
        self.world.notify("request_abandoned", req)
        self._end(req, "abandoned")
        if host.incarnation == req.incarnation:
            host.feed(AbandonRequest(command_id=req.cid))

    # --- from the origin node ----------------------------------------------------------

    def handled(self, host: SimHost, cid: CommandId, session: Session | None) -> None:
        """The node took the submission (it was sent in ``session``, if any)."""
        req = self.open[host.id].get(cid)
        if req is not None and req.session_sent is None:
            req.session_sent = session

    def on_chunk(self, host: SimHost, chunk: TokenChunk) -> None:
        req = self.open[host.id].get(chunk.command_id)
        if req is None:
            return
        if req.first_chunk_at is None:
            req.first_chunk_at = self.env.now
        req.chunks += 1
        req.tokens += len(chunk.token_ids)
        if chunk.finish_reason is None:
            return
        req.finish_reason = chunk.finish_reason
        if chunk.error is not None:
            self._end(req, "error", code=chunk.error.code, message=chunk.error.message)
        else:
            self.served += 1
            self._end(req, "ok")

    def on_completed(self, host: SimHost, cid: CommandId, result: CommandResult) -> None:
        req = self.open[host.id].get(cid)
        if req is None:
            return
        if result.status == "rejected":
            self._end(req, "rejected", code=result.code, message=result.message)
            return
        if result.status == "pending":
            return
        req.instance_id = result.instance_id
        if isinstance(req.command, SubmitTask):
            if req.accepted_at is None:
                req.accepted_at = self.env.now
                node = host.node
                req.accepted_session = node.session if node is not None else None
            return
        self._end(req, "accepted")

    def on_session_changed(self, host: SimHost, session: Session) -> None:
        """Requests sent in an older session must now end (invariant 8)."""
        bound = self.world.opts.failover_end_bound_s
        for cid in sorted(self.open[host.id]):
            req = self.open[host.id][cid]
            if req.session_sent is None:
                req.session_sent = session
            elif req.session_sent != session and req.end_deadline is None:
                req.end_deadline = self.env.now + bound
                self.world.notify("request_deadline", req)

    def master_lost(self, session: Session, hosts: list[NodeId]) -> None:
        """The master of ``session`` is gone for ``hosts``: their requests sent there must end.

        ``hosts`` heard the master until this fault, so an earlier loss had
        ended (the master came back in the same session): the bound counts
        from this loss.
        """
        bound = self.world.opts.failover_end_bound_s
        for h in hosts:
            for cid in sorted(self.open[h]):
                req = self.open[h][cid]
                if req.session_sent == session:
                    req.end_deadline = self.env.now + bound
                    self.world.notify("request_deadline", req)

    def host_crashed(self, host: SimHost) -> None:
        for cid in sorted(self.open[host.id]):
            self._end(self.open[host.id][cid], "origin_crashed", code="origin_crashed", message="connection reset")

    def _end(self, req: Request, outcome: str, *, code: str | None = None, message: str = "") -> None:
        assert not req.ended, f"request {req.cid} ended twice"
        req.ended_at = self.env.now
        req.outcome = outcome
        req.code = code
        req.message = message
        if outcome in ("error", "rejected"):
            self.failed += 1
        self.open[req.host].pop(req.cid, None)
        self.world.notify("request_ended", req)
        if not req.done.triggered:
            req.done.succeed(req)

    def open_requests(self) -> list[Request]:
        return [self.open[h][c] for h in sorted(self.open) for c in sorted(self.open[h])]


# --- client behaviours -------------------------------------------------------------------


def _pick_host(world: World, home: int) -> SimHost | None:
    ids = world.host_ids
    for i in range(len(ids)):
        host = world.hosts[ids[(home + i) % len(ids)]]
        if host.node is not None and not host.stopped_for_good:
            return host
    return None


def chat_client(
    world: World, k: int, *, until: float, model_id: ModelId | None = None, abandon_probability: float | None = None,
    abandon_after_s_max: float | None = None, think_s_mean: float | None = None, prefix: str = "chat",
) -> Generator[simpy.Event, Any, None]:
    """Client ``k``: chat requests until simulated time ``until`` (a simpy process)."""
    opts = world.opts
    rng = world.rngs(f"client:{prefix}:{k}")
    hub = world.clients
    model = model_id or ModelId(opts.model_id)
    p_abandon = opts.client_abandon_probability if abandon_probability is None else abandon_probability
    abandon_max = opts.client_abandon_after_s_max if abandon_after_s_max is None else abandon_after_s_max
    think = opts.client_think_s_mean if think_s_mean is None else think_s_mean
    n = 0
    while world.env.now < until and not hub.stopping:
        yield world.env.timeout(rng.expovariate(1.0 / think) if think > 0 else 0.0)
        if world.env.now >= until or hub.stopping:
            return
        host = _pick_host(world, k)
        if host is None:
            yield world.env.timeout(1.0)
            continue
        prompt = rng.randint(8, max(8, opts.client_prompt_tokens_max))
        max_tokens = rng.randint(1, max(1, opts.client_max_tokens_max)) if rng.random() < 0.5 else None
        params = GenerationParams(
            messages=(ChatMessage(role="user", content="p" * (4 * prompt)),),
            max_tokens=max_tokens,
            seed=rng.randrange(1 << 30),
        )
        cid = CommandId(f"{prefix}-{k}-{n}")
        n += 1
        req = hub.submit(host, SubmitTask(command_id=cid, model_id=model, params=params), client=k)
        if rng.random() < p_abandon:
            yield req.done | world.env.timeout(rng.uniform(0.0, abandon_max))
            if not req.ended:
                hub.abandon(req)
        else:
            yield req.done
        if req.outcome in ("error", "rejected", "origin_crashed"):
            yield world.env.timeout(opts.client_retry_backoff_s)


def place_model(
    world: World,
    model_id: str,
    *,
    deadline_s: float,
    excluded: tuple[NodeId, ...] = (),
    min_nodes: int = 1,
    sharding: str = "Pipeline",
    name: str = "place",
) -> Generator[simpy.Event, Any, InstanceId]:
    """Place ``model_id`` through some node's API; retry until placed or ``deadline_s``.

    Returns the instance id; raises ``PlacementFailed`` with the last answer.
    """
    hub = world.clients
    give_up = world.env.now + deadline_s
    attempt = 0
    last = "no answer"
    while world.env.now < give_up:
        host = _pick_host(world, attempt)
        if host is None:
            yield world.env.timeout(1.0)
            continue
        cid = CommandId(f"{name}-{attempt}")
        attempt += 1
        command = PlaceInstance(
            command_id=cid,
            model_id=ModelId(model_id),
            sharding=sharding,  # type: ignore[arg-type]
            min_nodes=min_nodes,
            excluded_nodes=tuple(sorted(excluded)),
        )
        req = hub.submit(host, command)
        yield req.done
        if req.outcome == "accepted" and req.instance_id is not None:
            return req.instance_id
        last = f"{req.outcome} ({req.code}): {req.message}"
        if req.outcome == "rejected" and req.code not in RETRYABLE_CODES:
            raise PlacementFailed(f"placing {model_id} was refused: {last}")
        yield world.env.timeout(1.0)
    raise PlacementFailed(f"placing {model_id} did not succeed within {deadline_s:g} s; last answer: {last}")
