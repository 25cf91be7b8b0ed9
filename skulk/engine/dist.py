"""Distributed ranks: joining the ring under a deadline, and rank 0's broadcasts.

Theory of operation
-------------------
Ranks of one instance form an ``mx.distributed`` group over MLX's ring backend
(TCP). The hostfile is the ``RunnerSpec.hosts`` list (one ``ip:port`` per rank,
in rank order), written as MLX expects: a JSON list of one-element lists.

``mx.distributed.init`` blocks until every neighbour is connected and has no
timeout of its own, so ``connect_group`` runs it on a helper thread and gives
up at the group-connect deadline. The failure then names every peer that does
not accept TCP connections at its address (not started, wrong address, or
blocked) so an operator can act on it.

Once connected, rank 0 decides each engine step and broadcasts it as a list
of int32 (``PlanChannel``): one fixed-shape all-sum of ``FRAME`` integers
(length first, then up to ``FRAME - 1`` values inline), plus a second all-sum
of exactly the announced length when the plan does not fit. Fixed shapes mean
every rank knows what to receive without any other agreement, and an all-sum
whose only non-zero contribution is rank 0's is an exact broadcast.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from typing import Any

import mlx.core as mx

__all__ = ["GroupConnectError", "connect_group", "diagnose_peers", "PlanChannel", "check_agreement"]


class GroupConnectError(RuntimeError):
    """The ring could not be formed; the message carries the diagnosis."""


def _split_host(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad ring address {address!r}; expected ip:port")
    return host.strip("[]"), int(port)


def diagnose_peers(hosts: tuple[str, ...] | list[str], rank: int, timeout_s: float = 1.0) -> list[str]:
    """Probe every other rank's ring address; one line per peer, problems first."""
    problems, fine = [], []
    for other, address in enumerate(hosts):
        if other == rank:
            continue
        try:
            host, port = _split_host(address)
            with socket.create_connection((host, port), timeout=timeout_s):
                fine.append(f"rank {other} at {address} accepts TCP connections")
        except ConnectionRefusedError:
            problems.append(f"rank {other} at {address} is unreachable: connection refused (runner not listening)")
        except TimeoutError:
            problems.append(f"rank {other} at {address} is unreachable: no answer within {timeout_s}s")
        except (OSError, ValueError) as exc:
            problems.append(f"rank {other} at {address} is unreachable: {exc}")
    return problems + fine


def connect_group(hosts: tuple[str, ...] | list[str], rank: int, deadline_s: float) -> Any:
    """Join the ring of ``hosts`` as ``rank`` within ``deadline_s`` seconds.

    Returns the ``mx.distributed`` group. Raises ``GroupConnectError`` naming
    the unreachable ranks and addresses when the deadline passes or MLX fails.
    Sets ``MLX_HOSTFILE`` and ``MLX_RANK`` in this process's environment.
    """
    world = len(hosts)
    assert world >= 2 and 0 <= rank < world, (world, rank)
    assert deadline_s > 0, deadline_s
    fd, hostfile = tempfile.mkstemp(prefix="skulk-ring-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump([[address] for address in hosts], f)
    os.environ["MLX_HOSTFILE"] = hostfile
    os.environ["MLX_RANK"] = str(rank)
    result: list[Any] = []
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            result.append(mx.distributed.init(strict=True, backend="ring"))
        except BaseException as exc:  # reported on the caller's thread
            errors.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=connect, name="skulk-ring-connect", daemon=True)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive() or errors:
        waited = time.monotonic() - started
        cause = (
            f"the group-connect deadline of {deadline_s:g}s expired"
            if not errors
            else f"MLX ring init failed after {waited:.1f}s: {errors[0]}"
        )
        lines = diagnose_peers(hosts, rank)
        raise GroupConnectError(
            f"rank {rank} of {world} could not join the ring at {hosts[rank]}: {cause}; " + "; ".join(lines)
        )
    group = result[0]
    if group.size() != world or group.rank() != rank:
        raise GroupConnectError(f"MLX formed a group of size {group.size()} with rank {group.rank()}; expected {world}/{rank}")
    return group


class PlanChannel:
    """Rank 0 broadcasts lists of int32 to every rank, with fixed-shape all-sums."""

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

    def recv(self) -> list[int]:
        """Other ranks: receive the next broadcast from rank 0."""
        assert self.rank != 0
        frame = mx.distributed.all_sum(mx.zeros((self.FRAME,), dtype=mx.int32), group=self.group).tolist()
        n = frame[0]
        if n < self.FRAME:
            return frame[1 : 1 + n]
        return mx.distributed.all_sum(mx.zeros((n,), dtype=mx.int32), group=self.group).tolist()


def check_agreement(group: Any, facts: list[int]) -> list[list[int]]:
    """All-gather a fixed-length list of facts from every rank; returns rows by rank."""
    gathered = mx.distributed.all_gather(mx.array(facts, dtype=mx.int32)[None, :], group=group)
    return gathered.tolist()
