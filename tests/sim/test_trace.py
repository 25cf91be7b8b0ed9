"""The trace's digest: SHA-256 over each record's 8-byte BLAKE2b of its msgpack encoding.

Every digest recorded for a seed (``chaos digests``) depends on exactly this
arithmetic; the tracer keeps the hashes in one byte array and hashes it once.
"""

from __future__ import annotations

import hashlib

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
