"""A lost host does not leave the two survivors deaf to each other (root only; skipped otherwise).

Three plain zenoh peers with Skulk's transport settings (``zenoh_config``),
one in each of three network namespaces; machine 2's links go down. zenoh
closes its links to the lost peer on its RX runtime's threads when the lease
expires, and each such close() blocks its thread for up to 10 s (SO_LINGER):
with zenoh's default two threads both were blocked and the survivors heard
nothing from each other (5 of 5 trials). The oracle is what the survivors'
own subscribers count, per half second, of each other's messages.

To see it fail: ``ZENOH_RUNTIME='(rx: (worker_threads: 2))'`` in the
environment (an operator's setting wins over Skulk's).
"""

from __future__ import annotations

import pytest

from loadtests.netns import netns_available
from loadtests.zenoh_peer_loss import run_trial

pytestmark = [pytest.mark.netns, pytest.mark.slow]

_ok, _why = netns_available()
if not _ok:
    pytest.skip(f"network namespaces unavailable: {_why}", allow_module_level=True)


def test_the_survivors_hear_each_other_after_the_lost_peers_lease_expires() -> None:
    r = run_trial(before_s=4.0, after_s=7.0)
    # The lost peer did leave (its lease expired), as seen by both survivors...
    assert r["m0_saw_m2_leave_after_s"] is not None and r["m1_saw_m2_leave_after_s"] is not None, r
    # ...and each survivor kept hearing the other. Healthy, the longest silence was under half a
    # second; the defect silences them for the linger time (10 s, past this trial's end, so
    # ``None``). 3 s leaves room for a loaded CI machine and still cannot pass on the defect.
    assert r["m0_silent_s"] is not None and r["m0_silent_s"] < 3.0, r
    assert r["m1_silent_s"] is not None and r["m1_silent_s"] < 3.0, r
    assert r["m0_heard_m1_after"] > 0 and r["m1_heard_m0_after"] > 0, r
    assert not r["deaf"], r
