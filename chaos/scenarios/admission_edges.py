"""admission_edges: requests exactly at the context ceiling's edges are admitted or refused as documented.

``context_admission`` sends clearly over-long requests; a rule off by one
token passes it. Here every probe sits on an edge of the documented rules
(DESIGN.md section 2, ``docs/placement.md``), against the instance's
ceiling (itself checked by oracle O2):

- a prompt of exactly the ceiling fills the window: refused
  (``context_length_exceeded``), before prefill;
- one token less with ``max_tokens`` 1: served, one token;
- ``max_tokens`` exactly the room left beside a prompt: admitted and served;
  one more: refused, never shortened;
- no ``max_tokens`` and a prompt a few tokens under the ceiling: served,
  never more tokens than the room left.

Probes go to the API of rank 0's node (its stream never crosses the
network), one at a time, while nothing else runs.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from chaos.scenarios import Stage, scenario
from chaos.scenarios._support import expect, place_on, submit_chat, wait_serving
from sim.options import SimOptions

REFUSED = "context_length_exceeded"


def _adjust(opts: SimOptions, rng: Any) -> SimOptions:
    n = rng.choice((1, 2, 3))
    # The 70B (its ceiling bound by memory) needs two nodes of these sizes.
    model = "sim/qwen-7b" if n == 1 else rng.choice(("sim/qwen-7b", "sim/llama-70b"))
    return opts.with_(
        node_count=n,
        ram_total_gib=tuple(rng.choice((48, 64, 96)) for _ in range(n)),
        model_id=model,
        fault_kinds=(),
        client_count=0,
        loss_probability=0.0,
    )


@scenario(
    "admission_edges",
    "requests exactly at the context ceiling's edges: a full window refused, the last token of room admitted",
    adjust=_adjust,
)
def admission_edges(stage: Stage) -> Generator[Any, Any, None]:
    world = stage.world
    opts = stage.opts
    model = opts.model_id
    rng = stage.rng
    yield from place_on(stage, model, min_nodes=opts.node_count)
    inst = yield from wait_serving(stage, model, timeout_s=opts.ready_deadline_s)
    ceiling = inst.context_ceiling
    sa = inst.shard_assignments
    rank0 = next(node for node, r in sa.node_to_runner.items() if sa.runner_to_shard[r].device_rank == 0)
    host = world.hosts[rank0]
    probes = 0

    def probe(what: str, prompt: int, max_tokens: int | None) -> Generator[Any, Any, Any]:
        nonlocal probes
        probes += 1
        req = submit_chat(stage, host, f"edge-{probes}", model, prompt_tokens=prompt, max_tokens=max_tokens)
        yield req.done
        stage.metrics[f"probe{probes}"] = f"{what}: {req.outcome} {req.code or ''} {req.tokens} tokens".strip()
        return req

    req = yield from probe("a prompt of exactly the ceiling", ceiling, None)
    expect(req.outcome == "error" and req.code == REFUSED and req.tokens == 0,
           f"a prompt of exactly the ceiling ({ceiling}) refused as {REFUSED}, got {req.outcome} ({req.code})")
    req = yield from probe("one token under, max_tokens 1", ceiling - 1, 1)
    expect(req.served and req.tokens == 1, f"a prompt of {ceiling - 1} with max_tokens 1 served with one token, got "
                                           f"{req.outcome} ({req.code}) {req.tokens} tokens: {req.message}")
    prompt = rng.randint(1, ceiling // 2)
    room = ceiling - prompt
    req = yield from probe("max_tokens exactly the room", prompt, room)
    expect(req.served and 1 <= req.tokens <= room, f"max_tokens {room} beside {prompt} prompt tokens (exactly the room) "
                                                  f"admitted, got {req.outcome} ({req.code}): {req.message}")
    req = yield from probe("max_tokens one past the room", prompt, room + 1)
    expect(req.outcome == "error" and req.code == REFUSED and req.tokens == 0,
           f"max_tokens {room + 1} beside {prompt} prompt tokens refused, never shortened, got {req.outcome} "
           f"({req.code}) {req.tokens} tokens")
    left = rng.randint(1, 3)
    req = yield from probe("no max_tokens, a few tokens of room", ceiling - left, None)
    expect(req.served and 1 <= req.tokens <= left, f"a prompt {left} token(s) under the ceiling clamped to the room, "
                                                   f"got {req.outcome} ({req.code}) {req.tokens} tokens")
    stage.metrics["ceiling"] = ceiling
