"""Bad inputs against a real node process (smoke): schema fuzzing and hostile clients.

Two real nodes; the default model is placed on the follower and every bad
input goes to the follower's API, so commands cross the cluster's wire to
the master; a small body limit keeps the "huge body" cases cheap. schemathesis drives every operation of the
node's own ``/openapi.json`` (valid and invalid requests) over real HTTP;
then hand-written raw-socket clients send huge bodies (declared, sent,
chunked), deeply nested JSON, invalid UTF-8, header bombs, slowloris-style
slow clients and abrupt disconnects. No 5xx, no hang, every error in the
OpenAI envelope, and the node still serving afterwards with no stream leaked.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from loadtests.cluster import loopback_cluster
from loadtests.fuzz import fuzz_openapi, hostile_cases, still_serving
from skulk.engine.models import DEFAULT_MODEL_ID

pytestmark = [pytest.mark.cluster, pytest.mark.reliability]

BODY_LIMIT = 256 * 1024


def test_fuzzing_and_hostile_clients_never_break_a_real_node(models: Path, tmp_path: Path, artifacts: Path) -> None:
    # With a store node (n-1) so the /store/* operations answer rather than 503 "Store not configured";
    # offline, so a fuzzed model id sent to the hub is refused at once instead of waiting on the internet.
    env = {"SKULK_API_MAX_BODY_BYTES": str(BODY_LIMIT), "SKULK_STORE": "n-1", "HF_HUB_OFFLINE": "1"}
    with loopback_cluster(tmp_path, 2, models=models, env=env) as cluster:
        master = cluster.wait_master()
        cluster.wait_memory_known()
        (node,) = [n for n in cluster.nodes if n != master]
        iid = cluster.place(DEFAULT_MODEL_ID, via=node, excluded=[master])
        cluster.wait_ready(iid, via=node)
        url = cluster.url(node)
        hostile = hostile_cases(url, model=DEFAULT_MODEL_ID, body_limit=BODY_LIMIT, slow_clients=20, slow_hold_s=3.0,
                                disconnects=20)
        fuzz = fuzz_openapi(url, examples=6, model=DEFAULT_MODEL_ID)
        health = still_serving(url, DEFAULT_MODEL_ID, node)
        replicated_at = cluster.wait_replicated()  # no bad input stalled replication
        alive = cluster.alive()
        degraded = [cluster.metric(n, "skulk_eventlog_degraded") for n in cluster.nodes]
    (artifacts / "fuzz.json").write_text(json.dumps({"fuzz": fuzz, "hostile": [asdict(h) for h in hostile],
                                                      "health": health}, indent=1))
    for case in hostile:
        print(f"[hostile] {'ok  ' if case.ok else 'FAIL'} {case.name}: {case.sent} -> {case.outcome}")
    print(f"[fuzz] {fuzz['requests']} requests over {fuzz['operations']} operations: statuses {fuzz['statuses']}, "
          f"{fuzz['generations_served']} generations served; after: {health}")
    assert [c.name for c in hostile if not c.ok] == [], [asdict(c) for c in hostile if not c.ok]
    # 14 OpenAI and control operations, /healthz, 8 of the Responses, Anthropic and Ollama dialects,
    # and 8 of the model catalogue and store (/models/cards, /models/add, six /store/*).
    assert fuzz["operations"] == 31 and fuzz["requests"] >= 50
    assert fuzz["server_errors"] == [] and fuzz["hung"] == [] and fuzz["not_enveloped"] == []
    assert fuzz["generations_served"] >= 1, "valid generations reached the runner"
    assert health["ok"], health
    assert sorted(alive) == sorted(cluster.nodes), "every node process survived"
    assert replicated_at > 0 and degraded == [0.0, 0.0], degraded
