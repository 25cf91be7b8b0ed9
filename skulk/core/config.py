"""Every tunable of the core in one record, with units in the names.

Defaults are Skulk's published defaults (shared/REFERENCE.md); drivers build a
``CoreConfig`` from environment variables and files, the simulator from its
options. The core reads nothing else.
"""

from __future__ import annotations

from skulk.core.records import Record

__all__ = ["CoreConfig"]


class CoreConfig(Record, frozen=True, kw_only=True):
    # Election.
    campaign_timeout_s: float = 3.0  # longest a campaign waits for votes
    settle_delay_s: float = 0.2  # connection-change settle delay before campaigning
    heartbeat_interval_s: float = 2.0  # settled nodes re-announce their session
    # A follower whose master is missing from its peer set this long (no
    # election followed: the others still reach it) ends its accepted requests.
    master_lost_grace_s: float = 6.0
    force_master: bool = False  # gives huge seniority (operator override)
    # Liveness and pruning (master).
    node_timeout_s: float = 30.0  # no telemetry for this long: node considered gone
    prune_grace_s: float = 60.0  # topology-settle grace after a new master starts
    prune_check_interval_s: float = 5.0
    # Local events (worker -> master).
    local_retry_first_s: float = 5.0  # first retry after this, then x2 each time
    local_retry_max_attempts: int = 6  # sends per local event before giving up
    local_outbox_max: int = 10_000  # bound on unacknowledged local events
    # Follower log.
    nack_base_s: float = 0.5  # first NACK backoff, then x2
    nack_cap_s: float = 10.0
    follower_buffer_max: int = 100_000  # out-of-order events buffered at most
    replay_batch_max: int = 10_000  # events per SyncResponse
    # Master log retention.
    snapshot_every: int = 10_000  # indexed events between snapshots
    retain_before_snapshot: int = 10_000  # events kept in memory before the snapshot
    # Commands (origin side).
    command_retry_s: float = 1.0  # resend an unanswered command after this
    command_deadline_s: float = 15.0  # pending placement info: give up (503) after this
    command_dedupe_max: int = 4_096  # recent command results the master remembers
    persist_state_every: int = 64  # applied events between persisted state copies
    request_linger_s: float = 5.0  # after TaskDeleted, wait this long for the last chunk
    # Telemetry.
    telemetry_interval_s: float = 5.0  # how often a node re-reports itself (last_seen)
    # Runners.
    max_concurrent_requests: int = 8
    group_connect_deadline_s: float = 120.0
    warmup_deadline_s: float = 300.0
    first_report_deadline_s: float = 120.0
    base_port: int = 52_500  # MLX ring ports: a fresh block of max_ring_ranks per placement
    port_span: int = 5_000
    max_ring_ranks: int = 16  # ports reserved per placement (rank r listens on port + r)
    # Models the master places, once per session, when the state has no instance of them.
    auto_place: tuple[str, ...] = ()
    # Model files (skulk.core.keeper). The store node (a node id or friendly name; SKULK_STORE)
    # downloads whole models once and the others copy from it; None: every node fetches its own.
    store_node: str | None = None
    transfer_stall_s: float = 60.0  # a transfer without a new byte for this long is given up and re-sourced
    transfer_retry_s: float = 10.0  # after a failed transfer, wait this long before the next source
    transfer_retry_max_s: float = 120.0  # ... doubling per failure up to this
    transfer_progress_interval_s: float = 2.0  # a transfer's progress becomes a local event at most this often
    disk_margin_bytes: int = 64 * 1024 * 1024  # free disk kept beyond what a transfer needs
    # Canary: plants a known bug (a loser also acts as master) to prove the checkers work.
    canary_double_master: bool = False
