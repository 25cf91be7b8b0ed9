"""Locust against a real three-node cluster: the four kinds of client, bounded in time and requests.

The smoke version of ``python -m loadtests.report``'s load section: streamed
chats (time to first token and tokens per second as Locust custom metrics),
plain chats, state polling and abandoning clients, all through every node's
API on loopback, for a few seconds. Nothing may fail, Locust's HTML and CSV
reports must be written, and the custom metrics must be in them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.capacity import prepare_serving, run_mixed
from loadtests.cluster import loopback_cluster
from loadtests.records import read_records

pytestmark = [pytest.mark.cluster, pytest.mark.reliability]

MAX_REQUESTS = 150


def test_four_kinds_of_client_against_three_real_nodes(models: Path, tmp_path: Path, artifacts: Path) -> None:
    with loopback_cluster(tmp_path, 3, models=models) as cluster:
        prepare_serving(cluster)
        result = run_mixed(cluster, artifacts, users=6, run_s=12, max_requests=MAX_REQUESTS, name="smoke")
        for node in cluster.nodes:
            assert cluster.metric(node, "skulk_handle_open_streams") == 0, f"{node} leaked a stream"
    kinds = result["summary"]["kinds"]
    print(f"\n[load smoke] {result['requests']} requests over {result['summary']['span_s']} s: "
          + "; ".join(f"{k}: {v['ok']}/{v['count']} ok, {v['rps']} rps" for k, v in kinds.items()))
    assert set(kinds) == {"stream", "chat", "state", "abandon"}, kinds
    assert result["summary"]["errors"] == {}, result["summary"]["errors"]
    assert all(v["failed"] == 0 and v["ok"] >= 1 for v in kinds.values()), kinds
    assert result["requests"] <= MAX_REQUESTS, "the request budget bounds the run"
    # Streams measured a first token and a token rate, and Locust got them as custom metrics.
    stream = kinds["stream"]
    assert stream["ttft_p50_s"] is not None and 0 < stream["ttft_p50_s"] < 30
    metrics = result["custom_metrics"]
    # (Streams that end while Locust is stopping are in the records but may miss its final CSV.)
    assert 1 <= metrics["METRIC time_to_first_token_ms"]["Request Count"] <= stream["ok"], metrics
    assert 1 <= metrics["METRIC tokens_per_second"]["Request Count"] <= stream["ok"], metrics
    assert metrics["METRIC time_to_first_token_ms"]["Failure Count"] == 0
    # Every record is complete, and the reports exist.
    records = read_records(Path(result["records"]))
    assert len(records) == result["requests"]
    assert all(r["t1"] - r["t0"] < 30 for r in records), "no request ran into the client's bound"
    html = Path(result["html"]).read_text()
    assert "time_to_first_token_ms" in html and "tokens_per_second" in html
    assert Path(result["csv"]).is_file()
