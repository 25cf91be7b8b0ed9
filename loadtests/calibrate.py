"""Calibration: what real processes on this machine take, as a profile the simulator replays.

Theory of operation
-------------------
The simulator's figures are only comparable with real ones when its timings
are this machine's. ``python -m loadtests.calibrate`` measures them from real
node processes and writes a profile (``chaos/profiles/calibrated.json``,
checked in) that the ``failover_calibrated`` scenario reads:

- **detection delay of a killed process**: ``kill -9`` of the master of a
  three-node loopback cluster; the survivors log their member set
  (``skulk.transport: members: ...``, JSON logs with microsecond stamps): the
  delay from the signal to that line (its TCP connections reset);
- **detection delay of a lost host**: the same across three network
  namespaces, the master's namespace links set down: the peers notice when
  the zenoh lease expires;
- **election phases**: from the member change to the survivors' "campaign at
  clock ... chose" line (the settle delay plus one round of votes), and on to
  the new master's "master of session" line;
- **message latency**: one round of votes is one message each way through
  the real driver (zenoh, authentication, the asyncio hop, persisting the
  election clock): half of the campaign round after the settle delay is the
  one-way latency the simulator gives its links; a raw zenoh ping between two
  sessions on loopback is measured beside it, for reference;
- **the default model's prefill and decode**: steady streamed requests of
  the parity run's size (``max_tokens`` 16) through a follower; the time to
  first token gives the prefill rate the simulator's runner needs to match it
  (API, transport and runner hops included: the simulator has no other place
  to put them), the token rate after the first gives the decode rate; the
  runner's own figures (``generation_stats``) are recorded beside them.

Every trial starts a fresh cluster. The profile keeps every sample (the
scenario draws from them) with the medians, the machine, the commit and the
model. Timings on a shared, loaded machine are noisy: re-run on a quiet one.

Invariants kept: no node process outlives its trial; namespaces are always
deleted; the profile is written only when every trial produced its figures.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtests.cluster import RealCluster, loopback_cluster, models_dir
from skulk.engine.models import DEFAULT_MODEL_ID

__all__ = ["Client", "Trial", "run_trial", "calibrate", "PROFILE_PATH", "main"]

ROOT = Path(__file__).resolve().parents[1]
PROFILE_PATH = ROOT / "chaos" / "profiles" / "calibrated.json"
JSON_LOGS = {"SKULK_LOGGING_EXTERNAL": "1"}
SETTLE_S = 0.2  # CoreConfig.settle_delay_s: the election waits this long after a member change


# --- a client like the simulator's ---------------------------------------------------------------


@dataclass
class Request:
    node: str
    t0: float
    t_first: float | None = None
    t1: float = 0.0
    ok: bool = False
    error: str = ""
    tokens: int = 0
    prompt_tokens: int | None = None
    stats: dict[str, Any] | None = None


class Client(threading.Thread):
    """One streaming chat client: request, think (exponential), request... until ``stop``.

    Like ``sim.clients.chat_client``: each request goes to the next of its
    nodes; an error is followed by ``retry_backoff_s`` before the next think.
    """

    def __init__(self, k: int, urls: list[str], *, model: str, max_tokens: int, think_s: float,
                 retry_backoff_s: float = 0.3, timeout_s: float = 30.0) -> None:
        super().__init__(daemon=True, name=f"client-{k}")
        self.urls = urls
        self.model = model
        self.max_tokens = max_tokens
        self.think_s = think_s
        self.retry_backoff_s = retry_backoff_s
        self.timeout_s = timeout_s
        self.rng = random.Random(f"calibrate-client-{k}")
        self.stop = threading.Event()
        self.records: list[Request] = []
        self._n = k

    def run(self) -> None:
        with httpx.Client(timeout=httpx.Timeout(self.timeout_s, connect=5.0)) as http:
            while not self.stop.is_set():
                if self.stop.wait(self.rng.expovariate(1.0 / self.think_s) if self.think_s > 0 else 0.0):
                    return
                url = self.urls[self._n % len(self.urls)]
                self._n += 1
                rec = self._one(http, url)
                self.records.append(rec)
                if not rec.ok and self.stop.wait(self.retry_backoff_s):
                    return

    def _one(self, http: httpx.Client, url: str) -> Request:
        rec = Request(node=url, t0=time.time())
        body = {"model": self.model, "messages": [{"role": "user", "content": "Write one sentence about foxes."}],
                "max_tokens": self.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    resp.read()
                    rec.error = f"http_{resp.status_code}"
                    return rec
                for line in resp.iter_lines():
                    if line.startswith(": generation_stats "):
                        rec.stats = json.loads(line.split(" ", 2)[2])
                    elif line == "data: [DONE]":
                        rec.ok = not rec.error and rec.tokens > 0
                        break
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            rec.error = str(event["error"].get("code") or event["error"].get("type"))
                        elif event.get("usage"):
                            rec.prompt_tokens = int(event["usage"]["prompt_tokens"])
                            rec.tokens = int(event["usage"]["completion_tokens"])
                        elif event.get("choices") and event["choices"][0]["delta"].get("content"):
                            rec.t_first = rec.t_first or time.time()
        except (httpx.HTTPError, OSError, ValueError) as exc:
            rec.error = type(exc).__name__
        finally:
            rec.t1 = time.time()
        return rec


# --- one trial --------------------------------------------------------------------------------


@dataclass
class Trial:
    kind: str  # "process" (kill -9) or "host" (the master's links down)
    lost_at: float
    master: str
    detect_s: list[float] = field(default_factory=list)  # per survivor: loss -> its member line
    campaign_s: list[float] = field(default_factory=list)  # per survivor: member line -> campaign concluded
    campaign_votes: list[int] = field(default_factory=list)  # per survivor: the votes its campaign counted
    survivors: int = 0
    session_s: float | None = None  # loss -> the new master's "master of session"
    first_token_s: float | None = None  # loss -> the first token of a request sent after it
    requests: list[Request] = field(default_factory=list)

    @property
    def survivors_deaf(self) -> bool:
        """A survivor's campaign ended on its timeout without the other survivors' votes: they did not hear each other."""
        return any(v < self.survivors for v in self.campaign_votes)


_VOTES = re.compile(r" from (\d+) votes?")


def _log_lines(log_dir: Path, node: str) -> list[dict[str, Any]]:
    path = log_dir / f"{node}.log"
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _phases(log_dir: Path, trial: Trial, survivors: list[str]) -> None:
    """The survivors' detection, campaign and new-session times after the loss, from their JSON logs in ``log_dir``."""
    trial.survivors = len(survivors)
    for node in survivors:
        lines = [r for r in _log_lines(log_dir, node) if r["ts"] >= trial.lost_at]
        member = next((r for r in lines if r["logger"] == "skulk.transport" and r["msg"].startswith("members:")
                       and trial.master not in r["msg"]), None)
        if member is None:
            continue
        trial.detect_s.append(member["ts"] - trial.lost_at)
        chose = next((r for r in lines if r["ts"] >= member["ts"] and r["msg"].startswith("campaign at clock")), None)
        if chose is not None:
            trial.campaign_s.append(chose["ts"] - member["ts"])
            votes = _VOTES.search(chose["msg"])
            if votes is not None:
                trial.campaign_votes.append(int(votes.group(1)))
        started = next((r for r in lines if r["msg"].startswith("master of session")), None)
        if started is not None:
            trial.session_s = started["ts"] - trial.lost_at


def _first_token(records: list[Request], lost_at: float) -> float | None:
    after = [r.t_first for r in records if r.ok and r.t0 >= lost_at and r.t_first is not None]
    return min(after) - lost_at if after else None


@contextmanager
def _cluster(kind: str, base: Path, models: Path,
             sysctls: dict[str, str] | None = None) -> Iterator[tuple[RealCluster, Any]]:
    if kind == "process":
        with loopback_cluster(base, 3, models=models, env=JSON_LOGS) as cluster:
            yield cluster, None
        return
    from loadtests.netns import netns_cluster_with_links

    with netns_cluster_with_links(base, models, env=JSON_LOGS, sysctls=sysctls) as (cluster, net):
        yield cluster, net


def _lose(kind: str, cluster: RealCluster, net: Any, master: str) -> float:
    if kind == "process":
        return cluster.kill(master)
    # Every link of the master's namespace goes down, its link to this (root) namespace
    # too: the root namespace routes between the machines' host links, and zenoh would
    # reach a peer through it.
    index = cluster.plan(master).index
    names = [name for link in net.links for end, name in ((link.a, link.a_name), (link.b, link.b_name)) if end == index]
    at = time.time()
    net.run(index, ["sh", "-c", "; ".join(f"ip link set {name} down" for name in names)])
    return at


def run_trial(kind: str, base: Path, models: Path, *, users: int, pre_s: float, post_s: float, think_s: float,
              max_tokens: int = 16, model: str = DEFAULT_MODEL_ID, sysctls: dict[str, str] | None = None) -> Trial:
    """One fresh cluster: place the model away from the master, stream, lose the master, measure.

    ``sysctls`` apply to a lost-host trial's namespaces (e.g. ``net.ipv4.tcp_retries2``).
    """
    assert kind in ("process", "host"), kind
    with _cluster(kind, base, models, sysctls) as (cluster, net):
        master = cluster.wait_master()
        cluster.wait_memory_known()
        followers = [n for n in cluster.nodes if n != master]
        host = followers[0]
        iid = cluster.place(model, via=host, excluded=[n for n in cluster.nodes if n != host])
        cluster.wait_ready(iid, via=host)
        urls = [cluster.url(n) for n in followers]
        clients = [Client(k, urls, model=model, max_tokens=max_tokens, think_s=think_s) for k in range(users)]
        for c in clients:
            c.start()
        time.sleep(pre_s)
        lost_at = _lose(kind, cluster, net, master)
        trial = Trial(kind=kind, lost_at=lost_at, master=master)
        time.sleep(post_s)
        for c in clients:
            c.stop.set()
        for c in clients:
            c.join(timeout=40.0)
        trial.requests = [r for c in clients for r in c.records]
        _phases(cluster.base / "logs", trial, followers)
        trial.first_token_s = _first_token(trial.requests, lost_at)
        return trial


# --- raw transport latency ------------------------------------------------------------------------


def zenoh_latency_ms(samples: int = 300) -> list[float]:
    """One-way latency (half a round trip) between two zenoh peers on loopback, in ms."""
    import zenoh

    from loadtests.cluster import free_port_block

    port = free_port_block(2, ["127.0.0.1"])

    def session(listen: int, connect: int | None) -> Any:
        conf = zenoh.Config()
        conf.insert_json5("mode", '"peer"')
        conf.insert_json5("listen/endpoints", json.dumps([f"tcp/127.0.0.1:{listen}"]))
        conf.insert_json5("connect/endpoints", json.dumps([] if connect is None else [f"tcp/127.0.0.1:{connect}"]))
        conf.insert_json5("scouting/multicast/enabled", "false")
        return zenoh.open(conf)

    a = session(port, None)
    b = session(port + 1, port)
    got = threading.Event()
    b.declare_subscriber("calib/ping", lambda s: b.put("calib/pong", s.payload.to_bytes()))
    a.declare_subscriber("calib/pong", lambda s: got.set())
    time.sleep(0.5)
    out = []
    try:
        for _ in range(samples):
            got.clear()
            t = time.perf_counter()
            a.put("calib/ping", b"x")
            if got.wait(2.0):
                out.append((time.perf_counter() - t) * 500.0)
    finally:
        a.close()
        b.close()
    return out


# --- the profile ----------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _lognormal_sigma(values: list[float]) -> float:
    logs = [math.log(v) for v in values if v > 0]
    return statistics.pstdev(logs) if len(logs) > 1 else 0.0


def calibrate(trials: int, *, work: Path, netns: bool = True, echo: Any = print) -> dict[str, Any]:
    """Run the trials (see the module docstring) and return the profile."""
    work = work.resolve()  # the nodes run elsewhere: every path they get must be absolute
    work.mkdir(parents=True, exist_ok=True)
    models = models_dir(work)
    kinds = ["process"] + (["host"] if netns else [])
    done: dict[str, list[Trial]] = {k: [] for k in kinds}
    for kind in kinds:
        for i in range(trials):
            try:
                trial = run_trial(kind, work / f"{kind}-{i}", models, users=2, pre_s=6.0, post_s=6.0, think_s=0.2)
            except (AssertionError, OSError, RuntimeError, TimeoutError) as exc:
                echo(f"  {kind} trial {i + 1}: FAILED ({type(exc).__name__}: {str(exc)[:200]}); not counted")
                continue
            done[kind].append(trial)
            echo(f"  {kind} trial {i + 1}: detect {[round(d, 4) for d in trial.detect_s]} s, campaign "
                 f"{[round(c, 4) for c in trial.campaign_s]} s (votes {trial.campaign_votes}), first token "
                 f"{trial.first_token_s}" + (" [survivors deaf to each other]" if trial.survivors_deaf else ""))
    steady = [r for t in done["process"] for r in t.requests if r.ok and r.t_first is not None and r.t1 < t.lost_at]
    ttft = [r.t_first - r.t0 for r in steady if r.t_first is not None]
    decode = [(r.tokens - 1) / (r.t1 - r.t_first) for r in steady if r.tokens > 1 and r.t_first is not None and r.t1 > r.t_first]
    prompt_tokens = _median([float(r.prompt_tokens) for r in steady if r.prompt_tokens is not None])
    engine_prefill = [float(r.stats["prompt_tps"]) for r in steady if r.stats and r.stats.get("prompt_tps")]
    engine_decode = [float(r.stats["generation_tps"]) for r in steady if r.stats and r.stats.get("generation_tps")]
    campaign = [c for k in kinds for t in done[k] for c in t.campaign_s]
    # One round of votes after the settle delay is a message each way: half is the one-way latency.
    # Only campaigns that counted every survivor's vote measure a round; one that ended on its
    # timeout with fewer (the survivors did not hear each other) measures the timeout.
    complete = [c for k in kinds for t in done[k] for c, v in zip(t.campaign_s, t.campaign_votes) if v >= t.survivors]
    one_way_ms = [max(0.05, (c - SETTLE_S) * 1000.0 / 2.0) for c in complete if c > SETTLE_S]
    raw = zenoh_latency_ms()
    assert ttft and decode and prompt_tokens, "no steady request measured: the cluster did not serve"
    prefill_tps = prompt_tokens / statistics.median(ttft)
    profile: dict[str, Any] = {
        "measured": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": _commit(),
        "machine": f"{platform.machine()}, {_cpus()} cores, {platform.system()} {platform.release()}, "
                   f"Python {platform.python_version()}",
        "model": DEFAULT_MODEL_ID,
        "trials": {k: len(v) for k, v in done.items()},
        "crash_detect_s": sorted(d for t in done["process"] for d in t.detect_s),
        "lease_detect_s": sorted(d for t in done.get("host", []) for d in t.detect_s),
        "campaign_s": sorted(campaign),
        "campaigns_without_every_vote": {k: sum(1 for t in v for n in t.campaign_votes if n < t.survivors)
                                         for k, v in done.items()},
        "trials_survivors_deaf": {k: sum(1 for t in v if t.survivors_deaf) for k, v in done.items()},
        "session_after_loss_s": sorted(t.session_s for k in kinds for t in done[k] if t.session_s is not None),
        "latency_ms_median": round(statistics.median(one_way_ms), 3) if one_way_ms else None,
        "latency_jitter": round(_lognormal_sigma(one_way_ms), 3),
        "zenoh_ping_ms_median": round(statistics.median(raw), 4) if raw else None,
        "prompt_tokens": int(prompt_tokens),
        "max_tokens": 16,
        "ttft_s_median": round(statistics.median(ttft), 4),
        "prefill_tps": round(prefill_tps, 1),
        "decode_tps": round(statistics.median(decode), 1),
        "engine_prompt_tps_median": _median(engine_prefill),
        "engine_generation_tps_median": _median(engine_decode),
        "tokens_per_chunk": 1,
    }
    return profile


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=10, help="trials of each crash kind")
    p.add_argument("--no-netns", action="store_true", help="skip the lost-host trials (they need root)")
    p.add_argument("--work", default="artifacts/calibrate", help="scratch directory")
    p.add_argument("--out", default=str(PROFILE_PATH), help="where to write the profile")
    args = p.parse_args(argv)
    netns = not args.no_netns
    if netns:
        from loadtests.netns import netns_available

        ok, why = netns_available()
        if not ok:
            print(f"lost-host trials skipped: {why}", file=sys.stderr)
            netns = False
    print(f"# calibrating: {args.trials} trial(s) per crash kind, fresh clusters", flush=True)
    profile = calibrate(args.trials, work=Path(args.work), netns=netns, echo=lambda l: print(l, flush=True))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in profile.items() if not isinstance(v, list)}, indent=2))
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
