"""Distributed ranks: joining the ring under a deadline, and rank 0's broadcasts.

Theory of operation
-------------------
Ranks of one instance form an ``mx.distributed`` group over MLX's ring backend
(TCP). The hostfile is the ``RunnerSpec.hosts`` list (one ``ip:port`` per rank,
in rank order), written as MLX expects: a JSON list of one-element lists.

``mx.distributed.init`` blocks until every neighbour is connected, has no
timeout of its own and holds the GIL meanwhile, so the group-connect deadline
is kept by a separate guard process (``_connect_guard``). A failure names
every peer that does not accept TCP connections at its address (not started,
wrong address, or blocked) so an operator can act on it.

Once connected, rank 0 decides each engine step and broadcasts it as a list
of int32 (``PlanChannel``): one fixed-shape all-sum of ``FRAME`` integers
(length first, then up to ``FRAME - 1`` values inline), plus a second all-sum
of exactly the announced length when the plan does not fit. Fixed shapes mean
every rank knows what to receive without any other agreement, and an all-sum
whose only non-zero contribution is rank 0's is an exact broadcast. While
rank 0 has nothing to do it sends idle ticks instead, so the other ranks sleep
between collectives rather than spin in one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import mlx.core as mx

from skulk.engine._connect_guard import diagnose_peers, first_unreachable, probe_peers

__all__ = ["GroupConnectError", "connect_group", "diagnose_peers", "PlanChannel", "IDLE_TICK", "check_agreement"]


class GroupConnectError(RuntimeError):
    """The ring could not be formed; the message carries the diagnosis.

    ``unreachable_rank`` is the rank whose link the probes blame
    (``first_unreachable``; None when every peer answered).
    """

    def __init__(self, message: str, unreachable_rank: int | None = None) -> None:
        super().__init__(message)
        self.unreachable_rank = unreachable_rank


def connect_group(
    hosts: tuple[str, ...] | list[str], rank: int, deadline_s: float, *, event_fd: int | None = None
) -> Any:
    """Join the ring of ``hosts`` as ``rank``; returns the ``mx.distributed`` group.

    MLX holds the GIL while it waits for neighbours, so the deadline is kept
    by a guard process (``skulk.engine._connect_guard``): when ``event_fd`` is
    given and ``deadline_s`` passes first, the guard reports ``RunnerFailed``
    with a diagnosis on that pipe and kills this process. Errors MLX raises by
    itself become ``GroupConnectError`` with the same diagnosis. Sets
    ``MLX_HOSTFILE`` and ``MLX_RANK`` in this process's environment.
    """
    world = len(hosts)
    assert world >= 2 and 0 <= rank < world, (world, rank)
    assert deadline_s > 0, deadline_s
    fd, hostfile = tempfile.mkstemp(prefix="skulk-ring-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump([[address] for address in hosts], f)
    os.environ["MLX_HOSTFILE"] = hostfile
    os.environ["MLX_RANK"] = str(rank)
    guard = None
    ready_w = -1
    if event_fd is not None:
        ready_r, ready_w = os.pipe()
        guard = subprocess.Popen(
            [
                sys.executable, "-m", "skulk.engine._connect_guard",
                "--runner-pid", str(os.getpid()), "--ready-fd", str(ready_r),
                "--event-fd", str(event_fd), "--deadline-s", repr(deadline_s),
                "--rank", str(rank), "--hosts-json", json.dumps(list(hosts)),
            ],
            pass_fds=(ready_r, event_fd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(ready_r)
    started = time.monotonic()
    try:
        group = mx.distributed.init(strict=True, backend="ring")
    except Exception as exc:
        waited = time.monotonic() - started
        probes = probe_peers(hosts, rank)
        raise GroupConnectError(
            f"rank {rank} of {world} could not join the ring at {hosts[rank]}: "
            f"MLX ring init failed after {waited:.1f}s: {exc}; " + "; ".join(diagnose_peers(hosts, rank, probes)),
            first_unreachable(probes),
        ) from exc
    finally:
        if guard is not None:
            os.close(ready_w)  # EOF tells the guard to stand down
            try:
                guard.wait(timeout=5)
            except subprocess.TimeoutExpired:
                guard.kill()
        try:
            os.unlink(hostfile)
        except OSError:
            pass
    if group.size() != world or group.rank() != rank:
        raise GroupConnectError(f"MLX formed a group of size {group.size()} with rank {group.rank()}; expected {world}/{rank}")
    return group


IDLE_TICK = -1
"""First value of an idle tick: ``[IDLE_TICK, sleep_ms]`` (never a plan op)."""


class PlanChannel:
    """Rank 0 broadcasts lists of int32 to every rank, with fixed-shape all-sums.

    Idle ticks (``tick``) are absorbed by ``recv``: the receiving rank sleeps
    for the announced time and listens again, so plan consumers never see
    them. (MLX's ring backend busy-polls inside a collective; sleeping between
    ticks keeps idle followers off the CPU.)
    """

    FRAME = 256

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = group.rank()

    def send(self, values: list[int]) -> None:
        """Rank 0 only: broadcast ``values`` (each fits int32)."""
        assert self.rank == 0
        n = len(values)
        frame = [n] + (values if n < self.FRAME else [])
        frame += [0] * (self.FRAME - len(frame))
        mx.eval(mx.distributed.all_sum(mx.array(frame, dtype=mx.int32), group=self.group))
        if n >= self.FRAME:
            mx.eval(mx.distributed.all_sum(mx.array(values, dtype=mx.int32), group=self.group))

    def tick(self, sleep_s: float) -> None:
        """Rank 0 only: tell the others to sleep ``sleep_s`` before listening again."""
        assert sleep_s > 0, sleep_s
        self.send([IDLE_TICK, max(1, round(sleep_s * 1000))])

    def recv(self) -> list[int]:
        """Other ranks: the next broadcast from rank 0 (idle ticks are slept through)."""
        assert self.rank != 0
        while True:
            values = self._recv_once()
            if len(values) == 2 and values[0] == IDLE_TICK:
                time.sleep(values[1] / 1000.0)
                continue
            return values

    def _recv_once(self) -> list[int]:
        frame = mx.distributed.all_sum(mx.zeros((self.FRAME,), dtype=mx.int32), group=self.group).tolist()
        n = frame[0]
        if n < self.FRAME:
            return frame[1 : 1 + n]
        return mx.distributed.all_sum(mx.zeros((n,), dtype=mx.int32), group=self.group).tolist()


def check_agreement(group: Any, facts: list[int]) -> list[list[int]]:
    """All-gather a fixed-length list of facts from every rank; returns rows by rank."""
    gathered = mx.distributed.all_gather(mx.array(facts, dtype=mx.int32)[None, :], group=group)
    return gathered.tolist()
