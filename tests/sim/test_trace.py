"""The trace's digest: SHA-256 over each record's 8-byte BLAKE2b of its msgpack encoding.

Every digest recorded for a seed (``chaos digests``) depends on exactly this
arithmetic; the tracer keeps the hashes in one byte array and hashes it once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import msgspec

from sim import trace
from sim.trace import Tracer

_PLAIN = msgspec.msgpack.Encoder(order="deterministic")


def test_the_digest_is_sha256_over_the_records_hashes() -> None:
    tracer = Tracer()
    tracer.note(0.0, "-", "phase", "boot")
    tracer.note(1.5, "n1", "fault", "x")
    pieces = [hashlib.blake2b(_PLAIN.encode(rec), digest_size=8).digest() for rec in tracer.records]
    assert tracer.hashes == pieces
    assert tracer.digest() == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert trace.first_divergence(pieces, pieces) is None
    assert tracer.hash_at(1) == pieces[1]


def test_a_trace_holding_a_snapshot_is_written_with_its_state_in_base64(tmp_path: Path) -> None:
    # A failing run's artifacts once crashed the whole nightly sweep (`log_compaction` seed 141):
    # a SyncResponse's snapshot carries its state as raw bytes, which JSON cannot hold.
    import base64
    import json

    from skulk.core.ids import NodeId
    from skulk.core.inputs import Received
    from skulk.core.messages import Snapshot, SyncResponse
    from skulk.core.session import Session

    session = Session(clock=3, master=NodeId("n1"))
    state = b"\x00\xffstate"
    msg = SyncResponse(session=session, snapshot=Snapshot(session=session, index=7, state=state, digest="d"))
    tracer = Tracer()
    tracer.step(2.0, "n2", Received(sender=NodeId("n1"), message=msg))
    path = tmp_path / "trace.jsonl"
    tracer.write_jsonl(path, {"scenario": "x"})
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {"header": {"scenario": "x"}}
    written = json.dumps(lines[1])
    encoded = base64.b64encode(state).decode("ascii")
    assert {"base64": encoded} == _find_base64(lines[1])
    assert "n1" in written and lines[1]["kind"] == "Received"


def _find_base64(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"base64"}:
            return obj
        for v in obj.values():
            found = _find_base64(v)
            if found is not None:
                return found
    if isinstance(obj, list):
        for v in obj:
            found = _find_base64(v)
            if found is not None:
                return found
    return None
