"""What the calibrated scenarios share: the measured profile and the real runs' cluster.

Theory of operation
-------------------
``failover_calibrated`` and ``storm_calibrated`` are twins of real runs on
this machine (``loadtests.calibrated_parity``, ``loadtests.storm``). Both take
their figures from the calibration profile (``chaos/profiles/calibrated.json``,
written by ``python -m loadtests.calibrate``) and simulate the cluster those
runs used: three 64 GiB nodes on one clean Ethernet whose one-way latency is
the measured one (no Thunderbolt, Wi-Fi or VPN links; no loss, tail,
duplicates or reordering; one machine's clock), serving one model. Each
scenario adds its own options (detection delays, runner rates, clients).

Invariant kept: nothing here draws randomness, so a scenario's draws (and its
trace digests) are the same whichever helper it calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sim.options import SimOptions

__all__ = ["PROFILE", "MODEL", "load_profile", "calibrated_cluster", "prompt_content"]

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "calibrated.json"
MODEL = "sim/qwen-1.5b"


def load_profile(path: Path = PROFILE) -> dict[str, Any]:
    profile = json.loads(path.read_text(encoding="utf-8"))
    for key in ("crash_detect_s", "lease_detect_s", "latency_ms_median", "prefill_tps", "decode_tps", "prompt_tokens"):
        assert profile.get(key), f"{path}: the calibration profile lacks {key}"
    return profile


def calibrated_cluster(opts: SimOptions, profile: dict[str, Any], **changes: Any) -> SimOptions:
    """``opts`` narrowed to the real runs' three nodes and clean, measured links, serving ``MODEL``; then ``changes``."""
    return opts.with_(
        node_count=3,
        ram_total_gib=(64, 64, 64),
        thunderbolt_pair_fraction=0.0,
        wifi_node_fraction=0.0,
        vpn_pairs=False,
        latency_ms_ethernet=float(profile["latency_ms_median"]),
        latency_jitter=float(profile.get("latency_jitter") or 0.0),
        latency_tail_probability=0.0,
        loss_probability=0.0,
        duplicate_probability=0.0,
        reorder_probability=0.0,
        clock_offset_s_max=0.0,
        clock_drift_ppm_max=0.0,
        model_id=MODEL,
        **changes,
    )


def prompt_content(profile: dict[str, Any]) -> str:
    """A user message of the real runs' prompt length (the simulated tokenizer: 4 characters a token)."""
    return "p" * (4 * int(profile["prompt_tokens"]))
