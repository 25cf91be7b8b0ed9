"""Do two zenoh peers still hear each other after a third one's host is lost? A reproduction.

Theory of operation
-------------------
The calibrated parity run (``python -m loadtests.calibrated_parity``) found
that when the master's host is lost (every link of its network namespace
down, so its TCP connections neither close nor reset), the two surviving
nodes often stop hearing each other once the lost peer's lease expires, while
each still lists the other as a member: their campaigns end on the 3 s
timeout counting only their own vote, both become master at the same clock,
and requests stall until the lost host comes back. This module shows that the
cause is below Skulk: it uses nothing of Skulk but the namespaces
(``loadtests.netns``) and the transport's zenoh settings (peer mode,
``scouting/gossip`` on, multicast off, a 2 s lease, each peer connecting to
the others over the link they share).

Each trial builds three namespaces joined pairwise by veth links, starts one
plain zenoh peer in each (``--peer``: subscribe ``p/*``, declare a liveliness
token, publish 50 messages a second on ``p/<me>`` with the transport's
control-message settings: congestion control DROP, priority
INTERACTIVE_HIGH), takes every link of machine 2 down after ``--before``
seconds, and counts, per half second, what machines 0 and 1 receive from each
other, and the packets each sends the other (the veth counters). A trial is
*deaf* when either survivor hears nothing from the other for two half seconds
in a row or more after the lost peer's liveliness token is withdrawn (or
never again within the trial), although the packets keep flowing.

The mechanism, found with ``--stacks-at S`` (the survivors' threads that are
blocked in the kernel S seconds after the loss): when the lease expires,
zenoh closes its links to the lost peer on its RX runtime, and every zenoh
TCP link has ``SO_LINGER`` 10 s, so each close() waits in the kernel
(``sk_stream_wait_close``) for an acknowledgement the lost host never sends.
Each survivor had two such links, and zenoh's RX runtime has two threads
(``rx-0``, ``rx-1``): both blocked, no link was read for up to 10 s. Skulk's
``zenoh_config`` gives that runtime 8 threads (``ZENOH_RUNTIME``), and the
peers here use it.

Flags, one per candidate mitigation, so each figure can be re-measured:
``--rx-threads N`` (instead of Skulk's 8; zenoh's own default is 2),
``--sndbuf`` (``transport/link/tcp/so_sndbuf``), ``--wait-before-close-us``
(block congestion control), ``--tcp-retries2 N`` (``net.ipv4.tcp_retries2``
in the three namespaces: how many retransmissions Linux makes before it gives
up on a connection whose peer stopped acknowledging, which also ends the
lingering close). Measured, 5 trials each (``docs/operations.md``): deaf in
0 of 5 with Skulk's settings (not one half second without the other's
messages) and with ``--rx-threads 3``; 5 of 5 with ``--rx-threads 2``;
``--rx-threads 2`` with ``--sndbuf 16384``: 3 of 5, with
``--wait-before-close-us 100000``: 4 of 5, with ``--tcp-retries2 3``: 4 of 5
(silences of 1-2.5 s; 2 of 5 on a quiet machine, up to 2 s; an earlier measure that ignored the first second after
the departure counted 0 of 5).
Re-declaring the subscribers or the publisher after the loss,
``session.put`` instead of a declared publisher, QoS or batching off, or
gossip off did not restore delivery.

Invariants kept: the namespaces are always deleted; no peer process outlives
its trial.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from typing import Any

__all__ = ["peer_main", "run_trial", "main"]

_PORT = 52416


def peer_main(argv: list[str]) -> int:
    """One zenoh peer (run inside a namespace): publish, count what arrives per sender every half second."""
    import zenoh

    p = argparse.ArgumentParser()
    p.add_argument("--me", required=True)
    p.add_argument("--connect", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--lease-ms", type=int, default=2000)
    _add_variant_args(p)
    args = p.parse_args(argv)
    from skulk.runtime.transport import TransportSettings, zenoh_config

    # Skulk's own transport configuration (peer mode, gossip on, the lease, keep-alive), plain zenoh otherwise.
    cfg = zenoh_config(TransportSettings(
        node_id=args.me, namespace="repro", secret=b"unused", listen=(f"tcp/0.0.0.0:{_PORT}",),
        connect=tuple(f"tcp/{a}:{_PORT}" for a in args.connect.split(",")), multicast=False,
        lease_ms=args.lease_ms, api_port=0, incarnation="0",
    ))
    if args.rx_threads is not None:
        import os

        # Read by zenoh when it first builds its runtimes (at the first open), so after the import is soon enough.
        os.environ["ZENOH_RUNTIME"] = f"(rx: (worker_threads: {args.rx_threads}))"
    if args.sndbuf is not None:
        cfg.insert_json5("transport/link/tcp/so_sndbuf", str(args.sndbuf))
    if args.wait_before_close_us is not None:
        cfg.insert_json5("transport/link/tx/queue/congestion_control/block/wait_before_close", str(args.wait_before_close_us))
    session = zenoh.open(cfg)
    lock = threading.Lock()
    counts: dict[str, int] = {}

    def on_sample(sample: Any) -> None:
        sender = str(sample.key_expr).split("/")[1]
        with lock:
            counts[sender] = counts.get(sender, 0) + 1

    def on_alive(sample: Any) -> None:
        gone = str(sample.kind).endswith("DELETE")
        print(json.dumps({"t": time.time(), "alive": str(sample.key_expr).rsplit("/", 1)[1], "gone": gone}), flush=True)

    keep = [session.declare_subscriber("p/*", on_sample),
            session.liveliness().declare_subscriber("p/alive/*", on_alive, history=True),
            session.liveliness().declare_token(f"p/alive/{args.me}")]
    pub = session.declare_publisher(f"p/{args.me}", congestion_control=zenoh.CongestionControl.DROP,
                                    priority=zenoh.Priority.INTERACTIVE_HIGH)
    start = last = time.time()
    while time.time() - start < args.seconds:
        pub.put(b"x")
        time.sleep(0.02)
        if time.time() - last >= 0.5:
            last = time.time()
            with lock:
                snap = dict(counts)
                counts.clear()
            print(json.dumps({"t": last, "recv": snap}), flush=True)
    del keep
    sys.stdout.flush()
    # zenoh's threads can keep a plain exit waiting; the trial has what it needs.
    import os

    os._exit(0)


def _add_variant_args(p: argparse.ArgumentParser) -> None:
    """The candidate mitigations, each a flag of both the trial runner and the peers."""
    p.add_argument("--sndbuf", type=int, default=None, help="transport/link/tcp/so_sndbuf (bytes)")
    p.add_argument("--wait-before-close-us", type=int, default=None,
                   help="transport/link/tx/queue/congestion_control/block/wait_before_close (microseconds)")
    p.add_argument("--rx-threads", type=int, default=None,
                   help="zenoh's RX runtime worker threads, instead of Skulk's (ZENOH_RUNTIME='(rx: (worker_threads: N))'; "
                        "Skulk's 8, zenoh's own default 2)")


def _variant_argv(args: argparse.Namespace) -> list[str]:
    out = []
    for flag in ("sndbuf", "wait_before_close_us", "rx_threads"):
        v = getattr(args, flag)
        if v is not None:
            out += [f"--{flag.replace('_', '-')}", str(v)]
    return out


def _tx_packets(net: Any, i: int, dev: str) -> int:
    return int(net.run(i, ["cat", f"/sys/class/net/{dev}/statistics/tx_packets"]).stdout.strip())


def _blocked_threads(pid: int) -> list[str]:
    """``name: kernel frames`` for each thread of ``pid`` that is not idle in a futex, poll or sleep."""
    import os

    idle = ("futex_wait", "do_epoll_wait", "hrtimer_nanosleep", "do_sys_poll", "do_select")
    rows = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        try:
            name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            frames = [ln.split()[1].split("+")[0] for ln in open(f"/proc/{pid}/task/{tid}/stack").read().splitlines() if ln.strip()]
        except OSError:
            continue
        if frames and not any(f.startswith(idle) for f in frames):
            rows.append(f"{name}: {' < '.join(frames[:8])}")
    return rows


def run_trial(*, before_s: float = 5.0, after_s: float = 10.0, tcp_retries2: int | None = None,
              stacks_at_s: float | None = None, peer_argv: list[str] | None = None) -> dict[str, Any]:
    """One trial (see the module docstring): the figures of machines 0 and 1 after machine 2's links went down."""
    from loadtests.netns import PEER_ADDRESS, Netns, link_three

    with Netns(3) as net:
        link_three(net)
        if tcp_retries2 is not None:
            for i in range(3):
                net.run(i, ["sysctl", "-q", "-w", f"net.ipv4.tcp_retries2={tcp_retries2}"])
        procs = []
        for i in range(3):
            connect = ",".join(PEER_ADDRESS[i, j] for j in range(3) if j != i)
            procs.append(subprocess.Popen(
                [*net.prefix_argv(i), sys.executable, "-m", "loadtests.zenoh_peer_loss", "--peer", "--me", f"m{i}",
                 "--connect", connect, "--seconds", str(before_s + after_s), *(peer_argv or [])],
                stdout=subprocess.PIPE, text=True))
        try:
            time.sleep(before_s)
            down_at = time.time()
            net.run(2, ["sh", "-c", "ip link set eth2 down; ip link set eth3 down"])
            packets = []
            stacks: dict[str, list[str]] = {}
            while time.time() - down_at < after_s - 1.5:
                a = (_tx_packets(net, 0, "eth1"), _tx_packets(net, 1, "eth1"))
                time.sleep(1.0)
                b = (_tx_packets(net, 0, "eth1"), _tx_packets(net, 1, "eth1"))
                packets.append((b[0] - a[0], b[1] - a[1]))
                if stacks_at_s is not None and not stacks and time.time() - down_at >= stacks_at_s:
                    stacks = {f"m{i}": _blocked_threads(procs[i].pid) for i in range(2)}
            outs = [p.communicate(timeout=after_s + 30)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    result: dict[str, Any] = {"packets_per_s_0_to_1": [x for x, _ in packets], "packets_per_s_1_to_0": [y for _, y in packets],
                              "stacks": stacks}
    for i, other in ((0, "m1"), (1, "m0")):
        rows = [json.loads(line) for line in outs[i].splitlines() if line.startswith("{")]
        gone = next((r["t"] for r in rows if r.get("alive") == "m2" and r.get("gone")), None)
        result[f"m{i}_saw_m2_leave_after_s"] = None if gone is None else round(gone - down_at, 3)
        since = (gone if gone is not None else down_at) + 1.0
        windows = [(r["t"], r["recv"].get(other, 0)) for r in rows if "recv" in r and r["t"] >= since]
        # Per half second from the links going down: (end of the half second, messages from the other survivor).
        result[f"m{i}_heard_{other}_per_half_s"] = [(round(r["t"] - down_at, 2), r["recv"].get(other, 0))
                                                   for r in rows if "recv" in r and r["t"] >= down_at]
        result[f"m{i}_heard_{other}_after"] = sum(n for _, n in windows)
        # Silent: the longest run of half seconds (ending after the lost peer's departure) in which the
        # other survivor was not heard; None when that run lasts to the end of the trial. The last
        # second is left out: the peers started (and so stop) up to a few hundred ms apart.
        start = gone if gone is not None else down_at
        horizon = down_at + after_s - 1.0
        after = [n for t, n in ((r["t"], r["recv"].get(other, 0)) for r in rows if "recv" in r) if start < t <= horizon]
        longest = run = 0
        for n in after:
            run = run + 1 if n == 0 else 0
            longest = max(longest, run)
        result[f"m{i}_silent_s"] = None if run > 0 else longest * 0.5
    silences = [result["m0_silent_s"], result["m1_silent_s"]]
    result["deaf"] = any(v is None or v >= 1.0 for v in silences)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--peer":
        return peer_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m loadtests.zenoh_peer_loss", description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--before", type=float, default=5.0, help="seconds of traffic before machine 2's links go down")
    p.add_argument("--after", type=float, default=10.0, help="seconds watched after")
    p.add_argument("--tcp-retries2", type=int, default=None,
                   help="set net.ipv4.tcp_retries2 in the namespaces (Linux default 15)")
    _add_variant_args(p)
    p.add_argument("--stacks-at", type=float, default=None, metavar="S",
                   help="S seconds after the links went down, print the survivors' threads that are blocked in the kernel "
                        "(name and kernel frames, from /proc/<pid>/task/*/stack)")
    args = p.parse_args(argv)
    from loadtests.netns import netns_available

    ok, why = netns_available()
    if not ok:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    from importlib.metadata import version

    print(f"# zenoh {version('eclipse-zenoh')}: {args.trials} trial(s); three peers, machine 2's links down "
          f"after {args.before} s, watched for {args.after} s"
          + (f", net.ipv4.tcp_retries2={args.tcp_retries2}" if args.tcp_retries2 is not None else "")
          + (f"; peers with {' '.join(_variant_argv(args))}" if _variant_argv(args) else ""), flush=True)
    deaf = 0
    for k in range(args.trials):
        r = run_trial(before_s=args.before, after_s=args.after, tcp_retries2=args.tcp_retries2,
                      stacks_at_s=args.stacks_at, peer_argv=_variant_argv(args))
        deaf += bool(r["deaf"])
        def silent(v: float | None) -> str:
            return "never again in the trial" if v is None else f"(longest silence {v} s)"

        print(f"trial {k + 1}: m2 left after {r['m0_saw_m2_leave_after_s']}/{r['m1_saw_m2_leave_after_s']} s; "
              f"then m0 heard m1 {silent(r['m0_silent_s'])}, m1 heard m0 {silent(r['m1_silent_s'])}; "
              f"from a second after it m0 heard m1 {r['m0_heard_m1_after']} times, m1 heard m0 {r['m1_heard_m0_after']} times "
              f"(50 sent per second each way; packets on the wire per second, m0->m1 {r['packets_per_s_0_to_1']}, "
              f"m1->m0 {r['packets_per_s_1_to_0']})" + ("  DEAF" if r["deaf"] else ""), flush=True)
        for who, rows in r["stacks"].items():
            for row in rows or ["(no thread blocked in the kernel)"]:
                print(f"  {who} at {args.stacks_at} s: {row}", flush=True)
    print(f"# deaf in {deaf} of {args.trials} trials", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
