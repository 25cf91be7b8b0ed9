"""The runner IPC protocol: the node (parent) talks to a runner subprocess.

Theory of operation
-------------------
A runner is a child process started as::

    python -m skulk.engine.runner --spec-json JSON --model-path DIR \\
        --cmd-fd R --event-fd W [--parent-pid PID]

It talks to its parent over two dedicated pipes, never over stdout or stderr
(libraries print there; the runner's own log lines go to stderr):

- ``--cmd-fd``: parent -> runner, carrying ``ParentMessage`` records;
- ``--event-fd``: runner -> parent, carrying ``RunnerMessage`` records.

Every message is one *frame*: a 4-byte big-endian unsigned length ``n``
followed by ``n`` bytes of msgpack holding ``skulk.core.codec.to_wire(msg)``.
Messages are tagged records, so a frame decodes to a single-key map such as
``{"RunTask": {"task": {...}}}`` or ``{"Chunk": {"chunk": {...}}}``.

Rules both sides keep:

1. The parent sends ``RunTask`` only to the rank-0 runner of an instance; other
   ranks answer a ``RunTask`` with a final error chunk. Rank 0 schedules every
   step and broadcasts it to the other ranks itself.
2. Every ``RunTask`` ends with exactly one ``Chunk`` whose ``finish_reason`` is
   set (``stop``, ``length``, ``cancelled`` or ``error``). ``seq`` counts a
   task's chunks from 0 without gaps. Admission refusals and bad requests end
   with ``finish_reason="error"`` and an ``error`` (for context refusals code
   ``context_length_exceeded``, type ``invalid_request_error``); the runner
   keeps serving.
3. ``CancelTask`` for a running task ends it with ``finish_reason="cancelled"``;
   for an unknown or finished task it is ignored.
4. ``Shutdown`` makes the runner report ``RunnerShuttingDown`` then
   ``RunnerShutdown`` and exit 0 (open tasks end with ``cancelled``).
5. The runner reports every lifecycle change with ``StatusChanged``:
   ``RunnerIdle`` first, then (ranks > 1 only) ``RunnerConnecting`` and
   ``RunnerConnected``, ``RunnerLoading``, ``RunnerLoaded``,
   ``RunnerWarmingUp``, ``RunnerReady`` (carrying the context ceiling it
   enforces); ``RunnerRunning`` whenever its count of active tasks changes
   while non-zero, and ``RunnerReady`` again when it drops to zero. A
   ``RunnerFailed`` is the last message before a non-zero exit.
6. ``Heartbeat`` arrives about every ``SKULK_RUNNER_HEARTBEAT_SECONDS``
   (default 1.0) from a thread independent of generation.
7. EOF on the command pipe means the parent died: the runner exits at once
   (``EXIT_PARENT_GONE``). On Linux it also asks the kernel for SIGKILL when
   its parent exits (``prctl(PR_SET_PDEATHSIG)``).

Exit codes: ``EXIT_OK`` (0) after ``Shutdown``; ``EXIT_FAILED`` (1) after a
``RunnerFailed`` (load error, warmup deadline, engine error, lost peer);
``EXIT_PARENT_GONE`` (3); ``EXIT_WEDGED`` (86): a step made no progress within
``SKULK_PIPELINE_EVAL_TIMEOUT_SECONDS``; never retry it. When the group-connect
deadline passes, a guard process reports ``RunnerFailed`` (naming the
unreachable ranks) and SIGKILLs the runner, which MLX keeps blocked: the exit
status is then -9.

This module imports no MLX; the runtime's supervisor and the tests import it
freely. It holds the wire protocol only (records, frames, exit codes, the
command line); ``skulk.engine.client.RunnerProcess`` is a small synchronous
client for tests, benchmarks and tools, and the production supervisor speaks
the same frames with asyncio.
"""

from __future__ import annotations

import os
import struct
import sys
from typing import Any

import msgspec

from skulk.core.codec import WireError, decode_msgpack, encode_json, encode_msgpack, from_wire
from skulk.core.ids import TaskId
from skulk.core.instances import KvUse, RunnerSpec, RunnerStatus
from skulk.core.records import TaggedRecord
from skulk.core.runner_policy import WEDGE_EXIT_CODE
from skulk.core.tasks import Task, TokenChunk

__all__ = [
    "RunTask",
    "CancelTask",
    "Shutdown",
    "ParentMessage",
    "StatusChanged",
    "Chunk",
    "Heartbeat",
    "RunnerMessage",
    "MAX_FRAME_BYTES",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_PARENT_GONE",
    "EXIT_WEDGED",
    "ProtocolError",
    "encode_frame",
    "FrameDecoder",
    "write_frame",
    "read_frame",
    "runner_command",
]

MAX_FRAME_BYTES = 64 * 1024 * 1024
_LEN = struct.Struct(">I")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_PARENT_GONE = 3
EXIT_WEDGED = WEDGE_EXIT_CODE  # defined once, in the core policy that never retries it


# --- parent -> runner --------------------------------------------------------


class RunTask(TaggedRecord, frozen=True, kw_only=True):
    """Generate for ``task`` (rank 0 only); chunks follow as ``Chunk`` messages."""

    task: Task


class CancelTask(TaggedRecord, frozen=True, kw_only=True):
    """Stop ``task_id`` early; its last chunk says ``finish_reason="cancelled"``."""

    task_id: TaskId


class Shutdown(TaggedRecord, frozen=True, kw_only=True):
    """Finish (cancel open tasks), report ``RunnerShutdown`` and exit 0."""


ParentMessage = RunTask | CancelTask | Shutdown


# --- runner -> parent --------------------------------------------------------


class StatusChanged(TaggedRecord, frozen=True, kw_only=True):
    status: RunnerStatus


class Chunk(TaggedRecord, frozen=True, kw_only=True):
    chunk: TokenChunk


class Heartbeat(TaggedRecord, frozen=True, kw_only=True):
    """Liveness and load, sent from a thread that generation cannot block.

    ``steps`` counts completed engine steps; a supervisor that sees it frozen
    while ``active_tasks > 0`` is looking at a wedge (the runner itself exits
    86 once ``SKULK_PIPELINE_EVAL_TIMEOUT_SECONDS`` pass).
    """

    rank: int
    active_tasks: int
    queued_tasks: int
    steps: int
    uptime_s: float
    # Rank 0's KV budget, prefix cache and their counters (None on other ranks and before serving).
    kv: KvUse | None = None


RunnerMessage = StatusChanged | Chunk | Heartbeat


class ProtocolError(RuntimeError):
    """A frame was malformed or too large."""


# --- framing -----------------------------------------------------------------


def encode_frame(msg: Any) -> bytes:
    """One frame: 4-byte big-endian length, then msgpack of ``to_wire(msg)``.

    ``Chunk`` frames, one per generated token per stream, take a fast path:
    msgspec encodes the (untagged, camelCase) ``TokenChunk`` natively inside
    the single-key wrapper, which yields exactly the codec's bytes (a test
    holds this) about ten times faster.
    """
    if type(msg) is Chunk:
        body = msgspec.msgpack.encode({"Chunk": {"chunk": msg.chunk}})
    else:
        body = encode_msgpack(msg)
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Incremental sans-I/O decoder: feed bytes, take decoded messages out.

    ``tp`` is the union to decode (``ParentMessage`` or ``RunnerMessage``).
    """

    def __init__(self, tp: Any) -> None:
        self._tp = tp
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > MAX_FRAME_BYTES:
                raise ProtocolError(f"frame length {n} exceeds {MAX_FRAME_BYTES}")
            if len(self._buf) < 4 + n:
                break
            body = bytes(self._buf[4 : 4 + n])
            del self._buf[: 4 + n]
            out.append(self._decode(body))
        return out

    def _decode(self, body: bytes) -> Any:
        if self._tp is RunnerMessage:
            # Fast path for the per-token frames (see ``encode_frame``).
            try:
                data = msgspec.msgpack.decode(body)
            except msgspec.DecodeError as exc:
                raise WireError(f"invalid msgpack: {exc}") from None
            if isinstance(data, dict) and len(data) == 1 and "Chunk" in data:
                inner = data["Chunk"]
                if isinstance(inner, dict) and set(inner) == {"chunk"}:
                    try:
                        return Chunk(chunk=msgspec.convert(inner["chunk"], TokenChunk))
                    except msgspec.ValidationError as exc:
                        raise WireError(f"$.Chunk.chunk: {exc}") from None
            return from_wire(self._tp, data)
        return decode_msgpack(self._tp, body)

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)


def write_frame(fd: int, msg: Any) -> None:
    """Write one whole frame to file descriptor ``fd`` (blocking)."""
    data = memoryview(encode_frame(msg))
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _read_exact(fd: int, n: int) -> bytes | None:
    parts = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def read_frame(fd: int, tp: Any) -> Any | None:
    """Read one frame from ``fd`` (blocking); None on EOF at a frame boundary."""
    head = _read_exact(fd, 4)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame length {n} exceeds {MAX_FRAME_BYTES}")
    body = _read_exact(fd, n)
    if body is None:
        raise ProtocolError("EOF inside a frame")
    return decode_msgpack(tp, body)


# --- starting a runner ---------------------------------------------------------


def runner_command(
    spec: RunnerSpec,
    model_path: str | os.PathLike[str],
    *,
    cmd_fd: int,
    event_fd: int,
    parent_pid: int | None = None,
    python: str | None = None,
) -> list[str]:
    """The argv that starts a runner reading ``cmd_fd`` and writing ``event_fd``."""
    argv = [
        python or sys.executable,
        "-m",
        "skulk.engine.runner",
        "--spec-json",
        encode_json(spec).decode(),
        "--model-path",
        str(model_path),
        "--cmd-fd",
        str(cmd_fd),
        "--event-fd",
        str(event_fd),
    ]
    if parent_pid is not None:
        argv += ["--parent-pid", str(parent_pid)]
    return argv
