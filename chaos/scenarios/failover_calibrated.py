"""failover_calibrated: ``master_failover`` with this machine's measured timings, like for like with the real run.

The real counterpart is ``python -m loadtests.calibrated_parity``: three
nodes, the model on one follower, six streaming clients through the two
followers (think time 0.2 s on average, ``max_tokens`` 16, the same prompt),
then the master is lost: its process killed (``master_loss_mode=crash``:
its connections reset) or its host cut off (``isolate``: the peers notice
when the lease expires). Everything the simulator would otherwise draw is
taken from the calibration profile (``chaos/profiles/calibrated.json``,
written by ``python -m loadtests.calibrate``): each seed draws its detection
delays from the measured samples (the spread between the fastest and the
slowest peer too), message latency is the measured one-way latency of a vote
between two real nodes, and the runner prefills and decodes at the rates a
real streamed request showed (its time to first token and token rate).
Links are clean (no loss, no tail, no reordering), clocks are one machine's.

Metric ``first_token_after_loss_s``: from the loss to the first token of a
request sent after it, the figure the parity table compares.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import msgspec

from skulk.core.commands import SubmitTask
from skulk.core.ids import CommandId, ModelId
from skulk.core.tasks import ChatMessage, GenerationParams

from chaos.scenarios import Stage, scenario
from chaos.scenarios._calibrated import MODEL, calibrated_cluster, load_profile, prompt_content
from chaos.scenarios._support import expect, place_on
from chaos.stage import ScenarioStuck
from sim.options import SimOptions

USERS = 6
THINK_S = 0.2
RETRY_S = 0.3


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    p = load_profile()
    crash, lease = sorted(p["crash_detect_s"]), sorted(p["lease_detect_s"])
    mode = opts.master_loss_mode if opts.master_loss_mode in ("crash", "isolate") else rng.choice(("crash", "isolate"))
    return calibrated_cluster(
        opts,
        p,
        # The fastest peer's detection, and how much later the slowest one's comes.
        crash_detect_s=crash[0],
        crash_detect_spread_s=crash[-1] - crash[0],
        lease_s=lease[0],
        lease_spread_s=lease[-1] - lease[0],
        runner_prefill_tps=float(p["prefill_tps"]),
        runner_decode_tps=float(p["decode_tps"]),
        runner_tokens_per_chunk=int(p.get("tokens_per_chunk") or 1),
        client_output_tokens_mean=1_000_000,  # every reply runs to max_tokens, as the real model's do
        client_count=USERS,
        client_abandon_probability=0.0,
        client_retry_backoff_s=RETRY_S,
        chaos_s=rng.uniform(25.0, 35.0),
        fault_kinds=(),
        master_loss_mode=mode,
        core=msgspec.structs.replace(opts.core),
    )


def _client(stage: Stage, k: int, hosts: list[Any], until: float, sent: list[Any]) -> Generator[Any, Any, None]:
    """A streaming client like the real run's: the next follower each time, exponential think, retry backoff."""
    world = stage.world
    p = load_profile()
    rng = world.rngs(f"calibrated-client-{k}")
    content = prompt_content(p)
    max_tokens = int(p.get("max_tokens") or 16)
    n = 0
    while world.env.now < until and not world.clients.stopping:
        yield world.env.timeout(rng.expovariate(1.0 / THINK_S))
        host = hosts[(k + n) % len(hosts)]
        n += 1
        if host.node is None:
            continue
        params = GenerationParams(messages=(ChatMessage(role="user", content=content),), max_tokens=max_tokens, seed=0)
        req = world.clients.submit(host, SubmitTask(command_id=CommandId(f"cal-{k}-{n}"), model_id=ModelId(MODEL),
                                                    params=params), client=k)
        sent.append(req)
        yield req.done
        if not req.served:
            yield world.env.timeout(RETRY_S)


@scenario(
    "failover_calibrated",
    "master_failover with this machine's measured detection, latency and model rates (the parity run's twin)",
    adjust=_adjust,
)
def failover_calibrated(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    opts = stage.opts
    master = stage.master_host()
    if master is None:
        raise ScenarioStuck("no single master after boot")
    followers = [world.hosts[h] for h in world.host_ids if h != master.id]
    iid = yield from place_on(stage, MODEL, excluded=tuple(h.id for h in followers[1:]) + (master.id,))
    ok = yield from stage.wait_until(lambda: stage.instance_serving(iid), timeout_s=opts.ready_deadline_s)
    expect(ok, f"{iid} serving on {followers[0].id}")
    until = world.env.now + opts.chaos_s
    sent: list[Any] = []
    for k in range(USERS):
        world.process(_client(stage, k, followers, until, sent))
    yield stage.sleep(stage.rng.uniform(6.0, 10.0))
    master = stage.master_host()
    expect(master is not None, "one master while clients stream")
    assert master is not None
    lost_at = world.env.now
    if opts.master_loss_mode == "crash":
        world.faults.crash_stop(master)
    else:
        world.faults.isolate(master)
    stage.metrics["master_loss_mode"] = opts.master_loss_mode
    ok = yield from stage.wait_until(
        lambda: any(r.served and r.submitted_at >= lost_at for r in sent), timeout_s=max(30.0, until - world.env.now))
    expect(ok, f"a request sent after the master was lost ({opts.master_loss_mode}) served")
    first = min(r.first_chunk_at for r in sent if r.served and r.submitted_at >= lost_at and r.first_chunk_at is not None)
    stage.metrics["first_token_after_loss_s"] = round(first - lost_at, 6)
    yield stage.sleep(max(0.0, until - world.env.now))
