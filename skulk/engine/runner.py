"""The runner process: one rank of one instance, serving tasks over the IPC protocol.

Run as ``python -m skulk.engine.runner --spec-json JSON --model-path DIR
--cmd-fd R --event-fd W [--parent-pid PID]`` (see ``skulk.engine.protocol``
for the frames and the lifecycle, ``docs/engine.md`` for the knobs).

Theory of operation
-------------------
Three threads, one job each:

- the *main* thread owns MLX: it connects the ring (ranks > 1), loads the
  shard, warms up, then runs the engine (rank 0) or follows rank 0's plans
  (other ranks);
- the *reader* thread decodes parent messages into a queue; EOF on the command
  pipe means the parent died, and the process exits at once;
- the *watchdog* thread sends heartbeats and enforces deadlines: a step with
  no progress for ``SKULK_PIPELINE_EVAL_TIMEOUT_SECONDS`` is a wedge (report
  ``RunnerFailed(permanent=True)``, exit 86); warmup past the spec's
  ``warmup_deadline_s`` fails the runner (exit 1). It never needs the main
  thread (MLX releases the GIL while it computes).

Fast BLAS (``skulk.engine.accel``) is enabled before MLX is first imported.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any

from skulk.core.admission import DEFAULT_MAX_OUTPUT_TOKENS
from skulk.core.codec import decode_json
from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, TaskId
from skulk.core.instances import (
    GROUP_CONNECT_TIMEOUT,
    KvUse,
    PipelineShardMetadata,
    RunnerConnected,
    RunnerConnecting,
    RunnerFailed,
    RunnerIdle,
    RunnerLoaded,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerShutdown,
    RunnerShuttingDown,
    RunnerSpec,
    RunnerWarmingUp,
)
from skulk.core.tasks import ChunkError, GenerationParams, Task, TokenChunk, Usage
from skulk.engine.protocol import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARENT_GONE,
    EXIT_WEDGED,
    CancelTask,
    Chunk,
    Heartbeat,
    ParentMessage,
    RunTask,
    Shutdown,
    StatusChanged,
    encode_frame,
    read_frame,
)

__all__ = ["main", "RunnerSettings", "env_value", "default_blas_threads"]

_SHUTDOWN_GRACE_S = 5.0
WEDGED = "wedged"  # RunnerFailed.code of a wedge (exit 86)
_WARMUP_TASK_ID = "__skulk_warmup__"


def env_value(name: str, default: str) -> str:
    """``SKULK_<name>``, else the legacy ``EXO_<name>``, else ``default``."""
    for key in (f"SKULK_{name}", f"EXO_{name}"):
        value = os.environ.get(key)
        if value is not None and value.strip() != "":
            return value.strip()
    return default


class RunnerSettings:
    """Environment knobs the runner reads once at start (units in the names)."""

    def __init__(self) -> None:
        self.eval_timeout_s = float(env_value("PIPELINE_EVAL_TIMEOUT_SECONDS", "60"))
        self.default_max_tokens = int(env_value("MAX_OUTPUT_TOKENS", str(DEFAULT_MAX_OUTPUT_TOKENS)))
        self.prefill_chunk_tokens = int(env_value("PREFILL_CHUNK_TOKENS", "256"))
        self.prefill_step_tokens = int(env_value("PREFILL_STEP_TOKENS", "2048"))
        self.heartbeat_s = float(env_value("RUNNER_HEARTBEAT_SECONDS", "1.0"))
        # Distributed idle: rank 0's tick interval grows from min to max (seconds).
        self.idle_tick_min_s = float(env_value("IDLE_TICK_MIN_SECONDS", "0.01"))
        self.idle_tick_max_s = float(env_value("IDLE_TICK_MAX_SECONDS", "0.1"))
        self.default_temperature = float(env_value("DEFAULT_TEMPERATURE", "1.0"))
        self.pdeathsig = env_value("RUNNER_PDEATHSIG", "1") not in ("0", "false", "off", "no")
        # Test knob: the engine hangs inside this step number (0: never).
        self.wedge_at_step = int(env_value("TEST_WEDGE_AT_STEP", "0"))
        # Test knob: stay in RunnerLoading this long before loading (a slow load, for event-storm tests).
        self.load_delay_s = float(env_value("TEST_LOAD_DELAY_SECONDS", "0"))
        # The KV budget (docs/engine.md): how long a request may wait for KV before a 503,
        # the prefix cache's bound ("auto": what the budget leaves; 0: off), and an
        # operator's override of the KV bytes placement reserved (0: placement's figure).
        self.kv_queue_wait_s = float(env_value("KV_QUEUE_WAIT_SECONDS", "30"))
        cache = env_value("PREFIX_CACHE_BYTES", "auto")
        self.prefix_cache_bytes: int | None = None if cache.lower() == "auto" else int(cache)
        self.kv_budget_bytes = int(env_value("KV_BUDGET_BYTES", "0"))
        assert self.kv_queue_wait_s >= 0 and self.kv_budget_bytes >= 0
        assert self.prefix_cache_bytes is None or self.prefix_cache_bytes >= 0
        assert self.eval_timeout_s > 0 and self.heartbeat_s > 0
        assert 0 < self.idle_tick_min_s <= self.idle_tick_max_s, (self.idle_tick_min_s, self.idle_tick_max_s)
        assert self.default_max_tokens > 0 and self.prefill_chunk_tokens > 0


class _Events:
    """Frames to the parent, from any thread (one lock, whole frames)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, *messages: Any) -> None:
        data = b"".join(encode_frame(m) for m in messages)
        with self._lock:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self.fd, view) :]
            except (BrokenPipeError, OSError):
                os._exit(EXIT_PARENT_GONE)  # nobody is listening any more

    def status(self, status: Any) -> None:
        self.send(StatusChanged(status=status))


def _log(rank: int, message: str) -> None:
    sys.stderr.write(f"[skulk-runner rank {rank} pid {os.getpid()}] {message}\n")
    sys.stderr.flush()


def _set_parent_death_signal(parent_pid: int | None) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    # The parent may have died before prctl took effect.
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(EXIT_PARENT_GONE)


class _Runner:
    def __init__(self, spec: RunnerSpec, model_path: str, cmd_fd: int, events: _Events, settings: RunnerSettings) -> None:
        self.spec = spec
        self.model_path = model_path
        self.cmd_fd = cmd_fd
        self.events = events
        self.settings = settings
        self.rank = spec.shard.device_rank
        self.world = spec.shard.world_size
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.started = time.monotonic()
        self.engine: Any = None
        # Watchdog inputs (plain attributes; read from the watchdog thread).
        self.follower_step_since: float | None = None
        self.tick_since: float | None = None  # rank 0 inside an idle tick (a collective)
        self.follower_steps = 0
        self.phase_deadline: tuple[float, str] | None = None
        self.shutdown_requested = threading.Event()
        self.stopping = False
        self.prefix_cache_ok = True  # every rank can hold prefix-cache entries (agreed after loading)
        self.kv_use: KvUse | None = None  # rank 0's KV ledger, refreshed by the main thread each loop

    # --- threads -------------------------------------------------------------

    def reader(self) -> None:
        while True:
            try:
                msg = read_frame(self.cmd_fd, ParentMessage)
            except Exception as exc:  # a malformed frame: the parent is broken
                _log(self.rank, f"bad frame from parent: {exc}; exiting")
                os._exit(EXIT_PARENT_GONE)
            if msg is None:
                _log(self.rank, "command pipe closed: parent is gone; exiting")
                os._exit(EXIT_PARENT_GONE)
            if self.rank != 0:
                self._follower_message(msg)
            else:
                self.inbox.put(msg)

    def _follower_message(self, msg: Any) -> None:
        if isinstance(msg, RunTask):
            task = msg.task
            error = ChunkError(
                message=f"task sent to rank {self.rank}; only rank 0 of an instance accepts tasks",
                type="server_error",
                code="wrong_rank",
            )
            chunk = TokenChunk(
                command_id=task.command_id,
                task_id=task.task_id,
                seq=0,
                finish_reason="error",
                usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0),
                error=error,
            )
            self.events.send(Chunk(chunk=chunk))
        elif isinstance(msg, Shutdown) and not self.shutdown_requested.is_set():
            self.shutdown_requested.set()
            self.events.status(RunnerShuttingDown())
            # Rank 0's shutdown broadcast normally releases the main thread;
            # if it never comes, leave anyway.
            threading.Timer(_SHUTDOWN_GRACE_S, self._forced_exit).start()

    def _forced_exit(self) -> None:
        _log(self.rank, "no shutdown from rank 0 within the grace period; exiting")
        self.events.status(RunnerShutdown())
        os._exit(EXIT_OK)

    def watchdog(self) -> None:
        next_beat = time.monotonic()
        tick = min(0.25, self.settings.heartbeat_s)
        while True:
            time.sleep(tick)
            now = time.monotonic()
            since = self._step_since()
            if since is not None and now - since > self.settings.eval_timeout_s and not self.stopping:
                message = (
                    f"wedged: rank {self.rank} made no progress for {now - since:.1f}s "
                    f"(SKULK_PIPELINE_EVAL_TIMEOUT_SECONDS={self.settings.eval_timeout_s:g}); exiting {EXIT_WEDGED}"
                )
                _log(self.rank, message)
                self.events.status(RunnerFailed(error_message=message, permanent=True, code=WEDGED))
                os._exit(EXIT_WEDGED)
            if self.phase_deadline is not None and now > self.phase_deadline[0]:
                message = self.phase_deadline[1]
                _log(self.rank, message)
                self.events.status(RunnerFailed(error_message=message, code="warmup_deadline"))
                os._exit(EXIT_FAILED)
            if now >= next_beat:
                next_beat = now + self.settings.heartbeat_s
                engine = self.engine
                self.events.send(
                    Heartbeat(
                        rank=self.rank,
                        active_tasks=0 if engine is None else engine.active_tasks,
                        queued_tasks=0 if engine is None else engine.queued_tasks,
                        steps=self.follower_steps if engine is None else engine.steps,
                        uptime_s=round(now - self.started, 3),
                        kv=self.kv_use,
                    )
                )

    def _step_since(self) -> float | None:
        if self.tick_since is not None:
            return self.tick_since
        if self.engine is not None:
            return self.engine.step_started_at
        return self.follower_step_since

    # --- main thread ---------------------------------------------------------

    def fail(
        self, message: str, *, permanent: bool = False, code: str | None = None, unreachable_rank: int | None = None
    ) -> None:
        _log(self.rank, f"failed: {message}")
        self.events.status(
            RunnerFailed(error_message=message, permanent=permanent, code=code, unreachable_rank=unreachable_rank)
        )
        os._exit(EXIT_FAILED)

    def run(self) -> None:
        blas = _enable_fast_blas()
        self.events.status(RunnerIdle())
        threading.Thread(target=self.reader, name="skulk-runner-reader", daemon=True).start()
        threading.Thread(target=self.watchdog, name="skulk-runner-watchdog", daemon=True).start()
        _log(self.rank, f"starting: instance {self.spec.instance_id}, rank {self.rank}/{self.world}, BLAS {blas}")

        from skulk.engine.dist import GroupConnectError, PlanChannel, check_agreement, connect_group
        from skulk.engine.shard import load_shard

        group = None
        if self.world > 1:
            if len(self.spec.hosts) != self.world:
                self.fail(f"spec lists {len(self.spec.hosts)} hosts for a world of {self.world}")
            self.events.status(RunnerConnecting())
            try:
                group = connect_group(
                    self.spec.hosts, self.rank, self.spec.group_connect_deadline_s, event_fd=self.events.fd
                )
            except GroupConnectError as exc:
                self.fail(str(exc), code=GROUP_CONNECT_TIMEOUT, unreachable_rank=exc.unreachable_rank)
            self.events.status(RunnerConnected())

        def progress(done: int, total: int) -> None:
            self.events.status(RunnerLoading(layers_loaded=done, layers_total=total))

        shard = self.spec.shard
        local_layers = (
            shard.end_layer - shard.start_layer if isinstance(shard, PipelineShardMetadata) and self.world > 1 else shard.n_layers
        )
        self.events.status(RunnerLoading(layers_loaded=0, layers_total=local_layers))
        if self.settings.load_delay_s > 0:
            time.sleep(self.settings.load_delay_s)
        try:
            loaded = load_shard(self.model_path, self.spec.shard, group, on_progress=progress)
        except Exception as exc:
            self.fail(f"could not load {self.model_path} for {self.spec.model_id}: {exc}")
        self.events.status(RunnerLoaded())

        ceiling = self.spec.context_ceiling
        if ceiling <= 0:
            ceiling = int(loaded.config.get("max_position_embeddings", 4096))
        if group is not None:
            self._check_ranks(group, loaded, ceiling, check_agreement)
        # Speculative decoding: set up on every rank at this same point (a collective).
        self.speculator: Any = None
        if self.spec.speculation.drafter != "none":
            from skulk.engine.speculative.engine import build_speculator

            self.speculator, why = build_speculator(self.spec, loaded, self.model_path, group)
            _log(self.rank, why)

        self.events.status(RunnerWarmingUp())
        self.phase_deadline = (
            time.monotonic() + self.spec.warmup_deadline_s,
            f"warmup did not finish within {self.spec.warmup_deadline_s:g}s (SKULK_WARMUP_DEADLINE_SECONDS)",
        )
        if self.rank == 0:
            self._serve_rank0(loaded, ceiling, None if group is None else PlanChannel(group))
        else:
            self._follow(loaded, ceiling, PlanChannel(group))

    def _check_ranks(self, group: Any, loaded: Any, ceiling: int, check_agreement: Any) -> None:
        shard = self.spec.shard
        start, end = (shard.start_layer, shard.end_layer) if isinstance(shard, PipelineShardMetadata) else (0, 0)
        kind = 1 if isinstance(shard, PipelineShardMetadata) else 2
        from skulk.engine.prefix_cache import prefix_cache_support

        why_not = prefix_cache_support(loaded.shard.new_cache())
        facts = [self.rank, self.world, kind, loaded.n_layers, int(loaded.config.get("vocab_size", 0)), ceiling, start, end]
        facts.append(int(why_not is None))
        rows = check_agreement(group, facts)
        # Entries live on every rank: all must be able to hold them (rank 0 decides for all).
        self.prefix_cache_ok = all(row[8] for row in rows)
        if why_not is not None:
            _log(self.rank, f"no prefix cache: {why_not}")
        problems = []
        for r, row in enumerate(rows):
            if row[0] != r or row[1:6] != rows[0][1:6]:
                problems.append(f"rank {r} reports (rank, world, kind, layers, vocab, ceiling) = {row[:6]}, rank 0 {rows[0][:6]}")
        if kind == 1:
            expected = 0
            for r, row in enumerate(rows):
                if row[6] != expected:
                    problems.append(f"rank {r} starts at layer {row[6]}, expected {expected} (pipeline stages go in rank order)")
                expected = row[7]
            if expected != loaded.n_layers:
                problems.append(f"the pipeline ends at layer {expected} of {loaded.n_layers}")
        if problems:
            self.fail("ranks disagree about the instance: " + "; ".join(problems))

    def _follow(self, loaded: Any, ceiling: int, channel: Any) -> None:
        from skulk.engine.batch import follow

        self.phase_deadline = None
        self.events.status(RunnerReady(context_ceiling=ceiling))

        def on_step(starting: bool) -> None:
            if starting:
                self.follower_step_since = time.monotonic()
            else:
                self.follower_step_since = None
                self.follower_steps += 1

        try:
            if self.speculator is not None:
                from skulk.engine.speculative.engine import spec_follow

                spec_follow(loaded.shard, channel.recv, self.speculator, on_step)
            else:
                follow(loaded.shard, channel.recv, on_step)
        except Exception as exc:
            self.fail(f"lost step with rank 0: {exc}")
        self.stopping = True
        if not self.shutdown_requested.is_set():
            self.events.status(RunnerShuttingDown())
        self.events.status(RunnerShutdown())
        os._exit(EXIT_OK)

    def _serve_rank0(self, loaded: Any, ceiling: int, channel: Any) -> None:
        from skulk.engine.batch import Engine, EngineConfig

        config = EngineConfig(
            context_ceiling=ceiling,
            max_concurrent=max(1, self.spec.max_concurrent_requests),
            default_max_tokens=self.settings.default_max_tokens,
            prefill_step_tokens=max(self.settings.prefill_step_tokens, self.settings.prefill_chunk_tokens),
            prefill_chunk_tokens=self.settings.prefill_chunk_tokens,
            default_temperature=self.settings.default_temperature,
            kv_reserved_bytes=self.settings.kv_budget_bytes or self.spec.kv_reserved_bytes,
            kv_queue_wait_s=self.settings.kv_queue_wait_s,
            prefix_cache_bytes=self.settings.prefix_cache_bytes if self.prefix_cache_ok else 0,
        )
        warming = True

        def emit(chunks: list[TokenChunk]) -> None:
            real = [Chunk(chunk=c) for c in chunks if not (warming and c.task_id == _WARMUP_TASK_ID)]
            if real:
                self.events.send(*real)

        engine_cls: Any = Engine
        extra: dict[str, Any] = {}
        if self.speculator is not None:
            from skulk.engine.speculative.engine import SpeculativeEngine

            engine_cls, extra = SpeculativeEngine, {"speculator": self.speculator}
        engine = engine_cls(loaded.shard, loaded.tokenizer, config, emit, None if channel is None else channel.send, **extra)
        self.engine = engine
        self._warmup(engine)
        engine.clear_prefix_cache()  # warmup leaves nothing behind
        self.kv_use = _kv_use(engine)
        _log(self.rank, _describe_kv(engine))
        warming = False
        # The wedge knob applies to served steps, not to warmup.
        if self.settings.wedge_at_step:
            engine.config = dataclasses.replace(config, wedge_at_step=engine.steps + self.settings.wedge_at_step)
        self.phase_deadline = None
        self.events.status(RunnerReady(context_ceiling=ceiling))
        reported = 0
        idle_wait_s: float | None = None  # None: the other ranks are listening for a plan
        try:
            while True:
                try:
                    # Block while idle; only peek while generating.
                    if engine.has_work():
                        msg = self.inbox.get_nowait()
                    else:
                        wait = 1.0 if channel is None else (idle_wait_s or self.settings.idle_tick_min_s)
                        msg = self.inbox.get(timeout=wait)
                except queue.Empty:
                    msg = None
                    if channel is not None and not engine.has_work():
                        idle_wait_s = self._idle_tick(channel, idle_wait_s)
                while msg is not None:
                    if isinstance(msg, RunTask):
                        engine.submit(msg.task)
                    elif isinstance(msg, CancelTask):
                        engine.cancel(msg.task_id)
                    elif isinstance(msg, Shutdown):
                        self._shutdown_rank0(engine)
                    try:
                        msg = self.inbox.get_nowait()
                    except queue.Empty:
                        msg = None
                if engine.has_work():
                    idle_wait_s = None
                    engine.step()
                    self.kv_use = _kv_use(engine)
                active = engine.active_tasks
                if active != reported:
                    reported = active
                    self.events.status(RunnerRunning(active_tasks=active) if active else RunnerReady(context_ceiling=ceiling))
        except Exception as exc:
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            _log(self.rank, traceback.format_exc())
            for request in list(engine._by_id.values()):
                error = ChunkError(message=f"runner failed: {detail}", type="server_error", code="runner_failed")
                n_prompt, n_gen = len(request.prompt), len(request.generated)
                chunk = TokenChunk(
                    command_id=request.task.command_id,
                    task_id=request.task_id,
                    seq=request.next_seq,
                    finish_reason="error",
                    usage=Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, total_tokens=n_prompt + n_gen),
                    error=error,
                )
                self.events.send(Chunk(chunk=chunk))
            self.fail(f"engine step failed: {detail}")

    def _idle_tick(self, channel: Any, waited_s: float | None) -> float:
        """Idle in a distributed instance: let the other ranks sleep instead of spin.

        MLX's ring backend busy-polls while a rank waits in a collective, so
        followers idling in ``recv`` would each burn a core. Rank 0 instead
        broadcasts a tick naming how long it will wait before the next
        collective; followers sleep that long (inside ``PlanChannel.recv``).
        The wait doubles from ``SKULK_IDLE_TICK_MIN_SECONDS`` up to
        ``SKULK_IDLE_TICK_MAX_SECONDS``, so a request arriving during an idle
        spell waits at most that long for the other ranks to wake. Returns the
        announced wait.
        """
        low, high = self.settings.idle_tick_min_s, self.settings.idle_tick_max_s
        announce = min(high, low if waited_s is None else waited_s * 2)
        self.tick_since = time.monotonic()
        try:
            channel.tick(announce)
        finally:
            self.tick_since = None
        return announce

    def _warmup(self, engine: Any) -> None:
        task = Task(
            task_id=TaskId(_WARMUP_TASK_ID),
            command_id=CommandId(_WARMUP_TASK_ID),
            origin=NodeId(self.spec.node_id),
            instance_id=InstanceId(self.spec.instance_id),
            model_id=ModelId(self.spec.model_id),
            kind="completion",
            params=GenerationParams(prompt="Skulk warms up its runner.", max_tokens=4, temperature=0.0),
        )
        started = time.monotonic()
        engine.submit(task)
        engine.drain()
        _log(self.rank, f"warmup took {time.monotonic() - started:.2f}s")

    def _shutdown_rank0(self, engine: Any) -> None:
        self.stopping = True
        self.events.status(RunnerShuttingDown())
        engine.cancel_all()
        # Tell the other ranks; never hang on ranks that are already gone.
        timer = threading.Timer(_SHUTDOWN_GRACE_S, lambda: (self.events.status(RunnerShutdown()), os._exit(EXIT_OK)))
        timer.daemon = True
        timer.start()
        try:
            engine.stop_followers()
        except Exception as exc:
            _log(self.rank, f"could not tell the other ranks to stop: {exc}")
        self.events.status(RunnerShutdown())
        os._exit(EXIT_OK)


def _kv_use(engine: Any) -> KvUse:
    snap = engine.kv_snapshot()
    return KvUse(
        budget_positions=snap.budget_positions,
        rows_positions=snap.rows_positions,
        cache_positions=snap.cache_positions,
        cache_entries=snap.cache_entries,
        bytes_per_position=snap.bytes_per_position,
        prefix_hits=snap.hits,
        prefix_misses=snap.misses,
        positions_reused=snap.positions_reused,
        refused=snap.refused,
    )


def _describe_kv(engine: Any) -> str:
    snap, kv = engine.kv_snapshot(), engine.kv
    per = snap.bytes_per_position
    cache = "on" if kv.cache_enabled else f"off ({kv.cache_off_reason})"
    return (
        f"KV budget {snap.budget_positions} positions ({snap.budget_positions * per / 2**20:.1f} MiB at {per} bytes each; "
        f"placement reserved {kv.reserved_kv_bytes / 2**20:.1f} MiB); prefix cache {cache}; "
        f"requests wait up to {kv.queue_wait_s:g}s for KV"
    )


def default_blas_threads() -> None:
    """Choose OpenBLAS's thread count before it loads (call before ``enable_fast_blas``).

    ``SKULK_BLAS_THREADS`` wins (``auto``: leave it to the library, one thread
    per usable CPU); else an explicit ``OPENBLAS_NUM_THREADS`` or
    ``OMP_NUM_THREADS`` stands; else one thread. Why one: a runner shares its
    cores with MLX's own compute thread, its Python thread, the node and often
    other runners, and multi-threaded BLAS calls then wait on descheduled
    workers. Measured on a busy 2-core machine: 8-stream decode 643 vs 176
    tok/s and 10M-preset prefill about 460 vs 150 tok/s, one thread vs two.
    """
    choice = env_value("BLAS_THREADS", "")
    if choice.lower() == "auto":
        return
    if choice:
        if not choice.isdigit() or int(choice) < 1:
            raise ValueError(f"SKULK_BLAS_THREADS must be a positive integer or 'auto', got {choice!r}")
        os.environ["OPENBLAS_NUM_THREADS"] = choice
    elif not os.environ.get("OPENBLAS_NUM_THREADS") and not os.environ.get("OMP_NUM_THREADS"):
        os.environ["OPENBLAS_NUM_THREADS"] = "1"


def _enable_fast_blas() -> str:
    """Enable the optimized BLAS if the accel module is present; describe the result."""
    default_blas_threads()
    try:
        from skulk.engine.accel import enable_fast_blas
    except ImportError:
        return "default (skulk.engine.accel not available)"
    status = enable_fast_blas()
    return f"{status.backend} ({'active' if status.active else 'inactive'}: {status.reason})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m skulk.engine.runner", description=__doc__.splitlines()[0])
    parser.add_argument("--spec-json", required=True, help="the RunnerSpec, as Skulk wire JSON")
    parser.add_argument("--model-path", required=True, help="the mlx-lm model directory")
    parser.add_argument("--cmd-fd", type=int, required=True, help="pipe fd carrying parent -> runner frames")
    parser.add_argument("--event-fd", type=int, required=True, help="pipe fd carrying runner -> parent frames")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit if this process is not our parent")
    args = parser.parse_args(argv)
    settings = RunnerSettings()
    if settings.pdeathsig:
        _set_parent_death_signal(args.parent_pid)
    spec = decode_json(RunnerSpec, args.spec_json)
    events = _Events(args.event_fd)
    runner = _Runner(spec, args.model_path, args.cmd_fd, events, settings)
    try:
        runner.run()
    except SystemExit:
        raise
    except BaseException as exc:
        _log(runner.rank, traceback.format_exc())
        runner.fail(f"runner crashed: {exc!r}")


if __name__ == "__main__":
    main()
