"""Enforces the group-connect deadline from outside the runner process.

``mx.distributed.init`` holds the Python GIL while it waits for ring
neighbours, so no thread of the runner can notice a deadline passing. The
runner therefore starts this small guard process (stdlib and Skulk's codec
only, no MLX) just before joining the ring, and closes ``--ready-fd`` once the
ring is formed. If that does not happen before the deadline, the guard probes
every other rank's address, writes one ``StatusChanged(RunnerFailed(...))``
frame (code ``group_connect_timeout``, which makes the master re-place the
instance on fresh ports) naming the unreachable ranks, the likeliest culprit
also as ``unreachable_rank`` (``first_unreachable``) so re-placement avoids
that rank's link, to the runner's event pipe (a single write
of less than ``PIPE_BUF`` bytes, so it never interleaves with the runner's own
frames), and kills the runner with SIGKILL. The guard also exits when the
runner dies first.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import time
from typing import NamedTuple

from skulk.core.instances import GROUP_CONNECT_TIMEOUT, RunnerFailed
from skulk.engine.protocol import StatusChanged, encode_frame

__all__ = ["main", "Probe", "diagnose_peers", "probe_peers", "first_unreachable"]

_MAX_MESSAGE_CHARS = 3000  # keeps the frame under PIPE_BUF: one atomic write


def _split_host(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad ring address {address!r}; expected ip:port")
    return host.strip("[]"), int(port)


class Probe(NamedTuple):
    """One rank's ring address, tried: ``problem`` is None when it accepted a TCP connection."""

    rank: int
    problem: str | None
    refused: bool = False  # the host answered, so the network works and the runner is not listening


def probe_peers(hosts: tuple[str, ...] | list[str], rank: int, timeout_s: float = 1.0) -> list[Probe]:
    """Try a TCP connection to every other rank's ring address."""
    out: list[Probe] = []
    for other, address in enumerate(hosts):
        if other == rank:
            continue
        try:
            host, port = _split_host(address)
            with socket.create_connection((host, port), timeout=timeout_s):
                out.append(Probe(other, None))
        except ConnectionRefusedError:
            out.append(Probe(other, "connection refused (runner not listening)", refused=True))
        except TimeoutError:
            out.append(Probe(other, f"no answer within {timeout_s}s"))
        except (OSError, ValueError) as exc:
            out.append(Probe(other, str(exc)))
    return out


def diagnose_peers(hosts: tuple[str, ...] | list[str], rank: int, probes: list[Probe] | None = None) -> list[str]:
    """One line per peer from ``probes`` (``probe_peers`` when not given), problems first."""
    probes = probe_peers(hosts, rank) if probes is None else probes
    problems = [f"rank {p.rank} at {hosts[p.rank]} is unreachable: {p.problem}" for p in probes if p.problem]
    fine = [f"rank {p.rank} at {hosts[p.rank]} accepts TCP connections" for p in probes if not p.problem]
    return problems + fine


def first_unreachable(probes: list[Probe]) -> int | None:
    """The rank whose link to blame: the lowest the network did not carry to, else the lowest refused, else None.

    A refusal proves the path works (the runner is not listening, perhaps
    because its own guard already killed it at the same deadline), so a
    timeout or a routing error is the better evidence of a dead link.
    """
    network = [p.rank for p in probes if p.problem and not p.refused]
    refused = [p.rank for p in probes if p.problem and p.refused]
    return min(network, default=min(refused, default=None))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m skulk.engine._connect_guard")
    parser.add_argument("--runner-pid", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True, help="EOF here means the ring formed")
    parser.add_argument("--event-fd", type=int, required=True, help="the runner's event pipe")
    parser.add_argument("--deadline-s", type=float, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--hosts-json", required=True)
    args = parser.parse_args(argv)
    hosts = json.loads(args.hosts_json)
    deadline = time.monotonic() + args.deadline_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([args.ready_fd], [], [], min(left, 0.2))
        if ready:
            return  # EOF or a byte: the runner joined the ring (or gave up itself)
        if not _alive(args.runner_pid):
            return
    probes = probe_peers(hosts, args.rank)
    lines = diagnose_peers(hosts, args.rank, probes)
    message = (
        f"rank {args.rank} of {len(hosts)} could not join the ring at {hosts[args.rank]}: "
        f"the group-connect deadline of {args.deadline_s:g}s expired; " + "; ".join(lines)
    )[:_MAX_MESSAGE_CHARS]
    failed = RunnerFailed(error_message=message, code=GROUP_CONNECT_TIMEOUT, unreachable_rank=first_unreachable(probes))
    frame = encode_frame(StatusChanged(status=failed))
    try:
        os.write(args.event_fd, frame)
    except OSError:
        pass
    try:
        os.kill(args.runner_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    main()
