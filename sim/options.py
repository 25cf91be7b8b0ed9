"""Every knob of a simulated run, in one record, drawn from the seed.

Theory of operation
-------------------
``SimOptions`` holds every parameter of a run, each with a comment and a unit
(TigerBeetle style). ``draw_options(seed, scenario)`` expands a seed into a
full set: network conditions, cluster shape, runner speeds, client behaviour
and which faults are enabled (swarm testing: each seed enables a random subset
of fault kinds, so rare combinations get exercised). A scenario then narrows
the draw to what it is about (``Scenario.adjust``), and ``--set key=value``
overrides any field by name. ``render()`` prints the lot before the run
starts, so a failing seed is a complete bug report.

The core's own tunables (``CoreConfig``) ride along in ``core``; override them
with ``--set core.campaign_timeout_s=2``.

Invariants kept: the same (seed, scenario, overrides) always gives the same
options; every field has a doc and a unit; ``validate()`` rejects options a
run cannot honour (one host's RAM per node, probabilities in [0, 1]...).
"""

from __future__ import annotations

import dataclasses
import random
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from skulk.core.config import CoreConfig

__all__ = [
    "SimOptions",
    "FAULT_KINDS",
    "LINK_KINDS",
    "draw_options",
    "apply_overrides",
    "render",
]

# Every fault the simulator can inject (see docs/simulator.md, "Fault model").
FAULT_KINDS: tuple[str, ...] = (
    "crash_stop",  # a node dies for good
    "crash_restart",  # a node dies and comes back with what it persisted
    "pause",  # a node freezes (SIGSTOP, GC, swap), then catches up
    "partition_symmetric",  # the cluster splits in two
    "partition_asymmetric",  # one direction between two nodes goes dark
    "isolate_one",  # one node loses every link
    "clog",  # swizzle-clogging: links clog one by one, unclog in random order
    "clock_step",  # a node's clock jumps forwards or backwards
    "disk_full",  # writes fail with ENOSPC for a while
    "disk_errors",  # writes fail at random (EIO)
    "interconnect_loss",  # a Thunderbolt cable is pulled
    "vpn_only",  # every direct link between two nodes is gone; only the VPN is left
    "runner_crash_loop",  # a node's runners crash on load for a while
    "runner_wedge",  # a runner wedges (exit 86 after a deadline)
    "abandon_storm",  # many clients submit and walk away
    "loss_burst",  # heavy message loss and duplication for a while
)

LINK_KINDS: tuple[str, ...] = ("thunderbolt", "ethernet", "wifi", "vpn")


def knob(default: Any, doc: str, unit: str) -> Any:
    """A field with its documentation; ``render`` prints both."""
    assert doc and unit, "every knob has a comment and a unit"
    if isinstance(default, (list, dict, set)):
        raise TypeError("knobs are immutable: use tuples")
    return field(default=default, metadata={"doc": doc, "unit": unit})


@dataclass(frozen=True)
class SimOptions:
    """One run's parameters. Units are in the names or in the unit column."""

    # --- run ------------------------------------------------------------------
    seed: int = knob(0, "the run's seed; every other value derives from it", "integer")
    scenario: str = knob("", "the scenario being run", "name")

    # --- cluster ----------------------------------------------------------------
    node_count: int = knob(5, "nodes in the cluster (named n1..nN)", "count")
    ram_total_gib: tuple[int, ...] = knob((64,) * 5, "total RAM of each node, n1 first", "GiB")
    ram_base_used_gib: float = knob(6.0, "RAM held by the OS and other apps on every node", "GiB")
    ram_noise_gib: float = knob(0.5, "swing of other apps' memory at each telemetry sample", "GiB")

    # --- links --------------------------------------------------------------------
    thunderbolt_pair_fraction: float = knob(0.3, "share of node pairs also joined by a Thunderbolt cable", "fraction")
    wifi_node_fraction: float = knob(0.2, "share of nodes on Wi-Fi instead of Ethernet", "fraction")
    vpn_pairs: bool = knob(True, "every pair can also reach each other over a VPN (Tailscale)", "bool")
    vpn_interface_name: str = knob("utun3", "name of each node's VPN interface", "name")
    vpn_interface_kind: str = knob(
        "vpn", "kind each node advertises (and its probes report) for its VPN interface; 'ethernet' mimics a VPN "
        "on an interface named like ethernet", "name")
    ring_data_plane: bool = knob(
        False, "runner rings follow the links: a rank is reached only over an up link at its ring address, and a "
        "formed ring breaks when a hop's link stays down", "bool")
    latency_ms_thunderbolt: float = knob(0.05, "median one-way latency over Thunderbolt", "ms")
    latency_ms_ethernet: float = knob(0.3, "median one-way latency over Ethernet", "ms")
    latency_ms_wifi: float = knob(3.0, "median one-way latency over Wi-Fi", "ms")
    latency_ms_vpn: float = knob(25.0, "median one-way latency over the VPN", "ms")
    latency_jitter: float = knob(0.3, "log-normal sigma of latency around its median", "ratio")
    latency_tail_probability: float = knob(0.01, "chance a message takes the heavy tail", "probability")
    latency_tail_alpha: float = knob(1.5, "Pareto shape of the tail (smaller is heavier)", "shape")
    latency_tail_ms_max: float = knob(2_000.0, "cap on one tail delay", "ms")
    loss_probability: float = knob(0.001, "chance a message is lost on a link", "probability")
    duplicate_probability: float = knob(0.001, "chance a message is delivered twice", "probability")
    reorder_probability: float = knob(0.01, "chance a message is held back so later ones overtake it", "probability")
    reorder_delay_ms_max: float = knob(50.0, "longest hold-back of a reordered message", "ms")
    link_capacity_messages: int = knob(4_096, "messages queued per directed link before it overflows and drops", "count")

    # --- membership (zenoh liveliness) ---------------------------------------------
    lease_s: float = knob(2.0, "a silent or unreachable peer leaves membership after this lease", "s")
    crash_detect_s: float = knob(0.05, "a crashed peer's closed connections remove it after this", "s")
    discovery_s: float = knob(0.05, "a newly reachable peer joins membership after this", "s")
    lease_spread_s: float = knob(0.0, "each lease expiry takes up to this much longer, drawn per peer (0: exactly lease_s)", "s")
    crash_detect_spread_s: float = knob(0.0, "each crash detection takes up to this much longer, drawn per peer", "s")
    probe_interval_s: float = knob(10.0, "each node probes every address of every peer this often", "s")
    telemetry_sample_s: float = knob(5.0, "each node samples its memory this often", "s")

    # --- clocks -----------------------------------------------------------------------
    clock_offset_s_max: float = knob(2.0, "each host's clock starts up to this far from true time", "s")
    clock_drift_ppm_max: float = knob(100.0, "each host's clock runs fast or slow by up to this", "ppm")

    # --- model and runners -------------------------------------------------------------
    model_id: str = knob("sim/qwen-7b", "the model the scenario places (a card in sim.cards)", "model id")
    runner_load_gbps: float = knob(2.0, "weight load bandwidth of a runner", "GB/s")
    runner_connect_s: float = knob(0.5, "group connect time once every rank is up", "s")
    runner_warmup_s: float = knob(1.0, "warmup after loading, before ready", "s")
    runner_prefill_tps: float = knob(800.0, "prompt tokens processed per second", "tokens/s")
    runner_decode_tps: float = knob(40.0, "tokens generated per second per request", "tokens/s")
    runner_tokens_per_chunk: int = knob(8, "tokens per streamed chunk", "tokens")
    runner_shutdown_s: float = knob(0.2, "time a stopped runner takes to exit", "s")
    runner_peer_loss_exit_s: float = knob(0.5, "a rank whose peer died exits (code 1) after this", "s")
    runner_crash_on_load_probability: float = knob(0.0, "chance a runner crashes while loading", "probability")
    runner_crash_mid_task_probability: float = knob(0.0, "chance a runner crashes during a task", "probability")
    runner_wedge_exit_s: float = knob(20.0, "a wedged runner exits with code 86 after this", "s")

    # --- model files ----------------------------------------------------------------------
    models_on_disk: str = knob(
        "everywhere", "which hosts hold every card's model verified at start: everywhere, store (only the store "
        "node, core.store_node), none (the hub only)", "name")
    hub_only_models: tuple[str, ...] = knob((), "models no host holds at start, whatever models_on_disk says (only "
                                                "the hub has them)", "model ids")
    hub_available: bool = knob(True, "a Hugging Face-compatible hub is reachable (from every host: the internet)", "bool")
    hub_rate_mbps: float = knob(200.0, "download rate of one transfer from the hub", "MB/s")
    link_rate_mbps_thunderbolt: float = knob(2_500.0, "copy rate of one transfer over Thunderbolt", "MB/s")
    link_rate_mbps_ethernet: float = knob(1_000.0, "copy rate of one transfer over Ethernet", "MB/s")
    link_rate_mbps_wifi: float = knob(60.0, "copy rate of one transfer over Wi-Fi", "MB/s")
    link_rate_mbps_vpn: float = knob(30.0, "copy rate of one transfer over the VPN", "MB/s")
    transfer_tick_s: float = knob(0.5, "a transfer moves its bytes in steps of this", "s")
    transfer_report_s: float = knob(1.0, "a transfer reports its progress to its node this often", "s")
    disk_total_gib: float = knob(4_096.0, "each host's models disk", "GiB")

    # --- clients ------------------------------------------------------------------------
    client_count: int = knob(4, "clients streaming chat requests during the chaos phase", "count")
    client_think_s_mean: float = knob(1.0, "mean pause between a client's requests (exponential)", "s")
    client_abandon_probability: float = knob(0.1, "chance a client walks away from a request", "probability")
    client_abandon_after_s_max: float = knob(3.0, "a walking-away client leaves within this", "s")
    client_retry_backoff_s: float = knob(0.3, "a client retries a failed request after this", "s")
    client_prompt_tokens_max: int = knob(512, "longest prompt a client sends", "tokens")
    client_max_tokens_max: int = knob(256, "largest explicit max_tokens (half of requests omit it)", "tokens")
    client_output_tokens_mean: int = knob(48, "mean tokens a generation produces before stopping", "tokens")

    # --- faults ----------------------------------------------------------------------------
    fault_kinds: tuple[str, ...] = knob((), "fault kinds enabled for this seed (swarm: a random subset)", "names")
    fault_mean_interval_s: float = knob(8.0, "mean time between fault injections (exponential)", "s")
    fault_duration_s_min: float = knob(1.0, "shortest fault", "s")
    fault_duration_s_max: float = knob(20.0, "longest fault", "s")
    crash_stop_max: int = knob(1, "nodes that may be stopped for good in one run", "count")
    restart_delay_s_max: float = knob(10.0, "a crash-restarted node is down for up to this", "s")
    clock_step_s_max: float = knob(5.0, "largest clock step", "s")
    disk_error_probability: float = knob(0.3, "chance a write fails while a disk is erroring", "probability")
    storm_clients: int = knob(60, "clients in an abandonment storm", "count")
    storm_duration_s: float = knob(20.0, "how long an abandonment storm lasts", "s")

    # --- phases --------------------------------------------------------------------------------
    settle_deadline_s: float = knob(30.0, "after boot, a master and convergence within this", "s")
    ready_deadline_s: float = knob(180.0, "a placed model must be served within this", "s")
    chaos_s: float = knob(120.0, "how long the chaos phase injects faults", "s")
    liveness_bound_s: float = knob(90.0, "after faults heal, a master and convergence within this", "s")
    liveness_poll_s: float = knob(0.5, "how often the liveness phase looks for convergence", "s")
    master_loss_mode: str = knob("mixed", "how master_failover loses the master: crash, crash_restart, pause, isolate, mixed", "name")

    # --- checks ----------------------------------------------------------------------------------
    abandoned_events_max: int = knob(3, "indexed events allowed per abandoned request (invariant 6)", "events")
    failover_end_bound_s: float = knob(20.0, "requests open on a lost master must end within this (invariant 8)", "s")

    # --- core ------------------------------------------------------------------------------------
    core: CoreConfig = knob(CoreConfig(), "the core's own tunables (skulk.core.config)", "record")

    def validate(self) -> SimOptions:
        """Check the options are coherent; returns self so calls chain."""
        assert self.node_count >= 1, "at least one node"
        assert len(self.ram_total_gib) == self.node_count, (
            f"ram_total_gib names {len(self.ram_total_gib)} nodes, node_count is {self.node_count}"
        )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("unit") == "probability" or f.metadata.get("unit") == "fraction":
                assert 0.0 <= value <= 1.0, f"{f.name} must be in [0, 1], got {value}"
            if f.metadata.get("unit") in ("s", "ms", "GiB", "GB/s", "MB/s", "tokens/s", "count", "tokens", "events"):
                values = value if isinstance(value, tuple) else (value,)
                assert all(v >= 0 for v in values), f"{f.name} must not be negative, got {value}"
        assert self.vpn_interface_kind in (*LINK_KINDS, "unknown"), f"unknown link kind {self.vpn_interface_kind!r}"
        assert self.vpn_interface_name, "the VPN interface needs a name"
        unknown = sorted(set(self.fault_kinds) - set(FAULT_KINDS))
        assert not unknown, f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}"
        assert self.fault_duration_s_min <= self.fault_duration_s_max
        assert self.runner_tokens_per_chunk >= 1 and self.runner_decode_tps > 0 and self.runner_prefill_tps > 0
        assert self.master_loss_mode in ("crash", "crash_restart", "pause", "isolate", "mixed"), self.master_loss_mode
        assert self.models_on_disk in ("everywhere", "store", "none"), self.models_on_disk
        assert self.models_on_disk != "store" or self.core.store_node, "models_on_disk=store needs core.store_node"
        assert self.transfer_tick_s > 0 and self.transfer_report_s > 0
        return self

    def with_(self, **changes: Any) -> SimOptions:
        return dataclasses.replace(self, **changes)


def draw_options(seed: int, scenario: str, rng: random.Random) -> SimOptions:
    """Expand ``seed`` into a varied base set of options (before the scenario narrows it).

    ``rng`` must be the run's ``"options"`` stream. Network conditions vary
    from a clean LAN to a lossy, heavy-tailed one; half the clusters mix
    memory sizes.
    """
    n = rng.choice((3, 4, 5, 5, 6))
    sizes = (32, 48, 64, 96, 128)
    if rng.random() < 0.5:
        ram = (rng.choice(sizes),) * n
    else:
        ram = tuple(rng.choice(sizes) for _ in range(n))
    lossy = rng.random() < 0.3
    opts = SimOptions(
        seed=seed,
        scenario=scenario,
        node_count=n,
        ram_total_gib=ram,
        thunderbolt_pair_fraction=rng.choice((0.0, 0.3, 0.6, 1.0)),
        wifi_node_fraction=rng.choice((0.0, 0.0, 0.2, 0.5)),
        vpn_pairs=rng.random() < 0.8,
        latency_jitter=rng.uniform(0.1, 0.6),
        latency_tail_probability=rng.choice((0.0, 0.005, 0.02)),
        latency_tail_alpha=rng.uniform(1.1, 2.5),
        loss_probability=rng.uniform(0.01, 0.05) if lossy else rng.choice((0.0, 0.001)),
        duplicate_probability=rng.uniform(0.005, 0.03) if lossy else rng.choice((0.0, 0.001)),
        reorder_probability=rng.uniform(0.0, 0.05),
        reorder_delay_ms_max=rng.uniform(5.0, 200.0),
        link_capacity_messages=rng.choice((256, 1_024, 4_096)),
        lease_s=rng.choice((1.0, 2.0, 3.0)),
        crash_detect_s=rng.uniform(0.02, 0.2),
        discovery_s=rng.uniform(0.02, 0.3),
        clock_offset_s_max=rng.choice((0.0, 0.5, 5.0)),
        clock_drift_ppm_max=rng.choice((0.0, 50.0, 500.0)),
        runner_load_gbps=rng.uniform(1.0, 6.0),
        runner_connect_s=rng.uniform(0.1, 2.0),
        runner_warmup_s=rng.uniform(0.2, 3.0),
        runner_decode_tps=rng.uniform(15.0, 80.0),
        runner_prefill_tps=rng.uniform(300.0, 2_000.0),
        runner_tokens_per_chunk=rng.choice((4, 8, 16)),
        client_count=rng.randint(2, 6),
        client_think_s_mean=rng.uniform(0.2, 2.0),
        client_abandon_probability=rng.uniform(0.0, 0.3),
        client_output_tokens_mean=rng.randint(16, 96),
    )
    return opts


def _coerce(tp: Any, text: str) -> Any:
    """Parse ``text`` as a value of the declared field type ``tp``."""
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a bool: {text!r}")
    if tp in (int, float, str):
        return tp(text)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:  # X | None: "none" is None
        return None if text.lower() == "none" else _coerce(next(a for a in args if a is not type(None)), text)
    if origin is tuple:
        (elem, _) = typing.get_args(tp)
        parts = [p for p in text.split(",") if p.strip()]
        return tuple(_coerce(elem, p.strip()) for p in parts)
    raise ValueError(f"cannot parse a {tp} from the command line")


def apply_overrides(opts: SimOptions, overrides: Mapping[str, str]) -> SimOptions:
    """Apply ``--set name=value`` overrides (``core.name`` reaches CoreConfig)."""
    hints = typing.get_type_hints(SimOptions)
    core_hints = typing.get_type_hints(CoreConfig)
    changes: dict[str, Any] = {}
    core_changes: dict[str, Any] = {}
    for key in sorted(overrides):
        text = overrides[key]
        if key.startswith("core."):
            name = key[len("core.") :]
            if name not in core_hints:
                raise ValueError(f"unknown core option {name!r}")
            core_changes[name] = _coerce(core_hints[name], text)
        else:
            if key not in hints or key in ("core", "seed", "scenario"):
                raise ValueError(f"unknown option {key!r} (see `python -m chaos run --help` for the list)")
            changes[key] = _coerce(hints[key], text)
    if "node_count" in changes and "ram_total_gib" not in changes:
        ram = opts.ram_total_gib
        n = changes["node_count"]
        changes["ram_total_gib"] = tuple(ram[i % len(ram)] for i in range(n))
    if core_changes:
        changes["core"] = msgspec.structs.replace(opts.core, **core_changes)
    return dataclasses.replace(opts, **changes).validate()


def render(opts: SimOptions) -> str:
    """Every option, one per line: ``name = value  # doc [unit]`` (core fields last)."""
    lines = []
    for f in dataclasses.fields(opts):
        if f.name == "core":
            continue
        value = getattr(opts, f.name)
        lines.append(f"{f.name} = {_show(value)}  # {f.metadata['doc']} [{f.metadata['unit']}]")
    for cf in msgspec.structs.fields(opts.core):
        lines.append(f"core.{cf.name} = {_show(getattr(opts.core, cf.name))}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) if value else "(none)"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
