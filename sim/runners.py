"""Simulated runner processes: load time, token rate, crashes and wedges.

Theory of operation
-------------------
A ``SimRunner`` stands in for one MLX runner subprocess (one rank of one
instance). It reports statuses the way the real runner does:

    Connecting -> Connected (ranks > 1) -> Loading -> Loaded -> WarmingUp
    -> Ready(context_ceiling) <-> Running

- **Group connect.** A rank of a multi-rank instance waits until every rank
  of its instance is up (a ``Group``), bounded by the spec's group-connect
  deadline; on expiry it reports ``RunnerFailed`` with a diagnosis naming the
  missing rank and its address, then exits with code 1. With
  ``ring_data_plane`` the ring also needs every hop: rank ``r - 1`` must reach
  rank ``r`` at its hostfile address (``Network.ring_hop_reachable``); on
  expiry the diagnosis names the first rank that could not be reached, its
  address and the rank that tried. A formed ring whose hop stays unreachable
  for ``runner_peer_loss_exit_s`` breaks: every rank exits with code 1.
- **Load.** Takes ``shard bytes / runner_load_gbps``; the footprint then
  counts against the host's available memory (telemetry sees it).
- **Serving.** Only rank 0 receives tasks. Each task prefills
  (``prompt tokens / prefill_tps``) then streams ``TokenChunk``s of
  ``runner_tokens_per_chunk`` tokens at ``decode_tps``, the last one with a
  finish reason and usage. At most ``max_concurrent_requests`` run at once;
  the rest queue. The runner enforces ``spec.context_ceiling`` with the
  core's ``admit`` (as the real runner does): a prompt that fills the window,
  or an explicit ``max_tokens`` that does not fit beside it, is refused before
  prefill; an omitted ``max_tokens`` is clamped to what is left
  (``finish_reason="length"``). Busy and idle edges
  are reported as ``Running`` and ``Ready``.
- **Faults.** A crash exits with a non-zero code (1 on load, -11 mid-task);
  a wedged runner goes silent and exits with code 86 after
  ``runner_wedge_exit_s``; the death of any rank makes the other connected
  ranks exit with code 1 (the ring is broken).

Invariants kept: a dead runner never reports again; a runner feeds its host
only within the host incarnation that started it; the host's runner memory
is released exactly once per load.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import simpy

from skulk.core.admission import DEFAULT_MAX_OUTPUT_TOKENS, Refused, admit
from skulk.core.ids import InstanceId, TaskId
from skulk.core.inputs import RunnerExited, RunnerOutput, RunnerStatusObserved
from skulk.core.instances import (
    GROUP_CONNECT_TIMEOUT,
    PipelineShardMetadata,
    RunnerConnected,
    RunnerConnecting,
    RunnerFailed,
    RunnerLoaded,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerSpec,
    RunnerStatus,
    RunnerWarmingUp,
)
from skulk.core.runner_policy import WEDGE_EXIT_CODE
from skulk.core.tasks import ChunkError, Task, TokenChunk, Usage

if TYPE_CHECKING:
    from sim.host import SimHost
    from sim.world import World

__all__ = ["SimRunner", "Group", "prompt_tokens_of"]

CRASH_ON_LOAD_EXIT_CODE = 1
CRASH_MID_TASK_EXIT_CODE = -11
PEER_LOST_EXIT_CODE = 1
_SPAWN_S = 0.05  # process start before the first report


def prompt_tokens_of(task: Task) -> int:
    """Prompt size the simulated tokenizer sees: one token per 4 characters."""
    params = task.params
    chars = 0
    if params.messages:
        chars = sum(len(m.content) for m in params.messages)
    elif params.prompt:
        chars = len(params.prompt)
    return max(1, chars // 4)


class Group:
    """The ranks of one instance that are up (for group connect and ring breaks)."""

    def __init__(self, env: simpy.Environment, instance_id: InstanceId, world_size: int) -> None:
        self.env = env
        self.instance_id = instance_id
        self.world_size = world_size
        self.ranks: dict[int, SimRunner] = {}
        self.changed = env.event()

    def complete(self) -> bool:
        return len(self.ranks) == self.world_size

    def missing(self) -> list[int]:
        return [r for r in range(self.world_size) if r not in self.ranks]

    def _poke(self) -> None:
        event, self.changed = self.changed, self.env.event()
        event.succeed()

    def join(self, runner: SimRunner) -> None:
        self.ranks[runner.rank] = runner
        self._poke()

    def leave(self, runner: SimRunner) -> None:
        if self.ranks.get(runner.rank) is not runner:
            return
        del self.ranks[runner.rank]
        self._poke()
        for rank in sorted(self.ranks):
            peer = self.ranks[rank]
            if peer.connected and peer.alive:
                peer.peer_lost(runner.rank)


class _TaskRun:
    __slots__ = ("task", "active", "seq")

    def __init__(self, task: Task) -> None:
        self.task = task
        self.active = True
        self.seq = 0


class SimRunner:
    """One simulated runner process on ``host`` for ``spec``."""

    def __init__(self, world: World, host: SimHost, spec: RunnerSpec) -> None:
        self.world = world
        self.env = world.env
        self.host = host
        self.spec = spec
        self.rng = world.rngs(f"runner:{host.id}")
        self.incarnation = host.incarnation
        self.rank = spec.shard.device_rank
        self.alive = True
        self.stopping = False
        self.connected = spec.shard.world_size == 1
        self.ready = False
        self.wedged = False
        self.busy = False
        self.loaded_bytes = 0
        self.tasks: dict[TaskId, _TaskRun] = {}
        self.queue: list[Task] = []
        self.exit_code: int | None = None
        inst = host.node.state.instances.get(spec.instance_id) if host.node is not None else None
        self.footprint_bytes = inst.memory_by_node.get(host.id, 0) if inst is not None else 0
        # The node of each rank (ring order), for the data plane's hop checks.
        self.ring_nodes = tuple(h.node_id for h in inst.ring) if inst is not None else ()
        self.group = world.group(spec.instance_id, spec.shard.world_size)
        self.group.join(self)
        world.runners_started += 1
        self.env.process(self._life())

    # --- reports -------------------------------------------------------------------

    def _report(self, status: RunnerStatus) -> None:
        if self.alive and not self.stopping:
            self.world.observe_runner_status(self, status)
            self.host.feed_if(self.incarnation, RunnerStatusObserved(runner_id=self.spec.runner_id, status=status))

    def _dead(self) -> bool:
        return not self.alive or self.stopping or self.wedged

    # --- lifecycle -------------------------------------------------------------------

    def _life(self) -> Generator[simpy.Event, Any, None]:
        opts = self.world.opts
        yield self.env.timeout(_SPAWN_S)
        if self._dead():
            return
        spec = self.spec
        if spec.shard.world_size > 1:
            self._report(RunnerConnecting())
            deadline = self.env.now + spec.group_connect_deadline_s
            net = self.world.network
            while True:
                while not self._ring_formable():
                    remaining = deadline - self.env.now
                    if remaining <= 0:
                        self._group_connect_failed()
                        return
                    waits = [self.group.changed, self.env.timeout(remaining)]
                    if opts.ring_data_plane:
                        waits.append(net.changed)
                    yield self.env.any_of(waits)
                    if self._dead():
                        return
                yield self.env.timeout(opts.runner_connect_s)
                if self._dead():
                    return
                if self._ring_formable():
                    break
            self.connected = True
            self._report(RunnerConnected())
            if opts.ring_data_plane:
                self.env.process(self._watch_ring())
        host = self.host
        crash_on_load = host.crash_loop > 0 or (
            opts.runner_crash_on_load_probability > 0 and self.rng.random() < opts.runner_crash_on_load_probability
        )
        wedge = host.wedge_next > 0
        if wedge:
            host.wedge_next -= 1
        layers = _layers(spec)
        load_s = self._shard_bytes() / (opts.runner_load_gbps * 1e9)
        self._report(RunnerLoading(layers_loaded=0, layers_total=layers))
        if crash_on_load:
            yield self.env.timeout(load_s * self.rng.uniform(0.1, 0.9))
            if not self._dead():
                self.exit(CRASH_ON_LOAD_EXIT_CODE)
            return
        if wedge:
            yield self.env.timeout(load_s * 0.5)
            if not self._dead():
                self.wedge()
            return
        yield self.env.timeout(load_s / 2)
        if self._dead():
            return
        self._report(RunnerLoading(layers_loaded=layers // 2, layers_total=layers))
        yield self.env.timeout(load_s / 2)
        if self._dead():
            return
        self.loaded_bytes = self.footprint_bytes
        host.ram_runner_bytes += self.loaded_bytes
        self._report(RunnerLoaded())
        self._report(RunnerWarmingUp())
        yield self.env.timeout(opts.runner_warmup_s)
        if self._dead():
            return
        self.ready = True
        self._report(RunnerReady(context_ceiling=spec.context_ceiling))
        self._pump()

    def _unreachable_rank(self) -> int | None:
        """With the data plane on: the first rank its predecessor's node cannot reach at its address.

        A property of the network and the ring (which node holds which rank),
        whether or not the ranks' runners are up, so every rank that gives up
        names the same root cause.
        """
        if not self.world.opts.ring_data_plane:
            return None
        net = self.world.network
        nodes = self.ring_nodes
        hosts = self.spec.hosts
        assert len(hosts) == len(nodes) == self.group.world_size, (hosts, nodes, self.group.world_size)
        for rank in range(len(nodes)):
            if not net.ring_hop_reachable(nodes[rank - 1], nodes[rank], hosts[rank]):
                return rank
        return None

    def _ring_formable(self) -> bool:
        """Every rank is up and (with the data plane on) every hop of the ring connects."""
        return self.group.complete() and self._unreachable_rank() is None

    def _watch_ring(self) -> Generator[simpy.Event, Any, None]:
        """A formed ring breaks when one of its hops stays unreachable (data plane on)."""
        net = self.world.network
        while True:
            yield net.changed
            if self._dead() or not self.group.complete():
                return  # gone, or a rank left (``peer_lost`` handles that)
            if self._unreachable_rank() is not None:
                self.world.call_later(self.world.opts.runner_peer_loss_exit_s, self._ring_broken_exit)
                return

    def _ring_broken_exit(self) -> None:
        if self.alive and not self.stopping and not self.wedged and self._unreachable_rank() is not None:
            self.exit(PEER_LOST_EXIT_CODE)
        elif self.alive and not self.stopping and not self.wedged:
            self.env.process(self._watch_ring())  # the hop came back in time: TCP rode it out

    def _group_connect_failed(self) -> None:
        missing = self.group.missing()
        # The network's verdict first (the root cause), then ranks that are not up.
        unreachable = self._unreachable_rank()
        rank = unreachable if unreachable is not None else (missing[0] if missing else -1)
        address = self.spec.hosts[rank] if 0 <= rank < len(self.spec.hosts) else "unknown address"
        deadline = f"group connect deadline ({self.spec.group_connect_deadline_s:g} s) expired"
        if unreachable is not None:
            world = self.group.world_size
            pred = (unreachable - 1) % world
            text = (
                f"{deadline}: rank {unreachable} at {address} is unreachable from rank {pred} "
                f"on node {self.ring_nodes[pred]}"
            )
        else:
            text = f"{deadline}: rank {rank} at {address} never connected"
        self._report(
            RunnerFailed(error_message=text, permanent=False, code=GROUP_CONNECT_TIMEOUT, unreachable_rank=unreachable)
        )
        self.exit(1)

    def _shard_bytes(self) -> int:
        card = self.world.cards.get(self.spec.model_id)
        if card is None:
            return 1
        shard = self.spec.shard
        if isinstance(shard, PipelineShardMetadata):
            return max(1, card.weight_bytes * (shard.end_layer - shard.start_layer) // shard.n_layers)
        return max(1, card.weight_bytes // shard.world_size)

    def wedge(self) -> None:
        """Go silent (a wedged GPU); exit with code 86 after the wedge deadline."""
        if not self.alive or self.wedged:
            return
        self.wedged = True
        for run in self.tasks.values():
            run.active = False
        self.world.call_later(self.world.opts.runner_wedge_exit_s, self._wedge_exit)

    def _wedge_exit(self) -> None:
        if self.alive:
            self.exit(WEDGE_EXIT_CODE)

    def peer_lost(self, rank: int) -> None:
        self.world.call_later(self.world.opts.runner_peer_loss_exit_s, self._peer_lost_exit)

    def _peer_lost_exit(self) -> None:
        if self.alive and not self.stopping and not self.group.complete():
            self.exit(PEER_LOST_EXIT_CODE)

    def stop(self) -> None:
        """The worker asked it to stop: exit 0 after the shutdown time."""
        if self.stopping or not self.alive:
            return
        self.stopping = True
        for run in self.tasks.values():
            run.active = False
        self.world.call_later(self.world.opts.runner_shutdown_s, self.exit, 0)

    def exit(self, code: int) -> None:
        """The process exits with ``code``; the node hears ``RunnerExited``."""
        if not self.alive:
            return
        self.kill(notify_node=False)
        self.exit_code = code
        self.host.feed_if(self.incarnation, RunnerExited(runner_id=self.spec.runner_id, exit_code=code))

    def kill(self, *, notify_node: bool) -> None:
        """Gone at once (host crash): no more reports, memory and rank released."""
        if not self.alive:
            return
        self.alive = False
        self.ready = False
        for run in self.tasks.values():
            run.active = False
        self.tasks.clear()
        self.queue.clear()
        if self.loaded_bytes and self.host.incarnation == self.incarnation:
            self.host.ram_runner_bytes = max(0, self.host.ram_runner_bytes - self.loaded_bytes)
        self.loaded_bytes = 0
        self.group.leave(self)
        if self.host.incarnation == self.incarnation:
            self.host.runner_exited(self)
        if notify_node:
            self.host.feed_if(self.incarnation, RunnerExited(runner_id=self.spec.runner_id, exit_code=-9))

    # --- tasks ---------------------------------------------------------------------------

    def dispatch(self, task: Task) -> None:
        if self.wedged or self.stopping or not self.alive:
            return
        if task.task_id in self.tasks or any(t.task_id == task.task_id for t in self.queue):
            return
        self.queue.append(task)
        self._pump()

    def cancel(self, task_id: TaskId) -> None:
        run = self.tasks.get(task_id)
        if run is not None and run.active:
            run.active = False
            del self.tasks[task_id]
            self._emit(run, finish_reason="cancelled")
            self._pump()
            return
        for i, task in enumerate(self.queue):
            if task.task_id == task_id:
                del self.queue[i]
                self._emit(_TaskRun(task), finish_reason="cancelled")
                return

    def _pump(self) -> None:
        if not self.ready or self._dead():
            return
        while self.queue and len(self.tasks) < self.spec.max_concurrent_requests:
            task = self.queue.pop(0)
            run = _TaskRun(task)
            self.tasks[task.task_id] = run
            self.env.process(self._generate(run))
        if self.tasks and not self.busy:
            self.busy = True
            self._report(RunnerRunning(active_tasks=len(self.tasks)))
        elif not self.tasks and self.busy:
            self.busy = False
            self._report(RunnerReady(context_ceiling=self.spec.context_ceiling))

    def _emit(self, run: _TaskRun, *, text: str = "", token_ids: tuple[int, ...] = (), **fields: Any) -> None:
        task = run.task
        chunk = TokenChunk(
            command_id=task.command_id, task_id=task.task_id, seq=run.seq, text=text, token_ids=token_ids, **fields
        )
        run.seq += 1
        self.world.tokens_streamed += len(token_ids)
        self.host.feed_if(self.incarnation, RunnerOutput(runner_id=self.spec.runner_id, chunk=chunk))

    def _generate(self, run: _TaskRun) -> Generator[simpy.Event, Any, None]:
        opts = self.world.opts
        task = run.task
        prompt = prompt_tokens_of(task)
        # The same decision the real runner makes after tokenising (skulk.engine.batch):
        # a prompt that fills the window, or an explicit max_tokens that does not fit
        # beside it, is refused before prefill; an omitted max_tokens is clamped.
        decision = admit(
            prompt_tokens=prompt,
            max_tokens=task.params.max_tokens,
            ceiling=self.spec.context_ceiling,
            default_max_tokens=DEFAULT_MAX_OUTPUT_TOKENS,
        )
        if isinstance(decision, Refused):
            self._finish(run)
            self._emit(
                run,
                finish_reason="error",
                error=ChunkError(message=decision.message, type=decision.type, code=decision.code),
            )
            return
        limit = decision.max_tokens
        natural = 1 + int(self.rng.expovariate(1.0 / max(1, opts.client_output_tokens_mean)))
        count = max(1, min(limit, natural))
        finish = "stop" if natural <= limit else "length"
        crash_at = -1
        if opts.runner_crash_mid_task_probability > 0 and self.rng.random() < opts.runner_crash_mid_task_probability:
            crash_at = self.rng.randrange(0, count)
        yield self.env.timeout(prompt / opts.runner_prefill_tps)
        step = opts.runner_tokens_per_chunk
        done = 0
        while done < count:
            k = min(step, count - done)
            yield self.env.timeout(k / opts.runner_decode_tps)
            if not run.active or not self.alive:
                return
            if crash_at >= 0 and done <= crash_at < done + k:
                self.exit(CRASH_MID_TASK_EXIT_CODE)
                return
            done += k
            ids = tuple(range(done - k, done))
            if done >= count:
                self._finish(run)
                self._emit(
                    run,
                    text="x" * k,
                    token_ids=ids,
                    finish_reason=finish,
                    usage=Usage(prompt_tokens=prompt, completion_tokens=count, total_tokens=prompt + count),
                )
                self._pump()
                return
            self._emit(run, text="x" * k, token_ids=ids)

    def _finish(self, run: _TaskRun) -> None:
        run.active = False
        self.tasks.pop(run.task.task_id, None)


def _layers(spec: RunnerSpec) -> int:
    shard = spec.shard
    if isinstance(shard, PipelineShardMetadata):
        return shard.end_layer - shard.start_layer
    return shard.n_layers
