"""The prefix cache and the KV budget, measured: two sections of ``python -m skulk.bench engine``.

``multi-turn``: a chat of ``--turns`` turns whose context grows to about
``--context`` tokens. Each turn re-sends the whole conversation (fixed user
and assistant messages, so every system sees the same prompts) and asks for
``--reply-tokens`` tokens. Time to first token per turn, for three systems
in the same run, turn by turn in alternation:

- the Skulk runner with its prefix cache (the default),
- the Skulk runner with it off (``SKULK_PREFIX_CACHE_BYTES=0``),
- ``mlx_lm.server`` with its own prompt cache (on by default), on the
  runner's BLAS, serving the same model directory.

The runner is driven over its IPC pipes, the server over HTTP/SSE on
loopback (a few milliseconds of difference, not counted out). Each round
starts a new conversation (a different system message), so nothing carries
over between rounds; the figures are medians over rounds.

``oversubscription``: ``--streams`` concurrent streams (default 8) whose
prompts plus ``max_tokens`` together need about twice the runner's KV
budget, all submitted at once. Counted per configuration: runner crashes and
out-of-memory exits, completions, 503 ``kv_budget_exhausted`` refusals (each
must carry ``Retry-After``), p95 time to first token of the completed ones,
and the most KV the runner's ledger held against its budget (from its
heartbeats). The configurations: the default queue wait, a short one (so
refusals show), and the budget lifted (``SKULK_KV_BUDGET_BYTES`` far above
the placement's figure), which shows the memory every stream at once needs.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, RunnerId, TaskId
from skulk.core.instances import PipelineShardMetadata, RunnerReady, RunnerSpec
from skulk.core.kv_budget import KV_BUDGET_EXHAUSTED
from skulk.core.tasks import ChatMessage, GenerationParams, Task
from skulk.engine.client import RunnerGone, RunnerProcess
from skulk.engine.protocol import Chunk, Heartbeat

__all__ = ["add_multi_turn_flags", "add_oversubscription_flags", "multi_turn", "oversubscription"]

_USER = (
    "Here is the next part of the report on the field trip. The foxes crossed the frozen field at dawn, "
    "one behind the other, and the cluster of machines counted every step they took. "
)
_ASSISTANT = "Noted. The foxes crossed at dawn and the machines kept count. What happened next?"


def add_multi_turn_flags(group: Any) -> None:
    group.add_argument("--kv-model", default="", help="model for both KV sections (default: the real default model, else the 10M preset)")
    group.add_argument("--turns", type=int, default=10, help="chat turns")
    group.add_argument("--context", type=int, default=2000, help="context tokens at the last turn, about")
    group.add_argument("--reply-tokens", type=int, default=8, help="tokens asked for per turn")


def add_oversubscription_flags(group: Any) -> None:
    group.add_argument("--oversub-streams", type=int, default=8, help="concurrent streams")
    group.add_argument("--oversub-budget", type=int, default=2048, help="the runner's context ceiling, hence its KV budget (positions)")
    group.add_argument("--oversub-short-wait", type=float, default=2.0, help="the short queue wait, seconds")


def _model(run: Any) -> tuple[str, Path]:
    """The model both sections use: ``--kv-model``, else the real default model, else the 10M preset."""
    from skulk.engine.models import DEFAULT_MODEL_ID, PRESETS, SMALL_MODEL_ID, ensure_model

    # A generated preset is a random-weight stand-in: measure on the 10M one then.
    model_id = run.args.kv_model or (SMALL_MODEL_ID if DEFAULT_MODEL_ID in PRESETS else DEFAULT_MODEL_ID)
    return model_id, ensure_model(model_id)


def _spawn(model_id: str, path: Path, *, ceiling: int, max_concurrent: int, env: dict[str, str]) -> RunnerProcess:
    config = json.loads((path / "config.json").read_text())
    n_layers = int(config["num_hidden_layers"])
    spec = RunnerSpec(
        instance_id=InstanceId(f"bench-kv-{model_id}"),
        runner_id=RunnerId("bench-kv-runner"),
        node_id=NodeId("bench"),
        model_id=ModelId(model_id),
        shard=PipelineShardMetadata(
            model_id=ModelId(model_id), device_rank=0, world_size=1, start_layer=0, end_layer=n_layers, n_layers=n_layers
        ),
        context_ceiling=ceiling,
        max_concurrent_requests=max_concurrent,
    )
    runner = RunnerProcess.spawn(spec, path, stderr=subprocess.DEVNULL, env={"SKULK_RUNNER_HEARTBEAT_SECONDS": "0.2", **env})
    runner.wait_for_status(RunnerReady, 180)
    return runner


def _messages(tokenizer: Any, system: str, turns: int, context: int) -> list[list[dict[str, str]]]:
    """The conversation as each turn sends it; the last is about ``context`` tokens."""
    per_turn = max(1, context // turns)
    history = [{"role": "system", "content": system}]
    out = []
    user = ""
    for turn in range(turns):
        # Grow the user message until this turn adds about per_turn tokens.
        base = len(tokenizer.apply_chat_template(history, add_generation_prompt=True))
        user = f"Turn {turn + 1}. "
        while len(tokenizer.apply_chat_template([*history, {"role": "user", "content": user}], add_generation_prompt=True)) - base < per_turn - 24:
            user += _USER
        history = [*history, {"role": "user", "content": user}]
        out.append(list(history))
        history = [*history, {"role": "assistant", "content": _ASSISTANT}]
    return out


def _runner_ttft(runner: RunnerProcess, task_id: str, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float, int, int]:
    """Submit one chat turn; returns (seconds to its first token, the runner's CPU seconds until then,
    prompt tokens, cached tokens)."""
    from skulk.bench.engine import _cpu_s

    task = Task(
        task_id=TaskId(task_id),
        command_id=CommandId(f"cmd-{task_id}"),
        origin=NodeId("bench"),
        instance_id=InstanceId("bench"),
        model_id=ModelId("bench"),
        kind="chat",
        params=GenerationParams(
            messages=tuple(ChatMessage(role=m["role"], content=m["content"]) for m in messages),
            max_tokens=max_tokens,
            temperature=0.0,
        ),
    )
    cpu0 = _cpu_s(runner.pid)
    started = time.perf_counter()
    runner.submit(task)
    first = None
    cpu = 0.0
    while True:
        msg = runner.recv(timeout=600)
        if msg is None:
            raise TimeoutError(f"{task_id}: nothing from the runner for 600s")
        if isinstance(msg, Chunk) and msg.chunk.task_id == task_id:
            if first is None and msg.chunk.token_ids:
                first = time.perf_counter() - started
                cpu = _cpu_s(runner.pid) - cpu0
            if msg.chunk.finish_reason is not None:
                final = msg.chunk
                break
    assert final.error is None and first is not None and final.usage is not None and final.stats is not None, final
    return first, cpu, final.usage.prompt_tokens, final.stats.cached_tokens


class _ChatServer:
    """``mlx_lm.server`` (from ``skulk.bench.engine``) asked for streamed chat turns."""

    def __init__(self, path: Path) -> None:
        from skulk.bench.engine import _MlxServer

        self.server = _MlxServer(path, same_blas=True)

    def ttft(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float, int]:
        """One streamed chat turn: (seconds to the first content, the server's CPU seconds until then, cached tokens)."""
        from skulk.bench.engine import _cpu_s

        body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                           "stream_options": {"include_usage": True}})  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=600)
        pid = self.server.proc.pid
        cpu0 = _cpu_s(pid)
        started = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.status
        first = None
        cpu = 0.0
        cached = 0
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            choices = event.get("choices") or []
            if first is None and choices and (choices[0].get("delta") or {}).get("content"):
                first = time.perf_counter() - started
                cpu = _cpu_s(pid) - cpu0
            usage = event.get("usage") or {}
            cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or cached)
        conn.close()
        assert first is not None, "mlx_lm.server streamed no content"
        return first, cpu, cached

    def close(self) -> None:
        self.server.close()


def multi_turn(run: Any) -> None:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    args = run.args
    model_id, path = _model(run)
    tokenizer = load_tokenizer(path)
    rounds = run.rounds
    turns = args.turns
    print(
        f"Multi-turn chat on {model_id}: {turns} turns growing to about {args.context} tokens, {args.reply_tokens} tokens "
        f"asked per turn; time to first token (ms), medians of {rounds} conversation(s); systems alternate turn by turn"
    )
    cached = _spawn(model_id, path, ceiling=8192, max_concurrent=8, env={})
    plain = _spawn(model_id, path, ceiling=8192, max_concurrent=8, env={"SKULK_PREFIX_CACHE_BYTES": "0"})
    server = _ChatServer(path)
    kinds = ("cache", "plain", "server")
    ttft: dict[str, list[list[float]]] = {k: [[] for _ in range(turns)] for k in kinds}
    cpu: dict[str, list[list[float]]] = {k: [[] for _ in range(turns)] for k in kinds}
    reused: list[list[int]] = [[] for _ in range(turns)]
    server_reused: list[list[int]] = [[] for _ in range(turns)]
    prompt_tokens = [0] * turns
    try:
        # Warm each system once (first-request allocations), on a conversation of its own.
        warm = _messages(tokenizer, "Warm-up.", 2, 200)
        for i, msgs in enumerate(warm):
            _runner_ttft(cached, f"warm-c-{i}", msgs, 2)
            _runner_ttft(plain, f"warm-p-{i}", msgs, 2)
            server.ttft(msgs, 2)
        for r in range(rounds):
            conversation = _messages(tokenizer, f"You are a field recorder (conversation {r}).", turns, args.context)
            for t, msgs in enumerate(conversation):
                s, c, n_prompt, n_cached = _runner_ttft(cached, f"mt-c-{r}-{t}", msgs, args.reply_tokens)
                ttft["cache"][t].append(s)
                cpu["cache"][t].append(c)
                reused[t].append(n_cached)
                prompt_tokens[t] = n_prompt
                s, c, _, n_plain = _runner_ttft(plain, f"mt-p-{r}-{t}", msgs, args.reply_tokens)
                assert n_plain == 0, "the runner without a prefix cache reused a prefix"
                ttft["plain"][t].append(s)
                cpu["plain"][t].append(c)
                s, c, n_server = server.ttft(msgs, args.reply_tokens)
                ttft["server"][t].append(s)
                cpu["server"][t].append(c)
                server_reused[t].append(n_server)
    finally:
        server.close()
        cached.shutdown()
        plain.shutdown()
    med = {k: [statistics.median(v) for v in rows] for k, rows in ttft.items()}
    cpu_med = {k: [statistics.median(v) for v in rows] for k, rows in cpu.items()}
    print(f"{'turn':>4} {'context':>7} {'reused':>7} {'skulk cache':>12} {'skulk no cache':>15} {'mlx_lm.server':>14} "
          f"{'server reused':>13} {'no cache / cache':>17} {'server / skulk':>15}")  # fmt: skip
    for t in range(turns):
        c, p, s = med["cache"][t] * 1000, med["plain"][t] * 1000, med["server"][t] * 1000
        print(
            f"{t + 1:>4} {prompt_tokens[t]:>7} {int(statistics.median(reused[t])):>7} {c:>12.1f} {p:>15.1f} {s:>14.1f} "
            f"{int(statistics.median(server_reused[t])):>13} {p / c:>16.2f}x {s / c:>14.2f}x"
        )
    print("CPU milliseconds the serving process spent until the first token (all its threads), which other load")
    print("on the machine hardly moves, unlike the wall-clock times above:")
    print(f"{'turn':>4} {'skulk cache':>12} {'skulk no cache':>15} {'mlx_lm.server':>14} {'no cache / cache':>17} {'server / skulk':>15}")
    for t in range(turns):
        c, p, s = (cpu_med[k][t] * 1000 for k in kinds)
        print(f"{t + 1:>4} {c:>12.0f} {p:>15.0f} {s:>14.0f} {p / max(c, 1e-3):>16.2f}x {s / max(c, 1e-3):>14.2f}x")
    last = turns - 1
    per_round = [ttft["server"][last][i] / ttft["cache"][last][i] for i in range(rounds)]
    print(
        f"  turn {turns}: {med['plain'][last] / med['cache'][last]:.1f}x lower time to first token with the prefix cache "
        f"than without (target >= 5x; CPU {cpu_med['plain'][last] / max(cpu_med['cache'][last], 1e-3):.1f}x); "
        f"{med['server'][last] / med['cache'][last]:.2f}x mlx_lm.server's (target >= 1.0x; median of per-round ratios "
        f"{statistics.median(per_round):.2f}x; CPU {cpu_med['server'][last] / max(cpu_med['cache'][last], 1e-3):.2f}x)"
    )
    print(f"  per-round turn-{turns} times (ms), cache / no cache / server: " + "; ".join(
        f"{ttft['cache'][last][i] * 1000:.0f} / {ttft['plain'][last][i] * 1000:.0f} / {ttft['server'][last][i] * 1000:.0f}"
        for i in range(rounds)))  # fmt: skip
    print()


# --- oversubscription ----------------------------------------------------------------------------


@dataclass
class _Outcome:
    label: str
    budget_positions: int = 0
    bytes_per_position: int = 0
    completed: int = 0
    refused: int = 0
    refused_without_retry_after: int = 0
    other_errors: list[str] = field(default_factory=list)
    crashed: bool = False
    exit_code: int | None = None
    oom: bool = False
    ttft_s: list[float] = field(default_factory=list)
    peak_positions: int = 0
    rss_peak: int = 0
    wall_s: float = 0.0


def _stream_prompts(tokenizer: Any, n: int, tokens: int) -> list[str]:
    out = []
    for i in range(n):
        text = f"Stream {i}: "
        while len(tokenizer.encode(text)) < tokens:
            text += _USER
        out.append(tokenizer.decode(tokenizer.encode(text)[:tokens]))
    return out


def _oversubscribe(
    label: str, model_id: str, path: Path, prompts: list[str], max_tokens: int, ceiling: int, env: dict[str, str]
) -> _Outcome:
    from skulk.bench.engine import _task, _vm_hwm_bytes

    out = _Outcome(label)
    runner = _spawn(model_id, path, ceiling=ceiling, max_concurrent=len(prompts), env=env)
    ids = [f"{label}-{i}" for i in range(len(prompts))]
    firsts: dict[str, float] = {}
    finals: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        for task_id, prompt in zip(ids, prompts):
            runner.submit(_task(task_id, prompt=prompt, max_tokens=max_tokens, temperature=0.0))
        while len(finals) < len(ids):
            msg = runner.recv(timeout=600)
            if msg is None:
                raise TimeoutError(f"{label}: nothing from the runner for 600s")
            if isinstance(msg, Heartbeat) and msg.kv is not None:
                out.budget_positions = msg.kv.budget_positions
                out.bytes_per_position = msg.kv.bytes_per_position or out.bytes_per_position
                out.peak_positions = max(out.peak_positions, msg.kv.rows_positions + msg.kv.cache_positions)
            if isinstance(msg, Chunk):
                chunk = msg.chunk
                if chunk.token_ids and chunk.task_id not in firsts:
                    firsts[chunk.task_id] = time.perf_counter() - started
                if chunk.finish_reason is not None:
                    finals[chunk.task_id] = chunk
        out.rss_peak = _vm_hwm_bytes(runner.pid)
    except RunnerGone:
        out.crashed = True
    finally:
        out.wall_s = time.perf_counter() - started
        if out.crashed:
            out.exit_code = runner.wait_exit(30)
            out.oom = out.exit_code in (-9, 137)  # the kernel's OOM killer (MLX's Metal OOM aborts: -6)
        else:
            runner.shutdown()
    for task_id in ids:
        final = finals.get(task_id)
        if final is None:
            continue
        if final.error is None:
            out.completed += 1
            out.ttft_s.append(firsts[task_id])
        elif final.error.code == KV_BUDGET_EXHAUSTED:
            out.refused += 1
            out.refused_without_retry_after += final.error.retry_after_s is None
        else:
            out.other_errors.append(f"{final.error.code}: {final.error.message}")
    return out


def _p95(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(0.95 * len(ordered))) - 1))]


def oversubscription(run: Any) -> None:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from skulk.engine.prefix_cache import SLACK_TOKENS

    args = run.args
    model_id, path = _model(run)
    tokenizer = load_tokenizer(path)
    n = args.oversub_streams
    budget = args.oversub_budget + SLACK_TOKENS  # no placement reservation here: one ceiling request plus slack
    # prompts + max_tokens of all streams together: about twice the budget.
    per_stream = 2 * budget // n
    max_tokens = max(16, per_stream // 4)
    prompts = _stream_prompts(tokenizer, n, per_stream - max_tokens)
    need = sum(len(tokenizer.encode(p)) + max_tokens for p in prompts)
    print(
        f"Oversubscription on {model_id}: {n} streams at once, each {per_stream - max_tokens} prompt tokens + max_tokens "
        f"{max_tokens}; together {need} positions against a KV budget of {budget} ({need / budget:.2f}x); greedy"
    )
    configs = [
        ("default-wait", {}, "budget on, queue wait 30s (default)"),
        ("short-wait", {"SKULK_KV_QUEUE_WAIT_SECONDS": repr(args.oversub_short_wait)},
         f"budget on, queue wait {args.oversub_short_wait:g}s"),
        ("no-budget", {"SKULK_KV_BUDGET_BYTES": str(1 << 40)}, "budget lifted (SKULK_KV_BUDGET_BYTES=1 TiB)"),
    ]  # fmt: skip
    outcomes = []
    for label, env, _ in configs:
        outcomes.append(_oversubscribe(label, model_id, path, prompts, max_tokens, args.oversub_budget, env))
    print(f"{'configuration':44} {'crashes':>7} {'OOMs':>5} {'done':>5} {'503s':>5} {'p95 TTFT s':>11} {'peak KV / budget':>17} "
          f"{'runner RSS':>11} {'wall s':>7}")  # fmt: skip
    for (_, _, title), o in zip(configs, outcomes):
        ratio = o.peak_positions / budget if budget else float("nan")
        print(
            f"{title:44} {int(o.crashed):>7} {int(o.oom):>5} {o.completed:>5} {o.refused:>5} {_p95(o.ttft_s):>11.2f} "
            f"{ratio:>16.2f}x {o.rss_peak / (1 << 20):>9.1f}Mi {o.wall_s:>7.1f}"
        )
        problems = []
        if o.refused_without_retry_after:
            problems.append(f"{o.refused_without_retry_after} refusals without Retry-After")
        if o.other_errors:
            problems.append("other errors: " + "; ".join(o.other_errors[:3]))
        if o.completed + o.refused != n and not o.crashed:
            problems.append(f"{n - o.completed - o.refused} streams neither completed nor refused")
        if o.crashed:
            problems.append(f"runner exited with {o.exit_code}")
        if problems:
            print("    !! " + "; ".join(problems))
    print(f"  peak KV: the most positions the runner's ledger reserved (rows in mlx-lm's padded layout plus cache), "
          f"from its heartbeats; {outcomes[0].bytes_per_position} bytes per position on this model")  # fmt: skip
    print()
    run.memory.append("  oversubscription: runner RSS high-water " + "; ".join(
        f"{title} {o.rss_peak / (1 << 20):.1f} MiB" for (_, _, title), o in zip(configs, outcomes)))  # fmt: skip
