"""A synchronous client for one runner subprocess: tests, benchmarks, tools.

Theory of operation
-------------------
``RunnerProcess.spawn`` starts ``python -m skulk.engine.runner`` with two
fresh pipes (``protocol.runner_command``) and keeps the parent's ends: it
writes ``ParentMessage`` frames to the command pipe and decodes
``RunnerMessage`` frames from the event pipe with a ``FrameDecoder``. Every
wait (``recv``, ``wait_for_status``, ``collect``, ``wait_exit``) pumps the
event pipe with ``select`` until its condition holds or its deadline passes.

Invariants: messages that arrive while waiting for something else are kept
(chunks by task id, statuses and heartbeats in order), so no wait loses
another's message; a closed event pipe raises ``RunnerGone``, a reported
``RunnerFailed`` raises ``RunnerFailedError`` from ``wait_for_status``.

Like ``protocol``, this module imports no MLX. The production supervisor
(``skulk.runtime.supervisor``) speaks the same frames with asyncio instead.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import IO, Any

from skulk.core.ids import TaskId
from skulk.core.instances import RunnerFailed, RunnerSpec
from skulk.core.tasks import Task, TokenChunk
from skulk.engine.protocol import (
    CancelTask,
    Chunk,
    FrameDecoder,
    Heartbeat,
    RunnerMessage,
    RunTask,
    Shutdown,
    StatusChanged,
    runner_command,
    write_frame,
)

__all__ = ["RunnerProcess", "RunnerGone", "RunnerFailedError"]


class RunnerGone(RuntimeError):
    """The runner closed its event pipe (it exited)."""


class RunnerFailedError(RuntimeError):
    """The runner reported ``RunnerFailed``; ``status`` holds it."""

    def __init__(self, status: RunnerFailed) -> None:
        super().__init__(status.error_message)
        self.status = status


class RunnerProcess:
    """A runner subprocess driven synchronously (tests, benchmarks, tools).

    Messages that arrive while waiting for something else are kept: chunks by
    task id, statuses in order. Not thread-safe; one thread drives it.
    """

    def __init__(self, popen: subprocess.Popen[bytes], cmd_fd: int, event_fd: int) -> None:
        self.popen = popen
        self._cmd_fd = cmd_fd
        self._event_fd = event_fd
        self._decoder = FrameDecoder(RunnerMessage)
        self._inbox: deque[Any] = deque()
        self.statuses: list[Any] = []
        self.heartbeats: list[Heartbeat] = []
        self._chunks: dict[str, list[TokenChunk]] = {}
        self._eof = False

    @classmethod
    def spawn(
        cls,
        spec: RunnerSpec,
        model_path: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
        stderr: int | IO[Any] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> RunnerProcess:
        """Start ``python -m skulk.engine.runner`` for ``spec`` with fresh pipes.

        ``env`` entries are added to this process's environment. The child's
        stdout is discarded; its stderr goes to ``stderr`` (default: ours).
        """
        cmd_r, cmd_w = os.pipe()
        ev_r, ev_w = os.pipe()
        argv = runner_command(spec, model_path, cmd_fd=cmd_r, event_fd=ev_w, parent_pid=os.getpid())
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        try:
            popen = subprocess.Popen(
                argv,
                pass_fds=(cmd_r, ev_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=full_env,
                cwd=cwd,
                close_fds=True,
            )
        except BaseException:
            for fd in (cmd_r, cmd_w, ev_r, ev_w):
                os.close(fd)
            raise
        # Our copies of the child's ends must go, or EOF never shows up.
        os.close(cmd_r)
        os.close(ev_w)
        os.set_inheritable(cmd_w, False)
        os.set_inheritable(ev_r, False)
        return cls(popen, cmd_w, ev_r)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def send(self, msg: Any) -> None:
        """Send one ``ParentMessage``; raises ``RunnerGone`` if the pipe is closed."""
        try:
            write_frame(self._cmd_fd, msg)
        except (BrokenPipeError, OSError) as exc:
            raise RunnerGone(f"runner {self.pid} is not reading commands: {exc}") from exc

    def submit(self, task: Task) -> None:
        self.send(RunTask(task=task))

    def cancel(self, task_id: str) -> None:
        self.send(CancelTask(task_id=TaskId(task_id)))

    def _pump(self, timeout: float | None) -> bool:
        """Read what is available (waiting up to ``timeout``); False on timeout."""
        if self._eof:
            raise RunnerGone(f"runner {self.pid} closed its event pipe")
        ready, _, _ = select.select([self._event_fd], [], [], timeout)
        if not ready:
            return False
        data = os.read(self._event_fd, 1 << 20)
        if not data:
            self._eof = True
            raise RunnerGone(f"runner {self.pid} closed its event pipe")
        for msg in self._decoder.feed(data):
            self._file(msg)
        return True

    def _file(self, msg: Any) -> None:
        if isinstance(msg, Chunk):
            self._chunks.setdefault(msg.chunk.task_id, []).append(msg.chunk)
        elif isinstance(msg, StatusChanged):
            self.statuses.append(msg.status)
        elif isinstance(msg, Heartbeat):
            self.heartbeats.append(msg)
        self._inbox.append(msg)

    def recv(self, timeout: float | None = None) -> Any | None:
        """Next message in arrival order, or None after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._inbox:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._pump(left) and deadline is not None and time.monotonic() >= deadline:
                return None
        return self._inbox.popleft()

    def wait_for_status(self, kinds: type | tuple[type, ...], timeout: float, *, since: int = 0) -> Any:
        """Wait until a status of one of ``kinds`` is reported; returns it.

        Only statuses from index ``since`` of ``self.statuses`` on count.
        Raises ``RunnerFailedError`` on ``RunnerFailed`` (unless waited for),
        ``TimeoutError`` after ``timeout`` seconds, ``RunnerGone`` on exit.
        """
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for status in self.statuses[seen:]:
                if isinstance(status, kinds):
                    return status
                if isinstance(status, RunnerFailed):
                    raise RunnerFailedError(status)
            seen = len(self.statuses)
            left = deadline - time.monotonic()
            if left <= 0:
                names = [type(s).__name__ for s in self.statuses]
                raise TimeoutError(f"no {[k.__name__ for k in kinds]} within {timeout}s; saw {names}")
            self._pump(left)
            self._inbox.clear()

    def chunks(self, task_id: str) -> list[TokenChunk]:
        """Chunks received so far for ``task_id`` (a live list)."""
        return self._chunks.setdefault(task_id, [])

    def collect(self, task_ids: str | Iterable[str], timeout: float) -> dict[str, list[TokenChunk]]:
        """Wait until every task in ``task_ids`` has its final chunk; returns their chunks."""
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        deadline = time.monotonic() + timeout

        def done(tid: str) -> bool:
            got = self._chunks.get(tid)
            return bool(got) and got[-1].finish_reason is not None

        while not all(done(t) for t in ids):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [t for t in ids if not done(t)]
                raise TimeoutError(f"tasks {missing} did not finish within {timeout}s")
            self._pump(left)
            self._inbox.clear()
        return {t: self._chunks[t] for t in ids}

    def generate(self, task: Task, timeout: float = 120.0) -> list[TokenChunk]:
        """Submit ``task`` and return all of its chunks (the last one final)."""
        self.submit(task)
        return self.collect(task.task_id, timeout)[task.task_id]

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit, draining events; returns its exit code."""
        deadline = time.monotonic() + timeout
        while not self._eof and time.monotonic() < deadline:
            try:
                self._pump(max(0.0, deadline - time.monotonic()))
            except RunnerGone:
                break
        return self.popen.wait(max(0.0, deadline - time.monotonic()))

    def shutdown(self, timeout: float = 15.0) -> int:
        """Ask the runner to exit; kill it if it has not within ``timeout``."""
        try:
            self.send(Shutdown())
        except RunnerGone:
            pass
        try:
            return self.wait_exit(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(5)
        finally:
            self.close()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self.close()

    def close(self) -> None:
        for fd in (self._cmd_fd, self._event_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._cmd_fd = self._event_fd = -1

    def __enter__(self) -> RunnerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.popen.poll() is None:
            self.shutdown()
        else:
            self.close()

