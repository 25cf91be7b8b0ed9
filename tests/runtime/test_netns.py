"""Three "machines" in network namespaces, one pair joined twice: once plainly, once
over an address in the VPN (Tailscale) range. Real interface discovery, real
link probes, real rings.

The nodes elect a master (node 3 is forced, so the scenario is fixed), agree
on the state, and a two-rank instance is placed on nodes 1 and 2, whose
pair has both links: its ring must use the plain one, although the VPN link
was observed too. ``kill -9`` of the master then yields a new master with the
instance still placed and its runners still ready.
"""

from __future__ import annotations

import ipaddress
import random
import time
from pathlib import Path

import pytest

from skulk.core.codec import from_wire
from skulk.core.state import State, digest
from skulk.engine.models import DEFAULT_MODEL_ID
from skulk.runtime import auth
from skulk.runtime.localcluster import LocalCluster, NodePlan
from tests.support.cluster import FAST_ENV, wait_for, wait_stable
from loadtests.netns import Netns, netns_available, ns_http

pytestmark = [pytest.mark.cluster, pytest.mark.netns]

API_PORT = 52415


def assert_served(reply: object) -> None:
    """A whole reply: 4 tokens cut by the limit, or fewer ended by the model, usage agreeing."""
    assert isinstance(reply, dict) and "choices" in reply, reply
    tokens, finish = reply["usage"]["completion_tokens"], reply["choices"][0]["finish_reason"]
    assert (finish == "length" and tokens == 4) or (finish == "stop" and 1 <= tokens <= 4), reply
ZENOH_PORT = 52416
VPN_NET = ipaddress.ip_network("100.64.0.0/10")

_ok, _why = netns_available()
if not _ok:
    pytest.skip(f"network namespaces unavailable: {_why}", allow_module_level=True)


def test_three_namespaces_ring_avoids_the_vpn_link_and_survive_a_master_kill(models_dir: Path, tmp_path: Path) -> None:
    with Netns(3) as net:
        # Plain links between every pair ("eth" names), and a second link between
        # machines 0 and 1 whose only tell is its VPN-range address.
        net.link(0, 1, "10.77.1.1/24", "10.77.1.2/24", a_name="eth1", b_name="eth1")
        net.link(1, 2, "10.77.2.1/24", "10.77.2.2/24", a_name="eth2", b_name="eth2")
        net.link(0, 2, "10.77.3.1/24", "10.77.3.2/24", a_name="eth3", b_name="eth3")
        net.link(0, 1, "100.64.7.1/24", "100.64.7.2/24", a_name="eth9", b_name="eth9")
        primary = ["10.77.1.1", "10.77.2.1", "10.77.2.2"]
        key = auth.load_or_create_secret(tmp_path)[1]
        ns = f"nn{random.randrange(1 << 30):x}"
        plans = []
        for i in range(3):
            env = dict(FAST_ENV)
            env.update({
                "SKULK_HOME": str(tmp_path / f"node-{i + 1}"), "SKULK_MODELS_DIR": str(models_dir),
                "SKULK_NODE_ID": f"m-{i + 1}", "SKULK_NAMESPACE": ns, "SKULK_CLUSTER_KEY": key,
                "SKULK_API_PORT": str(API_PORT), "SKULK_LISTEN": f"tcp/0.0.0.0:{ZENOH_PORT}",
                "SKULK_BOOTSTRAP_PEERS": ",".join(f"tcp/{primary[j]}:{ZENOH_PORT}" for j in range(3) if j != i),
                "SKULK_MULTICAST": "0", "SKULK_AUTO_PLACE": "none",
            })
            if i == 2:
                env["SKULK_FORCE_MASTER"] = "1"
            plans.append(NodePlan(index=i, node_id=f"m-{i + 1}", home=Path(env["SKULK_HOME"]), api_host=primary[i],
                                  api_port=API_PORT, zenoh_port=ZENOH_PORT, env=env, argv_prefix=net.prefix_argv(i)))

        def call(node: str, path: str, **kw: object) -> object:
            return ns_http(net, int(node.split("-")[1]) - 1, path, port=API_PORT, **kw)

        cluster = LocalCluster(plans, log_dir=tmp_path / "logs", fetch=lambda plan, path: call(plan.node_id, path))
        cluster.start()
        try:
            cluster.wait_ready(timeout_s=90)
            nodes = [p.node_id for p in plans]

            def one_master(among: list[str]) -> str | None:
                sessions = [call(n, "/state")["session"] for n in among]  # type: ignore[index]
                if any(s is None for s in sessions) or len({(s["clock"], s["master"]) for s in sessions}) != 1:
                    return None
                return sessions[0]["master"]

            def agree(among: list[str]) -> bool:
                states = [call(n, "/state") for n in among]
                return len({digest(from_wire(State, s)) for s in states}) == 1

            # m-3 (forced) wins once every node has settled its peer set; the first
            # agreement may be an earlier session that m-3 joined just after it formed.
            assert wait_stable("m-3 the settled master", lambda: one_master(nodes) == "m-3" and "m-3", 40) == "m-3"
            conns = wait_for(
                "links observed both ways on every path",
                lambda: (c := call("m-1", "/state")["topology"]["connections"]) and len(c) >= 8 and c,  # type: ignore[index]
                60,
            )
            vpn_seen = [c for c in conns if ipaddress.ip_address(c["address"]) in VPN_NET]
            assert {c["kind"] for c in vpn_seen} == {"vpn"} and len(vpn_seen) == 2, (
                "the VPN link (an 'eth' name, a VPN address) is observed both ways and labelled by its address"
            )
            wait_for("equal digests", lambda: agree(nodes), 30, 0.05)

            t0 = time.monotonic()
            placed = call("m-1", "/place_instance", method="POST",
                          body={"model_id": DEFAULT_MODEL_ID, "min_nodes": 2, "excluded_nodes": ["m-3"]}, timeout_s=30)
            iid = placed["instance_id"]  # type: ignore[index]

            def ready(node: str) -> dict | None:
                state = call(node, "/state")
                wrapped = state["instances"].get(iid)  # type: ignore[index]
                if wrapped is None:
                    return None
                body = next(iter(wrapped.values()))
                runners = body["shardAssignments"]["nodeToRunner"].values()
                return body if all("RunnerReady" in state["runners"].get(r, {}) for r in runners) else None  # type: ignore[index]

            inst = wait_for("a ready two-rank ring", lambda: ready("m-1"), 120, 0.2)
            print(f"\n[netns] placement -> ready: {time.monotonic() - t0:.2f} s; ring {inst['ring']}")
            hops = inst["ring"]
            assert len(hops) == 2 and {h["nodeId"] for h in hops} == {"m-1", "m-2"}
            for hop in hops:
                ip = ipaddress.ip_address(hop["address"].rsplit(":", 1)[0].strip("[]"))
                assert ip not in VPN_NET, f"the ring took the VPN link: {hop}"
                assert str(ip) in ("10.77.1.1", "10.77.1.2") and hop["kind"] == "ethernet"
            # Greedy, so the reply is a function of the model: sampled at the default
            # temperature, random weights sometimes drew the end token after 2 tokens.
            chat = {"model": DEFAULT_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                    "temperature": 0}
            reply = call("m-3", "/v1/chat/completions", method="POST", body=chat, timeout_s=60)
            first = reply["choices"][0]["message"]["content"]  # type: ignore[index]
            assert_served(reply)
            pids = {n: {r["runnerId"]: r["pid"] for r in call(n, "/v1/diagnostics/node")["runners"]}  # type: ignore[index]
                    for n in ("m-1", "m-2")}

            t_kill = cluster.kill("m-3")
            new_master = wait_for("a new master", lambda: (m := one_master(["m-1", "m-2"])) not in (None, "m-3") and m, 30)
            text = call(new_master, "/metrics", raw=True)
            started = next(float(line.split()[1]) for line in str(text).splitlines()
                           if line.startswith("skulk_master_session_started_unixtime "))
            print(f"[netns] kill -9 m-3 -> new master {new_master}'s first indexed event: {started - t_kill:.3f} s")
            assert wait_for("the instance still ready", lambda: ready("m-2"), 30)["ring"] == hops
            for n in ("m-1", "m-2"):
                now = {r["runnerId"]: r["pid"] for r in call(n, "/v1/diagnostics/node")["runners"]}  # type: ignore[index]
                assert now == pids[n], "no runner was restarted"
            wait_for("digests agree in the new session", lambda: agree(["m-1", "m-2"]), 30, 0.05)
            reply = call(new_master, "/v1/chat/completions", method="POST", body=chat, timeout_s=60)
            assert_served(reply)
            assert reply["choices"][0]["message"]["content"] == first, "the same greedy reply after the failover"  # type: ignore[index]
        finally:
            cluster.stop()
