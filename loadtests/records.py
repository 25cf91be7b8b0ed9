"""Per-request records of a load run, and the figures computed from them.

Theory of operation
-------------------
Every request a Locust user makes (``loadtests/locustfile.py``) is also
written as one JSON line (``SKULK_LOAD_RECORD``): what kind it was, which
node it went to, when it started and ended (wall clock, seconds), whether it
succeeded, and for failures the error code the API gave (an OpenAI envelope
or an in-band SSE error event) or the client-side exception. Streams add
the time to first token and tokens per second.

Locust's own CSV and HTML report cover throughput and latency; these
records answer what Locust cannot: which requests were open at a fault,
whether each failure was a clear error or a hang, when service resumed.

A record is a plain dict (``REQUIRED`` keys always present); ``summarise``,
``percentile`` and ``failover_figures`` are pure functions of the records.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "KINDS",
    "REQUIRED",
    "HUNG",
    "read_records",
    "percentile",
    "summarise",
    "failover_figures",
    "clear_error",
]

KINDS = ("stream", "chat", "state", "abandon")
REQUIRED = ("kind", "node", "t0", "t1", "ok", "status", "error", "message")
# The error code of a request that ran past the client's hard bound: a hang.
HUNG = "client_timeout"


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record in ``path`` (JSON lines), ordered by start time; [] if the file is absent."""
    if not path.is_file():
        return []
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        rec = json.loads(line)
        missing = [k for k in REQUIRED if k not in rec]
        assert not missing, f"{path}:{number}: record lacks {missing}"
        assert rec["kind"] in KINDS, f"{path}:{number}: unknown kind {rec['kind']!r}"
        assert rec["t1"] >= rec["t0"], f"{path}:{number}: ends before it starts"
        out.append(rec)
    out.sort(key=lambda r: (r["t0"], r["t1"]))
    return out


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100, nearest rank) of ``values``; None when empty."""
    assert 0.0 <= q <= 100.0, q
    data = sorted(values)
    if not data:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(data)))
    return data[rank - 1]


def clear_error(rec: dict[str, Any]) -> bool:
    """A failed request ended with a named error (a code and a message), not a hang or silence."""
    return not rec["ok"] and bool(rec["error"]) and rec["error"] != HUNG and bool(rec["message"])


def summarise(records: list[dict[str, Any]], *, t0: float | None = None, t1: float | None = None) -> dict[str, Any]:
    """Figures per kind of request over ``[t0, t1]`` (default: the records' own span).

    Per kind: count, ok, failed, requests per second, latency p50/p95 (s),
    and for streams time to first token p50/p95 (s) and tokens per second
    p50 (per stream, after its first token). ``errors`` counts failures by code.
    """
    if not records:
        return {"span_s": 0.0, "kinds": {}, "errors": {}}
    start = min(r["t0"] for r in records) if t0 is None else t0
    end = max(r["t1"] for r in records) if t1 is None else t1
    span = max(end - start, 1e-9)
    inside = [r for r in records if start <= r["t0"] <= end]
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        rs = [r for r in inside if r["kind"] == kind]
        if not rs:
            continue
        ok = [r for r in rs if r["ok"]]
        entry: dict[str, Any] = {
            "count": len(rs),
            "ok": len(ok),
            "failed": len(rs) - len(ok),
            "rps": round(len(ok) / span, 3),
            "latency_p50_s": _round(percentile((r["t1"] - r["t0"] for r in ok), 50)),
            "latency_p95_s": _round(percentile((r["t1"] - r["t0"] for r in ok), 95)),
        }
        ttft = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
        if ttft:
            entry["ttft_p50_s"] = _round(percentile(ttft, 50))
            entry["ttft_p95_s"] = _round(percentile(ttft, 95))
        tps = [r["tps"] for r in ok if r.get("tps")]
        if tps:
            entry["tps_p50"] = _round(percentile(tps, 50))
            entry["tokens_total"] = sum(int(r.get("tokens") or 0) for r in ok)
        kinds[kind] = entry
    errors = Counter(r["error"] for r in inside if not r["ok"])
    return {"span_s": round(span, 3), "kinds": kinds, "errors": dict(sorted(errors.items()))}


def failover_figures(records: list[dict[str, Any]], kill_at: float, *, kinds: tuple[str, ...] = ("stream", "chat")) -> dict[str, Any]:
    """What a master kill at ``kill_at`` did to the generation requests in ``records``.

    - ``open_at_kill``: requests started before the kill and ending after it;
    - ``failed``: failed requests that were open at the kill or started after it,
      by error code, and how many of them were clear errors (``clear_error``);
    - ``hung``: requests that ran into the client's hard bound (none may);
    - ``resume_s``: from the kill to the end of the first request started after
      the kill that succeeded (None if none did); ``first_token_s`` likewise to
      the first token of the first successful stream started after the kill;
    - ``longest_open_s``: the longest a request open at the kill stayed open after it.
    """
    gen = [r for r in records if r["kind"] in kinds]
    open_at = [r for r in gen if r["t0"] <= kill_at < r["t1"]]
    affected = [r for r in gen if r["t1"] >= kill_at]
    failed = [r for r in affected if not r["ok"]]
    after_ok = [r for r in gen if r["t0"] >= kill_at and r["ok"]]
    first_ok = min((r["t1"] for r in after_ok), default=None)
    tokens = [r["t0"] + r["ttft_s"] for r in after_ok if r.get("ttft_s") is not None]
    return {
        "requests": len(gen),
        "open_at_kill": len(open_at),
        "failed": len(failed),
        "failed_by_error": dict(sorted(Counter(r["error"] for r in failed).items())),
        "failed_clear": sum(1 for r in failed if clear_error(r)),
        "hung": sum(1 for r in gen if r["error"] == HUNG),
        "resume_s": None if first_ok is None else round(first_ok - kill_at, 3),
        "first_token_s": None if not tokens else round(min(tokens) - kill_at, 3),
        "longest_open_s": round(max((r["t1"] - kill_at for r in open_at), default=0.0), 3),
        "ok_after_kill": len(after_ok),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
