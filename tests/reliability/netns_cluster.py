"""Three "machines" in network namespaces, reachable from the test process, as a ``RealCluster``.

Each machine is a namespace (``tests/support/netns.py``) with its own
addresses: plain veth links between every pair (10.77.x.0/24) and, between
machines 0 and 1, a second link whose only tell is its VPN-range address
(100.64.7.0/24, Tailscale's range), named like any other interface. Each
namespace also gets a link to the root namespace (10.78.i.0/30), so Locust,
the trace recorder and the checks run from the test process against each
node's own address. Nodes discover their interfaces for real, bind the API
on every address, and find each other through bootstrap peers on the plain
links. Root only; ``netns_available`` says why not otherwise.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from loadtests.cluster import FAST_ENV, RealCluster
from skulk.runtime import auth
from skulk.runtime.localcluster import LocalCluster, NodePlan
from tests.support.netns import Netns, netns_available

__all__ = ["netns_cluster", "netns_available", "VPN_PREFIX"]

API_PORT = 52415
ZENOH_PORT = 52416
VPN_PREFIX = "100.64.7."
_PRIMARY = ("10.77.1.1", "10.77.2.1", "10.77.2.2")


@contextmanager
def netns_cluster(base: Path, models: Path, *, env: Mapping[str, str] | None = None) -> Iterator[RealCluster]:
    """Build the three namespaces, start a node in each, yield the cluster; always tear everything down."""
    with Netns(3) as net:
        net.link(0, 1, "10.77.1.1/24", "10.77.1.2/24", a_name="eth1", b_name="eth1")
        net.link(1, 2, "10.77.2.1/24", "10.77.2.2/24", a_name="eth2", b_name="eth2")
        net.link(0, 2, "10.77.3.1/24", "10.77.3.2/24", a_name="eth3", b_name="eth3")
        net.link(0, 1, VPN_PREFIX + "1/24", VPN_PREFIX + "2/24", a_name="eth9", b_name="eth9")
        for i in range(3):
            net.link_host(i, f"10.78.{i + 1}.1/30", f"10.78.{i + 1}.2/30")
        key = auth.load_or_create_secret(base)[1]
        namespace = f"relns{random.randrange(1 << 30):x}"
        plans = []
        for i in range(3):
            node_env = dict(FAST_ENV)
            node_env.update({
                "SKULK_HOME": str(base / f"node-{i + 1}"), "SKULK_MODELS_DIR": str(models),
                "SKULK_NODE_ID": f"m-{i + 1}", "SKULK_FRIENDLY_NAME": f"m-{i + 1}", "SKULK_NAMESPACE": namespace,
                "SKULK_CLUSTER_KEY": key, "SKULK_API_PORT": str(API_PORT), "SKULK_LISTEN": f"tcp/0.0.0.0:{ZENOH_PORT}",
                "SKULK_BOOTSTRAP_PEERS": ",".join(f"tcp/{_PRIMARY[j]}:{ZENOH_PORT}" for j in range(3) if j != i),
                "SKULK_MULTICAST": "0", "SKULK_AUTO_PLACE": "none",
            })
            node_env.update(env or {})
            plans.append(NodePlan(index=i, node_id=f"m-{i + 1}", home=base / f"node-{i + 1}", api_host=f"10.78.{i + 1}.2",
                                  api_port=API_PORT, zenoh_port=ZENOH_PORT, env=node_env, argv_prefix=net.prefix_argv(i)))
        local = LocalCluster(plans, log_dir=base / "logs")
        local.start()
        try:
            local.wait_ready(timeout_s=90)
            yield RealCluster(local, base)
        finally:
            local.stop()
