"""loadtests.netns: a killed run's leftovers do not break the next run (root only; skipped otherwise).

A run killed before its teardown leaves its namespaces and the root ends of
its host links, holding their addresses. The next run used the same
addresses, its probes were routed into the dead namespace, and every node
"did not answer" although its log said it was up.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from loadtests.netns import Netns, free_host_block, netns_available, sweep_stale

pytestmark = pytest.mark.netns

_ok, _why = netns_available()
if not _ok:
    pytest.skip(f"network namespaces unavailable: {_why}", allow_module_level=True)


def _root_has(addr: str) -> bool:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return any(f" {addr}/" in line for line in out.splitlines())


def test_a_leftover_host_link_is_skipped_then_swept() -> None:
    block = free_host_block()
    leftover = Netns(1).build()
    try:
        leftover.link_host(0, f"10.{block}.1.1/30", f"10.{block}.1.2/30")
        assert _root_has(f"10.{block}.1.1")
        # The next run does not take the block a leftover holds, and says so if asked to.
        assert free_host_block() != block
        with Netns(1) as other, pytest.raises(OSError, match=f"10.{block}.1.1 is already on"):
            other.link_host(0, f"10.{block}.1.1/30", f"10.{block}.1.2/30")
        # A fresh namespace of another run is not swept; an old, empty one is, with its host link.
        assert leftover.names[0] not in sweep_stale()
        assert leftover.names[0] in sweep_stale(older_than_s=0)
        # The kernel destroys a deleted namespace (and so its veth pairs) in the background.
        deadline = time.monotonic() + 30
        while _root_has(f"10.{block}.1.1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _root_has(f"10.{block}.1.1")
    finally:
        leftover.teardown()
