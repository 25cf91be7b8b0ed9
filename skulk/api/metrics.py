"""``GET /metrics``: the API's own counters, the cluster as this node sees it, and the node's.

Theory of operation
-------------------
Three sources, one Prometheus text exposition (version 0.0.4):

- ``ApiMetrics``: counters the API keeps itself (requests by method, route
  template and status; streams open; tokens streamed; time to first token);
- gauges derived from the replicated state (nodes, instances, tasks, runners
  by status, whether this node is master);
- ``NodePort.metrics()``: whatever the runtime counts (names ending in
  ``_total`` are exposed as counters, others as gauges);
- the KV budget and prefix cache of each rank-0 runner on this node (from
  ``NodePort.runner_diagnostics()``, as its heartbeats report them),
  labelled by instance, runner and rank.

Label values are escaped per the exposition format; metric names are checked,
so a bad name from the runtime is dropped with a comment rather than breaking
the whole page for scrapers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

from skulk.api.port import NodePort

__all__ = ["ApiMetrics", "render_metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


@dataclass
class ApiMetrics:
    """Counters the API keeps; mutated only from the event loop (no locking needed)."""

    requests: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    streams_active: int = 0
    streams_total: int = 0
    tokens_streamed_total: int = 0
    abandoned_total: int = 0
    ttft_seconds_sum: float = 0.0
    ttft_count: int = 0

    def observe_request(self, method: str, route: str, status: int) -> None:
        assert 100 <= status <= 599, status
        self.requests[(method, route, status)] += 1

    def observe_ttft(self, seconds: float) -> None:
        assert seconds >= 0.0, seconds
        self.ttft_seconds_sum += seconds
        self.ttft_count += 1


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _family(lines: list[str], name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
    assert _NAME.match(name), name
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
        lines.append(f"{name}{{{label_text}}} {_number(value)}" if label_text else f"{name} {_number(value)}")


# (metric, kind, help, KvUse wire field, scaled to bytes by bytesPerPosition)
_KV_FAMILIES: tuple[tuple[str, str, str, str, bool], ...] = (
    ("skulk_runner_kv_budget_positions", "gauge", "KV positions this runner may hold (rows and prefix cache).", "budgetPositions", False),
    ("skulk_runner_kv_budget_bytes", "gauge", "The KV budget in bytes on rank 0.", "budgetPositions", True),
    ("skulk_runner_kv_rows_positions", "gauge", "KV positions the requests decoding or prefilling may hold (their peak).", "rowsPositions", False),
    ("skulk_runner_kv_rows_bytes", "gauge", "KV bytes the requests decoding or prefilling may hold, on rank 0.", "rowsPositions", True),
    ("skulk_runner_kv_cache_positions", "gauge", "KV positions held by prefix-cache entries.", "cachePositions", False),
    ("skulk_runner_kv_cache_bytes", "gauge", "KV bytes held by prefix-cache entries, on rank 0.", "cachePositions", True),
    ("skulk_runner_kv_cache_entries", "gauge", "Prefix-cache entries.", "cacheEntries", False),
    ("skulk_runner_prefix_hits_total", "counter", "Requests that started from a prefix-cache entry.", "prefixHits", False),
    ("skulk_runner_prefix_misses_total", "counter", "Requests that found no reusable prefix.", "prefixMisses", False),
    ("skulk_runner_prefix_tokens_reused_total", "counter", "Prompt tokens served from the prefix cache instead of prefilled.", "positionsReused", False),
    ("skulk_runner_kv_refused_total", "counter", "Requests refused with 503 kv_budget_exhausted.", "refused", False),
)


def _runner_kv(lines: list[str], rows: list[dict[str, object]]) -> None:
    samples: list[tuple[dict[str, str], dict[str, int]]] = []
    for row in rows:
        kv = row.get("kv")
        if isinstance(kv, dict):
            labels = {"instance": str(row.get("instanceId", "")), "runner": str(row.get("runnerId", "")), "rank": str(row.get("rank", 0))}
            samples.append((labels, {k: int(v) for k, v in kv.items() if isinstance(v, (int, float))}))
    if not samples:
        return
    for name, kind, help_text, key, as_bytes in _KV_FAMILIES:
        values = [(labels, kv.get(key, 0) * (kv.get("bytesPerPosition", 0) if as_bytes else 1)) for labels, kv in samples]
        _family(lines, name, kind, help_text, values)


def render_metrics(node: NodePort, api: ApiMetrics) -> str:
    """The whole exposition text, ending with a newline."""
    lines: list[str] = []
    _family(
        lines,
        "skulk_api_requests_total",
        "counter",
        "HTTP requests answered by this node's API.",
        [
            ({"method": m, "route": r, "status": str(s)}, n)
            for (m, r, s), n in sorted(api.requests.items())
        ],
    )
    _family(lines, "skulk_api_streams_active", "gauge", "Server-sent event streams open now.", [({}, api.streams_active)])
    _family(lines, "skulk_api_streams_total", "counter", "Server-sent event streams opened.", [({}, api.streams_total)])
    _family(lines, "skulk_api_tokens_streamed_total", "counter", "Generated tokens streamed to clients.", [({}, api.tokens_streamed_total)])
    _family(lines, "skulk_api_abandoned_total", "counter", "Requests abandoned because the client went away or cancelled.", [({}, api.abandoned_total)])
    _family(
        lines,
        "skulk_api_time_to_first_token_seconds",
        "summary",
        "Time from accepting a streamed request to its first generated text.",
        [],
    )
    lines.append(f"skulk_api_time_to_first_token_seconds_sum {_number(api.ttft_seconds_sum)}")
    lines.append(f"skulk_api_time_to_first_token_seconds_count {api.ttft_count}")

    state = node.state
    _family(lines, "skulk_cluster_nodes", "gauge", "Nodes in this node's replicated topology.", [({}, len(state.topology.nodes))])
    _family(lines, "skulk_cluster_instances", "gauge", "Placed model instances.", [({}, len(state.instances))])
    _family(lines, "skulk_cluster_tasks", "gauge", "Generation tasks the master has indexed and not yet deleted.", [({}, len(state.tasks))])
    by_status = Counter(type(s).__name__ for s in state.runners.values())
    _family(
        lines, "skulk_cluster_runners", "gauge", "Runners by status.", [({"status": k}, v) for k, v in sorted(by_status.items())]
    )
    _family(lines, "skulk_node_is_master", "gauge", "1 when this node is the session's master.", [({}, 1 if node.is_master else 0)])
    _family(lines, "skulk_state_last_index", "gauge", "Index of the last applied event in this session.", [({}, state.last_index)])

    _runner_kv(lines, node.runner_diagnostics())

    for name, value in sorted(node.metrics().items()):
        if not _NAME.match(name) or name.startswith("skulk_api_"):
            lines.append(f"# skipped invalid or reserved metric name {name!r}")
            continue
        kind = "counter" if name.endswith("_total") else "gauge"
        _family(lines, name, kind, "Reported by the node runtime.", [({}, value)])
    return "\n".join(lines) + "\n"
