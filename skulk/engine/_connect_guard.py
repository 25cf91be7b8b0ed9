"""Enforces the group-connect deadline from outside the runner process.

``mx.distributed.init`` holds the Python GIL while it waits for ring
neighbours, so no thread of the runner can notice a deadline passing. The
runner therefore starts this small guard process (stdlib and Skulk's codec
only, no MLX) just before joining the ring, and closes ``--ready-fd`` once the
ring is formed. If that does not happen before the deadline, the guard probes
every other rank's address, writes one ``StatusChanged(RunnerFailed(...))``
frame (code ``group_connect_timeout``, which makes the master re-place the
instance on fresh ports) naming the unreachable ranks to the runner's event pipe (a single write
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

from skulk.core.instances import GROUP_CONNECT_TIMEOUT, RunnerFailed
from skulk.engine.protocol import StatusChanged, encode_frame

__all__ = ["main", "diagnose_peers"]

_MAX_MESSAGE_CHARS = 3000  # keeps the frame under PIPE_BUF: one atomic write


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
    lines = diagnose_peers(hosts, args.rank)
    message = (
        f"rank {args.rank} of {len(hosts)} could not join the ring at {hosts[args.rank]}: "
        f"the group-connect deadline of {args.deadline_s:g}s expired; " + "; ".join(lines)
    )[:_MAX_MESSAGE_CHARS]
    frame = encode_frame(StatusChanged(status=RunnerFailed(error_message=message, code=GROUP_CONNECT_TIMEOUT)))
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
