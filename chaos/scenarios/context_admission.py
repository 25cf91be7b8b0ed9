"""context_admission: every rank enforces one ceiling; over-long requests are refused and service goes on.

A model is placed over two or more nodes of mixed memory (for the 70B model
the ceiling is usually bound by memory, not by the card). Then:

1. Every rank reports ``RunnerReady`` with the instance's stamped context
   ceiling, every runner was started with it, and it equals the ceiling the
   memory model computes from the card, the shards and the nodes' RAM.
2. While chat clients stream, over-long requests are sent (bypassing the
   API's own pre-check, as an older API or a direct client would):

   - an explicit ``max_tokens`` that does not fit beside a long prompt,
   - an explicit ``max_tokens`` beyond the ceiling itself (the API's
     pre-check, ``admit`` with no prompt, refuses that one too),
   - a prompt that fills the window.

   Each is refused with ``context_length_exceeded`` before prefill: no token
   streamed, answered in far less time than its prefill would take, never
   silently shortened.
3. A prompt just under the ceiling with no ``max_tokens`` is clamped: it
   streams at most the room left, and a ``length`` finish means it used all
   of it.
4. The runners keep serving: none exited or restarted, every rank still
   ready or running, and requests are served after the refusals.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from skulk.core.admission import DEFAULT_MAX_OUTPUT_TOKENS, Refused, admit
from skulk.core.instances import RUNNER_SERVING, RunnerFailed, RunnerReady

from chaos import oracles
from chaos.scenarios import Stage, scenario
from chaos.scenarios._support import (
    Ledger,
    expect,
    master_state,
    place_on,
    served_after,
    submit_chat,
    wait_serving,
)
from sim.options import SimOptions


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    n = rng.choice((2, 3, 4))
    model = rng.choice(("sim/llama-70b", "sim/llama-70b", "sim/qwen-7b"))
    # Mixed memory: the 70B's per-node KV room differs by node, and on the
    # smaller machines it (not the card's 131,072) bounds the ceiling.
    ram = tuple(rng.choice((48, 48, 64, 96, 128)) for _ in range(n))
    return opts.with_(
        node_count=n,
        ram_total_gib=ram,
        model_id=model,
        fault_kinds=(),
        client_count=max(2, min(opts.client_count, 4)),
    )


@scenario(
    "context_admission",
    "every rank enforces the same context ceiling; over-long requests are refused before prefill and the runner keeps serving",
    adjust=_adjust,
)
def context_admission(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    opts = stage.opts
    model = opts.model_id
    card = world.cards[model]
    ledger = Ledger(stage)
    k = stage.rng.randint(2, opts.node_count)
    iid = yield from place_on(stage, model, min_nodes=k)
    inst = yield from wait_serving(stage, model, timeout_s=opts.ready_deadline_s)
    expect(inst.instance_id == iid, f"{iid} to serve, got {inst.instance_id}")
    ceiling = inst.context_ceiling
    sa = inst.shard_assignments
    runners = set(sa.runner_to_shard)

    # 1. One ceiling, from static inputs, on every rank.
    # The yardstick is the documented arithmetic (chaos.oracles), not the core's own function.
    shares = {node: oracles.share_of(sa.runner_to_shard[r]) for node, r in sa.node_to_runner.items()}
    totals = {node: world.hosts[node].ram_total_bytes for node in shares}
    want = oracles.ceiling(card, shares, totals)
    expect(ceiling == want, f"the stamped ceiling {ceiling} to be the documented arithmetic's {want}")
    ready = {r.runner_id: r.status.context_ceiling for r in ledger.reports
             if r.instance_id == iid and type(r.status) is RunnerReady}
    expect(set(ready) == runners and set(ready.values()) == {ceiling},
           f"every rank ready with ceiling {ceiling}, got {ready}")
    specs = {s.spec.runner_id: s.spec.context_ceiling for s in ledger.starts_of(iid)}
    expect(set(specs) == runners and set(specs.values()) == {ceiling}, f"every runner started with {ceiling}: {specs}")
    stage.metrics["ceiling"] = ceiling
    stage.metrics["ceiling_bound_by"] = "memory" if ceiling < card.context_length else "card"
    stage.metrics["ranks"] = len(runners)

    stage.start_clients(world.env.now + 10_000.0)
    yield stage.sleep(stage.rng.uniform(2.0, 6.0))
    # Probes go through the API of rank 0's node: its stream never crosses the
    # (possibly lossy) network, so each outcome is the runner's own answer.
    rank0 = next(node for node, r in sa.node_to_runner.items() if sa.runner_to_shard[r].device_rank == 0)
    probes = 0

    def send(prompt: int, max_tokens: int | None) -> Any:
        nonlocal probes
        probes += 1
        return submit_chat(stage, world.hosts[rank0], f"probe-{probes}", model, prompt_tokens=prompt, max_tokens=max_tokens)

    # 2. Over-long requests: refused before prefill, never shortened.
    long_prompt = ceiling // 2 + stage.rng.randint(0, ceiling // 4)
    over = [
        ("max_tokens beside a long prompt", long_prompt, ceiling - long_prompt + stage.rng.randint(1, 64)),
        ("max_tokens beyond the ceiling", stage.rng.randint(ceiling // 4, ceiling // 2), ceiling + stage.rng.randint(1, 4_096)),
        ("a prompt that fills the window", ceiling + stage.rng.randint(0, 64), None),
    ]
    api = admit(prompt_tokens=0, max_tokens=over[1][2], ceiling=ceiling, default_max_tokens=DEFAULT_MAX_OUTPUT_TOKENS)
    expect(isinstance(api, Refused), f"the API's pre-check to refuse max_tokens {over[1][2]} > {ceiling} too")
    for what, prompt, max_tokens in over:
        req = send(prompt, max_tokens)
        yield req.done
        expect(req.outcome == "error" and req.code == "context_length_exceeded",
               f"{what} ({prompt} + {max_tokens}) refused as context_length_exceeded, got {req.outcome} "
               f"({req.code}): {req.message}")
        expect(str(ceiling) in req.message, f"the refusal to name the ceiling {ceiling}: {req.message!r}")
        expect(req.tokens == 0 and req.chunks == 1, f"{what}: no token before the refusal, got {req.tokens}")
        prefill_s = prompt / opts.runner_prefill_tps
        took = req.ended_at - req.submitted_at
        expect(took < prefill_s / 2, f"{what}: refused before prefill ({took:.3f} s; prefill takes {prefill_s:.3f} s)")

    # 3. No max_tokens and a prompt just under the ceiling: clamped to the room left.
    room = stage.rng.randint(1, 32)
    req = send(ceiling - room, None)
    yield req.done
    expect(req.served, f"a prompt {room} token(s) under the ceiling served, got {req.outcome} ({req.code}) {req.message}")
    expect(1 <= req.tokens <= room, f"at most the {room} token(s) of room streamed, got {req.tokens}")
    expect(req.finish_reason == "stop" or req.tokens == room, f"a 'length' finish only at the room's end: {req.tokens}")
    stage.metrics["clamped_finish"] = req.finish_reason

    # 4. The runners kept serving.
    since = world.env.now
    ok = yield from stage.wait_until(
        lambda: served_after([r for r in world.clients.requests.values() if r.kind == "SubmitTask"], since) > 0,
        timeout_s=60.0,
    )
    expect(ok, "requests served after the refusals")
    expect(not ledger.exits_of(runners), f"no runner of {iid} exited: {ledger.exits_of(runners)}")
    expect(len(ledger.starts_of(iid)) == len(runners), f"no runner of {iid} restarted")
    failed = [r for r in ledger.reports if r.runner_id in runners and type(r.status) is RunnerFailed]
    expect(not failed, f"no rank failed: {failed}")
    state = master_state(stage)
    expect(state is not None and all(isinstance(state.runners.get(r), RUNNER_SERVING) for r in runners),
           f"every rank of {iid} still ready or running")

    def leftover() -> list[str]:
        now = master_state(stage)
        return [] if now is None else sorted(t.command_id for t in now.tasks.values() if t.command_id.startswith("probe-"))

    # The last chunk can overtake its task's deletion (a local event, retried after
    # 5, 10, 20 s when lost) on the way to the client.
    gone = yield from stage.wait_until(lambda: not leftover(), timeout_s=60.0)
    expect(gone, f"refused and finished probe tasks gone from the state: {leftover()}")
    yield stage.sleep(stage.rng.uniform(2.0, 8.0))
