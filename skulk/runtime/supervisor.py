"""Runner supervision: runner subprocesses, carried out as the core decides.

Theory of operation
-------------------
The core's worker decides everything about runners (which to start, the
crash breaker, wedges never retried, deadlines, the pre-spawn memory guard).
The supervisor only carries its effects out and reports back:

- ``start(spec)``: resolve the model directory (a preset id is generated on
  first use; a local mlx-lm directory works by path), write the MLX hostfile
  from ``spec.hosts``, spawn ``python -m skulk.engine.runner`` with two pipes
  (``skulk.engine.protocol``), and forward its frames: ``StatusChanged`` ->
  ``RunnerStatusObserved``, ``Chunk`` -> ``RunnerOutput``; heartbeats are kept
  for diagnostics. When the process has exited *and* its event pipe is
  drained, ``RunnerExited`` is fed, so every status and chunk a runner wrote
  reaches the core before its exit does.
- ``stop(runner_id)``: graceful ``Shutdown`` frame, then after
  ``stop_grace_s`` SIGTERM, then after as long again SIGKILL; the process is
  always reaped. A runner stopped before it was spawned never spawns and
  still reports an exit (the core waits for one).
- ``dispatch``/``cancel``: ``RunTask``/``CancelTask`` frames; the write is
  non-blocking (a wedged runner cannot stall the node's loop).

A start that fails before a process exists (no model directory, a spawn
error) is reported as ``RunnerFailed`` followed by exit code 1, so the core's
breaker treats it like any other crash.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from skulk.core.codec import to_wire
from skulk.core.ids import RunnerId, TaskId
from skulk.core.inputs import InfoObserved, Input, ModelAvailable, RunnerExited, RunnerOutput, RunnerStatusObserved
from skulk.core.instances import RunnerFailed, RunnerSpec, RunnerStatus
from skulk.core.tasks import Task
from skulk.engine import protocol
from skulk.engine.protocol import Chunk, FrameDecoder, Heartbeat, RunnerMessage, StatusChanged

__all__ = ["Supervisor", "find_local_models", "write_hostfile", "EXIT_NEVER_STARTED"]

log = logging.getLogger("skulk.supervisor")

EXIT_NEVER_STARTED = 0  # stopped before a process existed: a clean "exit"
_STDERR_LINE_MAX = 2000


def write_hostfile(path: Path, hosts: tuple[str, ...]) -> Path:
    """MLX's ring hostfile: a JSON list with one ``["ip:port"]`` entry per rank."""
    assert hosts, "a world of one needs no hostfile"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([[h] for h in hosts]))
    os.replace(tmp, path)
    return path


def find_local_models(root: Path, *, max_depth: int = 3) -> list[str]:
    """Model ids of complete mlx-lm directories under ``root`` (``org/name`` paths), sorted.

    A directory counts when it holds ``config.json``, at least one
    ``*.safetensors`` file and every weight file its safetensors index names
    (a node that fetched only its pipeline stage's files holds a partial copy,
    which is not a model it could serve whole); hidden (staging) directories
    are skipped.
    """
    found: list[str] = []
    if not root.is_dir():
        return found

    def complete(path: Path) -> bool:
        index = path / "model.safetensors.index.json"
        if not index.is_file():
            return True
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        except (OSError, ValueError, AttributeError):
            return True  # a malformed index is the card's to report, not a reason to hide the model
        return all((path / f).is_file() for f in set(weight_map.values()))

    def walk(path: Path, depth: int) -> None:
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")) and complete(path):
            found.append(str(path.relative_to(root)).replace(os.sep, "/"))
            return
        if depth >= max_depth:
            return
        for child in sorted(path.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                walk(child, depth + 1)

    walk(root, 0)
    return sorted(f for f in found if f != ".")


class _Runner:
    __slots__ = (
        "spec", "proc", "writer", "status", "started_at", "spawned_at", "stopping", "stop_reason",
        "heartbeat", "heartbeat_at", "task", "exit_code", "model_path",
    )

    def __init__(self, spec: RunnerSpec, now: float) -> None:
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.WriteTransport | None = None
        self.status: RunnerStatus | None = None
        self.started_at = now
        self.spawned_at: float | None = None
        self.stopping = False
        self.stop_reason = ""
        self.heartbeat: Heartbeat | None = None
        self.heartbeat_at: float | None = None
        self.task: asyncio.Task[None] | None = None
        self.exit_code: int | None = None
        self.model_path: Path | None = None


class Supervisor:
    """Runner processes of one node. Methods are called on the node's event loop."""

    def __init__(
        self,
        *,
        feed: Callable[[Input], None],
        models_dir: Path,
        work_dir: Path,
        env: Mapping[str, str],
        stop_grace_s: float = 10.0,
        python: str | None = None,
        resolve_model: Callable[[str], Path] | None = None,
        runner_module: str = "skulk.engine.runner",
    ) -> None:
        assert stop_grace_s > 0
        self.feed = feed
        self.models_dir = models_dir
        self.work_dir = work_dir
        self.env = dict(env)
        self.stop_grace_s = stop_grace_s
        self.python = python or sys.executable
        self.runner_module = runner_module
        self._resolve = resolve_model or self._default_resolve
        self.runners: dict[RunnerId, _Runner] = {}
        self.exits: list[tuple[RunnerId, int]] = []
        self.escalations: dict[str, int] = {"sigterm": 0, "sigkill": 0}

    # --- effects --------------------------------------------------------------------

    def start(self, spec: RunnerSpec) -> None:
        """Carry out ``StartRunner``: spawn (asynchronously) and supervise."""
        old = self.runners.get(spec.runner_id)
        assert old is None, f"runner {spec.runner_id} started twice (the core waits for its exit first)"
        entry = _Runner(spec, time.time())
        self.runners[spec.runner_id] = entry
        entry.task = asyncio.get_running_loop().create_task(self._run(entry), name=f"runner-{spec.runner_id}")

    def stop(self, runner_id: RunnerId, reason: str = "") -> None:
        """Carry out ``StopRunner``: escalate until the process is gone."""
        entry = self.runners.get(runner_id)
        if entry is None or entry.stopping:
            return
        entry.stopping = True
        entry.stop_reason = reason
        log.info("stopping runner %s: %s", runner_id, reason or "requested")
        if entry.proc is not None:
            asyncio.get_running_loop().create_task(self._terminate(entry), name=f"stop-{runner_id}")

    def dispatch(self, runner_id: RunnerId, task: Task) -> None:
        self._send(runner_id, protocol.RunTask(task=task))

    def cancel(self, runner_id: RunnerId, task_id: TaskId) -> None:
        self._send(runner_id, protocol.CancelTask(task_id=task_id))

    async def shutdown(self) -> None:
        """Stop every runner (with escalation) and wait until all are reaped."""
        for runner_id in sorted(self.runners):
            self.stop(runner_id, "node shutting down")
        tasks = [e.task for e in self.runners.values() if e.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- queries --------------------------------------------------------------------

    def diagnostics(self) -> list[dict[str, object]]:
        """One row per runner (for /v1/diagnostics/node)."""
        now = time.time()
        rows: list[dict[str, object]] = []
        for runner_id in sorted(self.runners):
            e = self.runners[runner_id]
            rows.append(
                {
                    "runnerId": runner_id,
                    "instanceId": e.spec.instance_id,
                    "modelId": e.spec.model_id,
                    "rank": e.spec.shard.device_rank,
                    "worldSize": e.spec.shard.world_size,
                    "status": type(e.status).__name__ if e.status is not None else "Starting",
                    "pid": e.proc.pid if e.proc is not None else None,
                    "uptimeSeconds": round(now - e.spawned_at, 3) if e.spawned_at else 0.0,
                    "stopping": e.stopping,
                    "activeTasks": e.heartbeat.active_tasks if e.heartbeat else 0,
                    "queuedTasks": e.heartbeat.queued_tasks if e.heartbeat else 0,
                    "lastHeartbeatAgoSeconds": round(now - e.heartbeat_at, 3) if e.heartbeat_at else None,
                    # Rank 0's KV budget and prefix cache (skulk.core.instances.KvUse), when it reported one.
                    "kv": to_wire(e.heartbeat.kv) if e.heartbeat is not None and e.heartbeat.kv is not None else None,
                }
            )
        return rows

    def pids(self) -> dict[RunnerId, int]:
        return {r: e.proc.pid for r, e in sorted(self.runners.items()) if e.proc is not None}

    # --- models ---------------------------------------------------------------------

    def report_local_models(self) -> list[str]:
        """Feed ``ModelAvailable`` for every complete model directory; returns their ids."""
        models = find_local_models(self.models_dir)
        for model_id in models:
            self.feed(ModelAvailable(model_id=model_id))
        return models

    def _default_resolve(self, model_id: str) -> Path:
        from skulk.engine.models import resolve_model_path

        return resolve_model_path(model_id, root=self.models_dir)

    # --- internals --------------------------------------------------------------------

    def _send(self, runner_id: RunnerId, msg: Any) -> None:
        entry = self.runners.get(runner_id)
        if entry is None or entry.writer is None or entry.writer.is_closing():
            log.warning("cannot send %s to runner %s: not running", type(msg).__name__, runner_id)
            return
        entry.writer.write(protocol.encode_frame(msg))

    async def _run(self, entry: _Runner) -> None:
        spec = entry.spec
        code: int
        try:
            code = await self._spawn_and_watch(entry)
        except Exception as exc:  # never let one runner take the node down
            log.exception("runner %s failed to start", spec.runner_id)
            if not entry.stopping:
                self.feed(
                    RunnerStatusObserved(
                        runner_id=spec.runner_id,
                        status=RunnerFailed(error_message=f"runner could not start: {exc}", permanent=False),
                    )
                )
            code = protocol.EXIT_FAILED if not entry.stopping else EXIT_NEVER_STARTED
        finally:
            if entry.writer is not None:
                entry.writer.close()
        self.runners.pop(spec.runner_id, None)
        entry.exit_code = code
        self.exits.append((spec.runner_id, code))
        log.info("runner %s exited with code %d", spec.runner_id, code)
        if entry.heartbeat is not None and entry.heartbeat.kv is not None:
            self._feed_kv()  # its ledger is gone with it (before the exit: nothing about it follows that)
        self.feed(RunnerExited(runner_id=spec.runner_id, exit_code=code))

    async def _spawn_and_watch(self, entry: _Runner) -> int:
        spec = entry.spec
        loop = asyncio.get_running_loop()
        entry.model_path = await asyncio.to_thread(self._resolve, str(spec.model_id))
        if entry.stopping:
            return EXIT_NEVER_STARTED
        run_dir = self.work_dir / str(spec.runner_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.env)
        env["SKULK_RUNNER_ID"] = str(spec.runner_id)
        if spec.hosts:
            hostfile = write_hostfile(run_dir / "hostfile.json", spec.hosts)
            env["MLX_HOSTFILE"] = str(hostfile)
            env["MLX_RANK"] = str(spec.shard.device_rank)
        cmd_r, cmd_w = os.pipe()
        ev_r, ev_w = os.pipe()
        try:
            argv = protocol.runner_command(
                spec, entry.model_path, cmd_fd=cmd_r, event_fd=ev_w, parent_pid=os.getpid(), python=self.python
            )
            if self.runner_module != "skulk.engine.runner":
                argv[argv.index("skulk.engine.runner")] = self.runner_module
            proc = await asyncio.create_subprocess_exec(
                *argv,
                pass_fds=(cmd_r, ev_w),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=str(run_dir),
                start_new_session=True,  # a terminal's Ctrl-C reaches the node, which stops runners in order
            )
        except BaseException:
            for fd in (cmd_r, cmd_w, ev_r, ev_w):
                os.close(fd)
            raise
        os.close(cmd_r)
        os.close(ev_w)
        entry.proc = proc
        entry.spawned_at = time.time()
        log.info("runner %s started (pid %d, model %s, rank %d/%d)", spec.runner_id, proc.pid, spec.model_id,
                 spec.shard.device_rank, spec.shard.world_size)
        write_transport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(cmd_w, "wb", buffering=0))
        entry.writer = write_transport  # type: ignore[assignment]
        events_done = loop.create_future()
        await loop.connect_read_pipe(
            lambda: _EventProtocol(self, entry, events_done), os.fdopen(ev_r, "rb", buffering=0)
        )
        stderr_task = loop.create_task(self._pump_stderr(entry, proc))
        if entry.stopping:
            loop.create_task(self._terminate(entry))
        code = await proc.wait()
        # Everything the runner wrote reaches the core before its exit does; a
        # grandchild holding the pipe open must not delay the exit forever.
        try:
            await asyncio.wait_for(asyncio.shield(events_done), timeout=2.0)
        except asyncio.TimeoutError:
            log.warning("runner %s exited but its event pipe stayed open", spec.runner_id)
        try:
            await asyncio.wait_for(stderr_task, timeout=2.0)
        except asyncio.TimeoutError:
            stderr_task.cancel()
        return code

    async def _pump_stderr(self, entry: _Runner, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        rid = entry.spec.runner_id
        while True:
            line = await proc.stderr.readline()
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                log.info("runner %s: %s", rid, text[:_STDERR_LINE_MAX])

    async def _terminate(self, entry: _Runner) -> None:
        """Shutdown frame, then SIGTERM, then SIGKILL; returns once the process is reaped."""
        proc = entry.proc
        assert proc is not None
        rid = entry.spec.runner_id
        if proc.returncode is None:
            try:
                if entry.writer is not None and not entry.writer.is_closing():
                    entry.writer.write(protocol.encode_frame(protocol.Shutdown()))
            except (OSError, RuntimeError):
                pass
        for sig, name in ((signal.SIGTERM, "sigterm"), (signal.SIGKILL, "sigkill")):
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=self.stop_grace_s)
                return
            except asyncio.TimeoutError:
                pass
            if proc.returncode is not None:
                return
            log.warning("runner %s (pid %d) did not exit within %.1f s; sending %s",
                        rid, proc.pid, self.stop_grace_s, name.upper())
            self.escalations[name] += 1
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                return
        await proc.wait()  # SIGKILL cannot be ignored: this reaps it

    def _on_frame(self, entry: _Runner, msg: Any) -> None:
        rid = entry.spec.runner_id
        if isinstance(msg, StatusChanged):
            entry.status = msg.status
            self.feed(RunnerStatusObserved(runner_id=rid, status=msg.status))
        elif isinstance(msg, Chunk):
            self.feed(RunnerOutput(runner_id=rid, chunk=msg.chunk))
        elif isinstance(msg, Heartbeat):
            entry.heartbeat = msg
            entry.heartbeat_at = time.time()
            if msg.kv is not None:
                self._feed_kv()

    def _feed_kv(self) -> None:
        """Every live rank-0 runner's KV ledger, for the node's telemetry (see ``InfoObserved``)."""
        kv = {rid: e.heartbeat.kv for rid, e in sorted(self.runners.items()) if e.heartbeat is not None and e.heartbeat.kv is not None}
        self.feed(InfoObserved(runner_kv=kv))


class _EventProtocol(asyncio.Protocol):
    """Reads the runner's event pipe, decodes frames, hands them to the supervisor."""

    def __init__(self, sup: Supervisor, entry: _Runner, done: asyncio.Future[None]) -> None:
        self.sup = sup
        self.entry = entry
        self.done = done
        self.decoder = FrameDecoder(RunnerMessage)
        self.broken = False

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            messages = self.decoder.feed(data)
        except Exception as exc:
            self.broken = True
            log.error("runner %s sent a malformed frame (%s); stopping it", self.entry.spec.runner_id, exc)
            self.sup.stop(self.entry.spec.runner_id, f"protocol error: {exc}")
            return
        for msg in messages:
            try:
                self.sup._on_frame(self.entry, msg)
            except Exception:
                log.exception("error handling a frame from runner %s", self.entry.spec.runner_id)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)
