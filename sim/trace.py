"""The run's trace: every step, fault and client action, with a digest.

Theory of operation
-------------------
Each record is ``(time, host, kind, payload)``: for a step, ``kind`` is the
input's type and ``payload`` the input itself (an immutable record); for a
note (a fault, a client action, a phase), a short string. Each record is
hashed when it is taken (canonical msgpack, BLAKE2b, 8 bytes); the run's
digest is SHA-256 over those hashes in order. Two runs of the same seed must
have the same digest; when they do not, the first index where the per-record
hashes differ names the first divergent event.

Only the last ``keep`` records are held in memory (the hashes are all kept),
as four columns rather than a tuple per record: a run takes hundreds of
thousands of steps, and a tuple is an object the cyclic garbage collector
walks at each of its passes, long after the step (``records`` builds the
tuples when a failure report asks for them);
``write_jsonl`` writes them with the core's wire codec, one JSON object per
line, after a header line describing the run; raw bytes (a snapshot's
encoded state in a ``SyncResponse``) are written as ``{"base64": ...}``.

Invariants kept: the digest depends only on the records' content and order
(never on object identity, hash seeds or wall time).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from skulk.core.codec import to_wire

__all__ = ["Tracer", "render_record"]

_ENCODER = msgspec.msgpack.Encoder(order="deterministic")
_blake2b = hashlib.blake2b


class Tracer:
    """Collects records and their hashes for one run.

    Hashes are kept in one ``bytearray`` (8 bytes per record); the run's
    digest is SHA-256 over it, taken once.
    """

    def __init__(self, *, keep: int = 400_000) -> None:
        assert keep > 0
        self._times: deque[float] = deque(maxlen=keep)
        self._hosts: deque[str] = deque(maxlen=keep)
        self._kinds: deque[str] = deque(maxlen=keep)
        self._payloads: deque[Any] = deque(maxlen=keep)
        self._hashes = bytearray()
        self.count = 0

    @property
    def records(self) -> list[tuple[float, str, str, Any]]:
        """The kept records as ``(time, host, kind, payload)``, oldest first (built on each call)."""
        return list(zip(self._times, self._hosts, self._kinds, self._payloads))

    def _keep(self, t: float, host: str, kind: str, payload: Any) -> None:
        self._times.append(t)
        self._hosts.append(host)
        self._kinds.append(kind)
        self._payloads.append(payload)

    @property
    def hashes(self) -> list[bytes]:
        raw = self._hashes
        return [bytes(raw[i : i + 8]) for i in range(0, len(raw), 8)]

    def _add(self, data: bytes) -> None:
        self._hashes += _blake2b(data, digest_size=8).digest()
        self.count += 1

    def step(self, t: float, host: str, inp: Any) -> None:
        kind = type(inp).__name__
        self._times.append(t)
        self._hosts.append(host)
        self._kinds.append(kind)
        self._payloads.append(inp)
        self._hashes += _blake2b(_ENCODER.encode((t, host, kind, inp)), digest_size=8).digest()
        self.count += 1

    def note(self, t: float, host: str, kind: str, text: str) -> None:
        self._keep(t, host, kind, text)
        self._add(_ENCODER.encode((t, host, kind, text)))

    def digest(self) -> str:
        return hashlib.sha256(self._hashes).hexdigest()

    def first_kept_index(self) -> int:
        return self.count - len(self._times)

    def record_at(self, index: int) -> tuple[float, str, str, Any] | None:
        first = self.first_kept_index()
        if index < first or index >= self.count:
            return None
        i = index - first
        return (self._times[i], self._hosts[i], self._kinds[i], self._payloads[i])

    def hash_at(self, index: int) -> bytes:
        return bytes(self._hashes[8 * index : 8 * index + 8])

    def write_jsonl(self, path: Path, header: dict[str, Any]) -> None:
        """Write the header then every kept record, one JSON object per line."""
        path.parent.mkdir(parents=True, exist_ok=True)
        first = self.first_kept_index()
        with path.open("w", encoding="utf-8") as out:
            out.write(json.dumps({"header": header}, sort_keys=True) + "\n")
            for offset, rec in enumerate(self.records):
                out.write(json.dumps(render_record(first + offset, rec, self.hash_at(first + offset)),
                                     default=_json_default) + "\n")

    def write_hashes(self, path: Path) -> None:
        path.write_bytes(bytes(self._hashes))


def _json_default(obj: Any) -> Any:
    """JSON for what the wire codec leaves as it is: bytes (a snapshot's encoded state)."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"base64": base64.b64encode(bytes(obj)).decode("ascii")}
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def render_record(index: int, rec: tuple[float, str, str, Any], digest: bytes | None = None) -> dict[str, Any]:
    """A JSON-ready view of one record (inputs in the core's wire shape)."""
    t, host, kind, payload = rec
    out: dict[str, Any] = {"i": index, "t": round(t, 9), "host": host, "kind": kind}
    if isinstance(payload, str):
        out["note"] = payload
    else:
        out["input"] = to_wire(payload)
    if digest is not None:
        out["hash"] = digest.hex()
    return out


def read_hashes(path: Path) -> list[bytes]:
    raw = path.read_bytes()
    assert len(raw) % 8 == 0, f"{path}: not a hash file"
    return [raw[i : i + 8] for i in range(0, len(raw), 8)]


def first_divergence(a: Iterable[bytes], b: Iterable[bytes]) -> int | None:
    """The first index where two hash sequences differ (None when equal)."""
    la, lb = list(a), list(b)
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            return i
    if len(la) != len(lb):
        return min(len(la), len(lb))
    return None
