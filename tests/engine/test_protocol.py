"""The runner IPC protocol: frames round-trip, decode incrementally, stay MLX-free."""

from __future__ import annotations

import os
import subprocess
import sys

import msgspec
import pytest

from skulk.core.codec import WireError
from skulk.core.instances import RunnerFailed, RunnerLoading, RunnerReady, RunnerRunning
from skulk.core.tasks import ChunkError, GenerationStats, TokenChunk, TokenLogprob, TopLogprob, Usage
from skulk.engine.protocol import (
    MAX_FRAME_BYTES,
    CancelTask,
    Chunk,
    FrameDecoder,
    Heartbeat,
    ParentMessage,
    ProtocolError,
    RunnerMessage,
    RunTask,
    Shutdown,
    StatusChanged,
    encode_frame,
    read_frame,
    write_frame,
)
from tests.engine.helpers import make_task

PARENT_MESSAGES = [
    RunTask(task=make_task(prompt="hi", max_tokens=3, stop=("x",), temperature=0.5, seed=7)),
    RunTask(task=make_task(prompt="", logprobs=True, top_logprobs=2)),
    CancelTask(task_id="t-1"),  # type: ignore[arg-type]
    Shutdown(),
]

RUNNER_MESSAGES = [
    StatusChanged(status=RunnerReady(context_ceiling=4096)),
    StatusChanged(status=RunnerLoading(layers_loaded=3, layers_total=6)),
    StatusChanged(status=RunnerRunning(active_tasks=2)),
    StatusChanged(status=RunnerFailed(error_message="wedged", permanent=True)),
    Chunk(
        chunk=TokenChunk(
            command_id="c",  # type: ignore[arg-type]
            task_id="t",  # type: ignore[arg-type]
            seq=4,
            text="héllo",
            token_ids=(1, 2),
            logprobs=(TokenLogprob(token="h", logprob=-0.5, top_logprobs=(TopLogprob(token="h", logprob=-0.5),)),),
            finish_reason="length",
            usage=Usage(prompt_tokens=3, completion_tokens=5, total_tokens=8),
            stats=GenerationStats(prompt_tps=10.0, generation_tps=5.0, prompt_tokens=3, generation_tokens=5),
            error=ChunkError(message="m", type="invalid_request_error", code="context_length_exceeded"),
        )
    ),
    Heartbeat(rank=1, active_tasks=2, queued_tasks=0, steps=99, uptime_s=1.5),
]


@pytest.mark.parametrize("msg", PARENT_MESSAGES, ids=lambda m: type(m).__name__)
def test_parent_messages_round_trip(msg: object) -> None:
    assert FrameDecoder(ParentMessage).feed(encode_frame(msg)) == [msg]


@pytest.mark.parametrize("msg", RUNNER_MESSAGES, ids=lambda m: type(m).__name__)
def test_runner_messages_round_trip(msg: object) -> None:
    frame = encode_frame(msg)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4  # 4-byte big-endian length
    assert FrameDecoder(RunnerMessage).feed(frame) == [msg]


def test_fast_chunk_frames_are_exactly_the_codec_bytes() -> None:
    from skulk.core.codec import encode_msgpack, from_wire

    for msg in RUNNER_MESSAGES:
        if isinstance(msg, Chunk):
            for chunk in (msg.chunk, TokenChunk(command_id="c", task_id="t", seq=0)):  # type: ignore[arg-type]
                fast = Chunk(chunk=chunk)
                assert encode_frame(fast)[4:] == encode_msgpack(fast)
                assert FrameDecoder(RunnerMessage).feed(encode_frame(fast)) == [fast]
                assert from_wire(RunnerMessage, msgspec.msgpack.decode(encode_frame(fast)[4:])) == fast
    bad = msgspec.msgpack.encode({"Chunk": {"chunk": {"commandId": "c", "taskId": "t", "seq": "zero"}}})
    with pytest.raises(WireError):
        FrameDecoder(RunnerMessage).feed(len(bad).to_bytes(4, "big") + bad)


def test_decoder_handles_frames_split_anywhere() -> None:
    data = b"".join(encode_frame(m) for m in RUNNER_MESSAGES)
    decoder = FrameDecoder(RunnerMessage)
    out = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    assert out == RUNNER_MESSAGES
    assert decoder.pending_bytes == 0


def test_oversized_and_malformed_frames_are_refused() -> None:
    decoder = FrameDecoder(RunnerMessage)
    with pytest.raises(ProtocolError):
        decoder.feed((MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(WireError):
        FrameDecoder(RunnerMessage).feed(encode_frame(Shutdown()))  # a parent message on the runner pipe


def test_blocking_pipe_helpers_round_trip_and_report_eof() -> None:
    r, w = os.pipe()
    try:
        for msg in PARENT_MESSAGES:
            write_frame(w, msg)
        os.close(w)
        w = -1
        assert [read_frame(r, ParentMessage) for _ in PARENT_MESSAGES] == PARENT_MESSAGES
        assert read_frame(r, ParentMessage) is None
    finally:
        os.close(r)
        if w != -1:
            os.close(w)


def test_protocol_imports_without_mlx() -> None:
    # The supervisor and the API import the protocol; it must not drag MLX in.
    code = "import sys, skulk.engine.protocol, skulk.engine.client, skulk.engine.models, skulk.engine._connect_guard; sys.exit(any(m.startswith('mlx') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
