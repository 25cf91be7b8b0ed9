"""Real node processes on loopback (issue 5, "Must show").

- Three nodes discover each other, elect one master, agree on the state
  digest, place the default model and bring its runners to ready; ``kill -9``
  of the master yields a new master, and the instance whose nodes survived is
  still placed with the very same runner processes ready (no re-load). The
  test prints the time from the kill to the new master's first indexed event.
- A process without the cluster key cannot join or inject an event.
- A full disk on the master does not stop the cluster (root: a tiny tmpfs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from skulk.core.codec import from_wire
from skulk.core.state import State, digest
from skulk.engine.models import TINY_MODEL_ID
from skulk.runtime.localcluster import LocalCluster
from tests.support.cluster import (
    get,
    metric,
    post,
    start_cluster,
    wait_for,
    wait_stable,
    zenoh_spy,
)

pytestmark = pytest.mark.cluster


def _digest_agreement(cluster: LocalCluster, nodes: list[str]) -> tuple[int, str] | None:
    """(index, digest) when every node reports the same applied prefix and the same digest."""
    states = [get(cluster, n, "/state") for n in nodes]
    if len({s["lastIndex"] for s in states}) != 1 or states[0]["session"] is None:
        return None
    digests = {digest(from_wire(State, s)) for s in states}
    return (states[0]["lastIndex"], digests.pop()) if len(digests) == 1 else None


def _one_master(cluster: LocalCluster, nodes: list[str]) -> str | None:
    sessions = [get(cluster, n, "/state")["session"] for n in nodes]
    if any(s is None for s in sessions) or len({(s["clock"], s["master"]) for s in sessions}) != 1:
        return None
    return sessions[0]["master"]


def _ready_runners(cluster: LocalCluster, node: str, instance_id: str) -> dict[str, str] | None:
    state = get(cluster, node, "/state")
    wrapped = state["instances"].get(instance_id)
    if wrapped is None:
        return None
    body = next(iter(wrapped.values()))
    n2r = body["shardAssignments"]["nodeToRunner"]
    if all("RunnerReady" in state["runners"].get(r, {}) for r in n2r.values()):
        return n2r
    return None


def _runner_pids(cluster: LocalCluster, node: str) -> dict[str, int]:
    diag = get(cluster, node, "/v1/diagnostics/node")
    return {r["runnerId"]: r["pid"] for r in diag["runners"]}


def test_three_nodes_elect_agree_place_and_survive_a_master_kill(models_dir: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    with start_cluster(tmp_path, 3, models_dir=models_dir) as cluster:
        nodes = [p.node_id for p in cluster.plans]
        master = wait_stable("one settled master", lambda: _one_master(cluster, nodes), 30)
        t_master = time.monotonic() - started
        wait_for("every node in every topology",
                 lambda: all(len(get(cluster, n, "/state")["topology"]["nodes"]) == 3 for n in nodes), 30)
        # Links: every node reached both others (6 directed connections).
        wait_for("observed links",
                 lambda: len(get(cluster, nodes[0], "/state")["topology"]["connections"]) >= 6, 30)
        index, agreed = wait_for("equal state digests", lambda: _digest_agreement(cluster, nodes), 30, 0.02)
        print(f"\n[cluster] master {master} after {t_master:.2f} s; digests agree at index {index}: {agreed[:16]}")

        # Place the default model on the two followers (a 2-rank pipeline ring).
        followers = [n for n in nodes if n != master]
        t_place = time.monotonic()
        placed = post(cluster, followers[0], "/place_instance",
                      {"model_id": TINY_MODEL_ID, "min_nodes": 2, "excluded_nodes": [master]})
        assert "instance_id" in placed, placed
        iid = placed["instance_id"]
        n2r = wait_for("runners ready", lambda: _ready_runners(cluster, followers[0], iid), 120, 0.1)
        t_ready = time.monotonic() - t_place
        assert sorted(n2r) == sorted(followers)
        print(f"[cluster] placement -> both runners ready: {t_ready:.2f} s")
        pids = {n: _runner_pids(cluster, n) for n in followers}
        assert all(pids[n].get(n2r[n]) for n in followers), pids
        for n in nodes:
            assert _ready_runners(cluster, n, iid) == n2r, "every node sees the same ready instance"
        chat = {"model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        reply = post(cluster, master, "/v1/chat/completions", chat, timeout_s=60)
        assert reply["usage"]["completion_tokens"] == 4, reply

        # kill -9 the master.
        old_session = get(cluster, followers[0], "/state")["session"]
        t_kill = cluster.kill(master)
        new_master = wait_for("a new master", lambda: (m := _one_master(cluster, followers)) != master and m, 30)
        first_indexed = wait_for("the new master's first indexed event",
                                 lambda: metric(cluster, new_master, "skulk_master_session_started_unixtime"), 10)
        kill_to_event = first_indexed - t_kill
        new_session = get(cluster, new_master, "/state")["session"]
        assert new_session["clock"] > old_session["clock"] and new_master in followers
        print(f"[cluster] kill -9 {master} -> new master {new_master}'s first indexed event: {kill_to_event:.3f} s")
        assert 0 < kill_to_event < 15

        # The surviving instance: still placed, same ready runners, same processes.
        assert wait_for("the instance still ready", lambda: _ready_runners(cluster, followers[1], iid), 30) == n2r
        for n in followers:
            assert _runner_pids(cluster, n) == pids[n], "no runner was restarted (no re-load)"
            assert metric(cluster, n, "skulk_runner_exits_total") == 0
        wait_for("digests agree in the new session", lambda: _digest_agreement(cluster, followers), 30, 0.02)
        reply = post(cluster, new_master, "/v1/chat/completions", chat, timeout_s=60)
        assert reply["usage"]["completion_tokens"] == 4, reply

        # The killed node restarts as the same node and rejoins; the sitting master keeps its session.
        cluster.start(master)
        cluster.wait_ready(nodes=[master], timeout_s=60)
        wait_for("the old master back in every topology",
                 lambda: all(master in get(cluster, n, "/state")["topology"]["nodes"] for n in nodes), 30)
        assert _one_master(cluster, nodes) == new_master
        assert get(cluster, master, "/state")["session"] == new_session
        wait_for("digests agree with the restarted node", lambda: _digest_agreement(cluster, nodes), 30, 0.02)
        status = subprocess.run([sys.executable, "-m", "skulk.cli", "status", "--url", cluster.plan(master).url],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        assert f"master: {new_master}" in status.stdout and "nodes (3)" in status.stdout
        assert f"{iid}: {TINY_MODEL_ID}" in status.stdout and "RunnerReady" in status.stdout
    codes = cluster.exit_codes  # type: ignore[attr-defined]
    assert all(codes[n] == 0 for n in nodes), codes


def test_a_process_without_the_cluster_key_cannot_join_or_inject(tmp_path: Path) -> None:
    import asyncio

    from skulk.core.commands import PlaceInstance
    from skulk.core.events import IndexedEvent, NodeGatheredInfo
    from skulk.core.ids import CommandId, ModelId, NodeId
    from skulk.core.messages import (
        Candidate,
        CommandMessage,
        ElectionMessage,
        GlobalEvent,
        LocalEventMessage,
        Vote,
    )
    from skulk.core.session import Incarnation, Session
    from skulk.runtime.transport import Transport, TransportSettings
    from tests.support.cluster import free_port_block

    with start_cluster(tmp_path, 2) as cluster:
        nodes = [p.node_id for p in cluster.plans]
        master = wait_stable("one settled master", lambda: _one_master(cluster, nodes), 30)
        before = get(cluster, nodes[0], "/state")
        ns = cluster.plans[0].env["SKULK_NAMESPACE"]
        port = free_port_block(1, ["127.0.0.1"])

        async def intrude() -> int:
            intruder = Transport(
                TransportSettings(node_id="intruder", namespace=ns, secret=b"not-the-key-" * 3,
                                  listen=(f"tcp/127.0.0.1:{port}",),
                                  connect=tuple(f"tcp/{p.api_host}:{p.zenoh_port}" for p in cluster.plans),
                                  multicast=False, lease_ms=2000, api_port=1, incarnation="x"),
                on_message=lambda s, m: None, on_peers=lambda p: None,
            )
            await intruder.start()
            fake = Session(clock=10**6, master=NodeId("intruder"))
            vote = Vote(candidate=Candidate(clock=10**6, seniority=10**9, commands_seen=10**6,
                                            node_id=NodeId("intruder")))
            for i in range(20):
                intruder.send(ElectionMessage(clock=10**6, campaigning=True, votes=(vote,)), None)
                intruder.send(ElectionMessage(clock=10**6, campaigning=False, votes=(Vote(candidate=vote.candidate,
                              session=fake),), log_next=5), None)
                intruder.send(CommandMessage(origin=NodeId("intruder"), command=PlaceInstance(
                    command_id=CommandId(f"evil-{i}"), model_id=ModelId(TINY_MODEL_ID))), NodeId(master))
                intruder.send(LocalEventMessage(origin=NodeId("intruder"), session=Session(**before["session"]),
                              origin_idx=i, event=NodeGatheredInfo(node_id=NodeId("intruder")),
                              incarnation=Incarnation(number=1, boot_at=0.0)), NodeId(master))
                intruder.send(GlobalEvent(session=Session(**before["session"]), indexed=IndexedEvent(
                    index=before["lastIndex"] + 1 + i, event=NodeGatheredInfo(node_id=NodeId("intruder")), at=0.0)),
                    None)
                await asyncio.sleep(0.1)  # pacing: twenty rounds over two seconds, not a wait for anything

            def all_dropped() -> bool:  # every node rejected the whole burst
                return all((metric(cluster, n, "skulk_transport_dropped_bad_mac_total") or 0) >= 20 for n in nodes)

            await asyncio.to_thread(wait_for, "the intruder's messages dropped", all_dropped, 20)
            members = len(intruder.members)
            await intruder.close()
            return members

        assert asyncio.run(intrude()) == 0
        for n in nodes:
            state = get(cluster, n, "/state")
            assert state["session"] == before["session"], "no election was forced"
            assert "intruder" not in state["topology"]["nodes"] and "intruder" not in state["lastSeen"]
            assert state["instances"] == {}, "no command was accepted"
            assert metric(cluster, n, "skulk_peers") == 1, "only the keyed peer is a member"
            assert metric(cluster, n, "skulk_transport_dropped_bad_mac_total") >= 20
        assert _one_master(cluster, nodes) == master

        # Without the key, the intruder records the cluster's own (authentic)
        # traffic for a while and puts every message back: each is dropped as
        # replayed, and nothing changes.
        before_replay = {n: metric(cluster, n, "skulk_transport_dropped_replayed_total") or 0 for n in nodes}
        spy = zenoh_spy([f"tcp/{p.api_host}:{p.zenoh_port}" for p in cluster.plans])
        captured: list[tuple[str, bytes]] = []
        sub = spy.declare_subscriber(f"skulk/{ns}/**", lambda smp: captured.append(
            (str(smp.key_expr), smp.payload.to_bytes())))
        try:
            # Record until the cluster's own traffic (heartbeats, telemetry, events) gave enough.
            wait_for("traffic to record", lambda: sum("/alive/" not in k for k, _ in list(captured)) >= 10, 20)
            recorded = [(k, raw) for k, raw in list(captured) if "/alive/" not in k]
            for k, raw in recorded:
                spy.put(k, raw)
            replayed = len(recorded)
            wait_for("replays dropped", lambda: sum(metric(cluster, n, "skulk_transport_dropped_replayed_total")
                                                     for n in nodes) - sum(before_replay.values()) >= replayed // 2, 10)
        finally:
            sub.undeclare()
            spy.close()
        for n in nodes:
            state = get(cluster, n, "/state")
            assert state["session"] == before["session"] and state["instances"] == {}
        wait_for("digests agree after the replay", lambda: _digest_agreement(cluster, nodes), 30, 0.05)


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="a tiny tmpfs needs root (the disk log's unit tests use a failing file)")
def test_a_full_disk_on_the_master_does_not_stop_the_cluster(models_dir: Path, tmp_path: Path) -> None:
    tiny = tmp_path / "tiny"
    _mount_tmpfs(tiny, "8m")
    try:
        per_node = {0: {"SKULK_HOME": str(tiny / "home"), "SKULK_FORCE_MASTER": "1",
                        "SKULK_EVENTLOG_MIN_FREE_BYTES": "0"}}
        with start_cluster(tmp_path, 2, models_dir=models_dir, per_node_env=per_node) as cluster:
            nodes = [p.node_id for p in cluster.plans]
            master = wait_stable("one settled master", lambda: _one_master(cluster, nodes), 30)
            assert master == nodes[0]
            follower = nodes[1]
            placed = post(cluster, follower, "/place_instance", {"model_id": TINY_MODEL_ID, "min_nodes": 1,
                                                                 "excluded_nodes": [master]})
            iid = placed["instance_id"]
            wait_for("runner ready", lambda: _ready_runners(cluster, follower, iid), 120)
            assert metric(cluster, master, "skulk_eventlog_degraded") == 0
            # Fill the master's disk to the last byte.
            subprocess.run(["dd", "if=/dev/zero", f"of={tiny}/filler", "bs=64k"], capture_output=True)
            before = get(cluster, follower, "/state")["lastIndex"]
            chat = {"model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            for _ in range(3):
                reply = post(cluster, master, "/v1/chat/completions", chat, timeout_s=60)
                assert reply["usage"]["completion_tokens"] == 3, reply
            wait_for("degraded mode", lambda: metric(cluster, master, "skulk_eventlog_degraded") == 1, 20)
            # Serving goes on and the log keeps advancing, densely, on the follower.
            for _ in range(2):
                reply = post(cluster, follower, "/v1/chat/completions", chat, timeout_s=60)
                assert reply["usage"]["completion_tokens"] == 3, reply
            wait_for("the log advancing", lambda: get(cluster, follower, "/state")["lastIndex"] > before + 10, 30)
            wait_for("digests agree", lambda: _digest_agreement(cluster, nodes), 30, 0.02)
            assert metric(cluster, master, "skulk_eventlog_dropped_total") > 0
            assert _one_master(cluster, nodes) == master
        log = (tmp_path / "logs" / f"{master}.log").read_text()
        critical = [line for line in log.splitlines() if " CRITICAL " in line]
        assert len([c for c in critical if "event log" in c]) == 1, critical
    finally:
        subprocess.run(["umount", "-l", str(tiny)], check=False)
