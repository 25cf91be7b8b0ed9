"""Engine benchmark: ``python -m skulk.bench engine``.

After a header naming the BLAS MLX uses (``skulk.engine.accel``), prints for
the embedded presets one section after another:

- ``single``: prefill and decode tokens/s of the Skulk runner (a real runner
  subprocess driven over the IPC protocol), single stream, against plain
  ``mlx_lm`` (``stream_generate``, the loop behind ``mlx_lm.generate``) on the
  same model in this process, alternating rounds, with the decode ratio
  (target >= 0.95);
- ``reference-blas``: prefill of the 10M preset with the optimized BLAS vs
  the mlx wheel's reference BLAS (two runners, alternating; target >= 5x);
- ``concurrent``: aggregate decode tokens/s at 1, 4 and 8 concurrent streams:
  the Skulk runner vs ``mlx_lm.server`` serving the same model directory,
  both under the same load (N streaming requests submitted at once, greedy,
  distinct prompts, same max_tokens), with the ratio (target >= 2x at 8). The
  server runs as shipped (the mlx wheel's BLAS) and on the runner's BLAS,
  which isolates the serving stacks; tokens per CPU-second are printed too,

``multi-turn`` and ``oversubscription`` (``skulk.bench.kvcache``) measure the
prefix cache and the KV budget;

and closes with the peak memory of every process the sections measured: the
runner's and the server's resident high-water mark and MLX's peak allocation
for the in-process baseline.

Every figure comes from one run, measured side by side; nothing is asserted.
The default run takes a few minutes on two cores; ``--quick`` shortens it.

Sections are registered with ``@section(name, help, flags)`` in running order
(``SECTIONS``); ``--sections`` picks some of them. A new section is one
function taking the ``Run`` (parsed flags, rounds, and the peak-memory lines
for the closing summary, to which it adds its own) and printing its own
figures, plus an optional function adding its flags to its own ``--help``
group.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SECTIONS", "Run", "Section", "main", "section"]


def _enable_blas() -> str:
    # The same thread choice as the runner's; inherited by mlx_lm.server.
    from skulk.engine.runner import default_blas_threads

    default_blas_threads()
    try:
        from skulk.engine.accel import enable_fast_blas
    except ImportError:
        return "default (skulk.engine.accel not available)"
    status = enable_fast_blas()
    return f"{status.backend}, {'active' if status.active else 'inactive'}: {status.reason}"


BLAS = _enable_blas()  # must run before anything imports mlx.core

import mlx.core as mx  # noqa: E402
from mlx_lm import load as mlx_load  # noqa: E402
from mlx_lm import stream_generate  # noqa: E402

from skulk.core.ids import CommandId, InstanceId, ModelId, NodeId, RunnerId, TaskId  # noqa: E402
from skulk.core.instances import PipelineShardMetadata, RunnerReady, RunnerSpec  # noqa: E402
from skulk.core.tasks import GenerationParams, Task  # noqa: E402
from skulk.engine.models import DEFAULT_MODEL_ID, PRESETS, SMALL_MODEL_ID, ensure_model  # noqa: E402
from skulk.engine.client import RunnerProcess  # noqa: E402

_FILLER = (
    "The cluster joins several machines into one, and serves models larger than any one of them. "
    "A skulk of foxes crossed the frozen field at dawn, one behind the other. "
)


def _vm_hwm_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) used so far by ``pid`` (default: this process)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _task(task_id: str, **params: Any) -> Task:
    return Task(
        task_id=TaskId(task_id),
        command_id=CommandId(f"cmd-{task_id}"),
        origin=NodeId("bench"),
        instance_id=InstanceId("bench"),
        model_id=ModelId("bench"),
        kind="completion",
        params=GenerationParams(**params),
    )


def _spawn_runner(
    model_id: str, path: Path, n_layers: int, max_concurrent: int = 8, env: dict[str, str] | None = None
) -> RunnerProcess:
    spec = RunnerSpec(
        instance_id=InstanceId(f"bench-{model_id}"),
        runner_id=RunnerId("bench-runner"),
        node_id=NodeId("bench"),
        model_id=ModelId(model_id),
        shard=PipelineShardMetadata(
            model_id=ModelId(model_id), device_rank=0, world_size=1, start_layer=0, end_layer=n_layers, n_layers=n_layers
        ),
        context_ceiling=8192,
        max_concurrent_requests=max_concurrent,
    )
    runner = RunnerProcess.spawn(spec, path, stderr=subprocess.DEVNULL, env=env)
    runner.wait_for_status(RunnerReady, 120)
    return runner


def _prompt_tokens(tokenizer: Any, n: int) -> str:
    text = _FILLER
    while len(tokenizer.encode(text)) < n:
        text += _FILLER
    ids = tokenizer.encode(text)[:n]
    return tokenizer.decode(ids)


def _runner_single(runner: RunnerProcess, prompt: str, max_tokens: int, tag: str) -> tuple[float, float, int, int]:
    chunks = runner.generate(_task(tag, prompt=prompt, max_tokens=max_tokens, temperature=0.0), timeout=600)
    final = chunks[-1]
    assert final.stats is not None and final.usage is not None, final
    return final.stats.prompt_tps, final.stats.generation_tps, final.usage.prompt_tokens, final.usage.completion_tokens


def _mlx_single(model: Any, tokenizer: Any, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """Plain mlx-lm; decode tok/s measured as the runner measures it.

    The runner's ``generation_tps`` is (tokens - 1) / (last token time - first
    token time); mlx-lm's own figure counts the first token against the time
    after it, so it is recomputed here from the same timestamps.
    """
    response = None
    times = []
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        times.append(time.perf_counter())
    assert response is not None and len(times) > 1
    decode_tps = (len(times) - 1) / (times[-1] - times[0])
    return response.prompt_tps, decode_tps, response.generation_tokens


def bench_single(model_id: str, path: Path, rounds: int, prompt_len: int, decode_len: int) -> dict[str, Any]:
    """Single-stream prefill/decode of the runner and of plain mlx-lm, alternating."""
    model, tokenizer = mlx_load(str(path))
    n_layers = len(model.layers)
    prompt = _prompt_tokens(tokenizer, prompt_len)
    runner = _spawn_runner(model_id, path, n_layers)
    try:
        # One untimed round each, so allocations and caches are warm.
        _runner_single(runner, prompt, 8, "warm")
        _mlx_single(model, tokenizer, prompt, 8)
        mx.reset_peak_memory()
        rows = []
        for i in range(rounds):
            c0 = _cpu_s(runner.pid)
            r_prefill, r_decode, n_prompt, n_gen = _runner_single(runner, prompt, decode_len, f"single-{i}")
            c1 = _cpu_s(runner.pid)
            c_self = _cpu_s()
            m_prefill, m_decode, m_gen = _mlx_single(model, tokenizer, prompt, decode_len)
            c2 = _cpu_s()
            # Tokens per CPU-second, prefill included: insensitive to other load.
            eff = (n_gen / max(c1 - c0, 1e-3)) / (m_gen / max(c2 - c_self, 1e-3))
            rows.append((r_prefill, r_decode, m_prefill, m_decode, n_prompt, n_gen, m_gen, eff))
        runner_hwm = _vm_hwm_bytes(runner.pid)
    finally:
        runner.shutdown()
    med = [statistics.median(col) for col in zip(*rows)]
    return {
        "model": model_id,
        "prompt_tokens": int(med[4]),
        "decode_tokens": int(med[5]),
        "runner_prefill_tps": med[0],
        "runner_decode_tps": med[1],
        "mlx_prefill_tps": med[2],
        "mlx_decode_tps": med[3],
        "decode_ratio": med[1] / med[3] if med[3] else float("nan"),
        "decode_ratios": [r[1] / r[3] for r in rows],
        "cpu_efficiency_ratio": med[7],
        "runner_peak_rss": runner_hwm,
        "mlx_peak_bytes": mx.get_peak_memory(),
    }


def bench_reference_blas(model_id: str, path: Path, rounds: int, prompt_len: int) -> dict[str, float]:
    """Runner prefill with the optimized BLAS vs the mlx wheel's reference BLAS, alternating."""
    _, tokenizer = mlx_load(str(path))
    prompt = _prompt_tokens(tokenizer, prompt_len)
    n_layers = PRESETS[model_id].num_hidden_layers
    fast = _spawn_runner(model_id, path, n_layers)
    slow = _spawn_runner(model_id, path, n_layers, env={"SKULK_FAST_BLAS": "0"})
    try:
        _runner_single(fast, prompt, 2, "warm-fast")
        _runner_single(slow, prompt, 2, "warm-slow")
        fast_tps, slow_tps = [], []
        for i in range(rounds):
            fast_tps.append(_runner_single(fast, prompt, 2, f"blas-fast-{i}")[0])
            slow_tps.append(_runner_single(slow, prompt, 2, f"blas-slow-{i}")[0])
    finally:
        fast.shutdown()
        slow.shutdown()
    f, r = statistics.median(fast_tps), statistics.median(slow_tps)
    return {"fast_prefill_tps": f, "reference_prefill_tps": r, "speedup": f / r if r else float("nan")}


def _stream_prompts(n: int) -> list[str]:
    return [f"Request {i}: {_FILLER[: 60 + 7 * i]}" for i in range(n)]


def _runner_concurrent(runner: RunnerProcess, n: int, max_tokens: int, tag: str) -> tuple[float, int, float]:
    """Returns (tokens per second, tokens, tokens per CPU-second of the runner)."""
    ids = [f"{tag}-{i}" for i in range(n)]
    cpu0 = _cpu_s(runner.pid)
    started = time.perf_counter()
    for task_id, prompt in zip(ids, _stream_prompts(n)):
        runner.submit(_task(task_id, prompt=prompt, max_tokens=max_tokens, temperature=0.0))
    done = runner.collect(ids, timeout=600)
    elapsed = time.perf_counter() - started
    tokens = 0
    for task_id in ids:
        final = done[task_id][-1]
        assert final.usage is not None and final.error is None, final
        tokens += final.usage.completion_tokens
    return tokens / elapsed, tokens, tokens / max(_cpu_s(runner.pid) - cpu0, 1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_SERVER_WITH_FAST_BLAS = (
    "import sys\n"
    "try:\n"
    "    from skulk.engine.accel import enable_fast_blas\n"
    "    enable_fast_blas()\n"
    "except ImportError:\n"
    "    pass\n"
    "from mlx_lm.server import main\n"
    "sys.argv = ['mlx_lm.server'] + sys.argv[1:]\n"
    "main()\n"
)


class _MlxServer:
    """``mlx_lm.server`` serving one local model directory on loopback.

    With ``same_blas`` it runs with the BLAS the runner uses (the fast-BLAS
    switch happens before mlx is imported, exactly as in the runner), so the
    comparison measures the serving stacks, not the matmul libraries.
    """

    def __init__(self, path: Path, same_blas: bool) -> None:
        self.port = _free_port()
        self._hub = tempfile.mkdtemp(prefix="skulk-bench-hub-")
        env = dict(os.environ, HF_HUB_CACHE=self._hub, HF_HUB_OFFLINE="1")
        launcher = ["-c", _SERVER_WITH_FAST_BLAS] if same_blas else ["-m", "mlx_lm", "server"]
        self.proc = subprocess.Popen(
            [sys.executable, *launcher, "--model", str(path), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("mlx_lm.server did not become healthy within 120s")

    def complete(self, prompt: str, max_tokens: int) -> int:
        """One streaming greedy completion; returns its completion tokens."""
        body = json.dumps(
            {
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.status
        usage = 0
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                usage = int(event["usage"]["completion_tokens"])
        conn.close()
        return usage

    def concurrent(self, n: int, max_tokens: int) -> tuple[float, int, float]:
        """Returns (tokens per second, tokens, tokens per CPU-second of the server)."""
        results = [0] * n
        cpu0 = _cpu_s(self.proc.pid)
        prompts = _stream_prompts(n)

        def worker(i: int) -> None:
            results[i] = self.complete(prompts[i], max_tokens)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        return sum(results) / elapsed, sum(results), sum(results) / max(_cpu_s(self.proc.pid) - cpu0, 1e-3)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def bench_concurrent(
    model_id: str, path: Path, streams: list[int], max_tokens: int, rounds: int, server_blas: list[str]
) -> dict[str, Any]:
    """Aggregate throughput of the runner and of mlx_lm.server (one per BLAS setting), alternating.

    ``server_blas`` lists ``wheel`` (mlx_lm.server as shipped, on the mlx
    wheel's own BLAS) and/or ``same`` (on the runner's BLAS). Each round runs
    the runner, then every server, on the same load.
    """
    n_layers = PRESETS[model_id].num_hidden_layers if model_id in PRESETS else 0
    runner = _spawn_runner(model_id, path, n_layers, max_concurrent=max(streams))
    servers: dict[str, _MlxServer] = {}
    rows: dict[int, dict[str, Any]] = {}
    try:
        for kind in server_blas:
            servers[kind] = _MlxServer(path, same_blas=kind == "same")
            servers[kind].complete("warm up", 8)
        _runner_concurrent(runner, 1, 8, "warm")
        for n in streams:
            tps: dict[str, list[float]] = {k: [] for k in ["skulk", *servers]}
            eff: dict[str, list[float]] = {k: [] for k in ["skulk", *servers]}
            for r in range(rounds):
                rate, _, per_cpu = _runner_concurrent(runner, n, max_tokens, f"c{n}-{r}")
                tps["skulk"].append(rate)
                eff["skulk"].append(per_cpu)
                for kind, server in servers.items():
                    rate, _, per_cpu = server.concurrent(n, max_tokens)
                    tps[kind].append(rate)
                    eff[kind].append(per_cpu)
            rows[n] = {k: (statistics.median(tps[k]), statistics.median(eff[k])) for k in tps}
        server_hwm = {kind: _vm_hwm_bytes(server.proc.pid) for kind, server in servers.items()}
        runner_hwm = _vm_hwm_bytes(runner.pid)
    finally:
        for server in servers.values():
            server.close()
        runner.shutdown()
    return {"model": model_id, "rows": rows, "runner_peak_rss": runner_hwm, "server_peak_rss": server_hwm}


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# --- sections ---------------------------------------------------------------


@dataclass
class Run:
    """What every section sees: the flags, the rounds per figure, and the peak-memory lines.

    ``memory`` collects one line per measured process group, left by the
    sections that measured it, for the closing peak-memory summary.
    """

    args: argparse.Namespace
    rounds: int
    memory: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Section:
    """One part of the benchmark: a name for ``--sections``, its body and its flags.

    ``flags`` adds the section's own options to an argparse argument group.
    """

    name: str
    help: str
    run: Callable[[Run], None]
    flags: Callable[[Any], None] | None = None


SECTIONS: list[Section] = []
"""Every section, in running order; ``@section`` appends."""


def section(
    name: str, help: str, flags: Callable[[Any], None] | None = None
) -> Callable[[Callable[[Run], None]], Callable[[Run], None]]:
    """Register the decorated function as the section ``name`` (run after those before it)."""
    assert name and "," not in name, name

    def register(body: Callable[[Run], None]) -> Callable[[Run], None]:
        assert name not in {s.name for s in SECTIONS}, f"section {name!r} registered twice"
        SECTIONS.append(Section(name=name, help=help, run=body, flags=flags))
        return body

    return register


def _single_flags(group: Any) -> None:
    group.add_argument("--models", default=f"{DEFAULT_MODEL_ID},{SMALL_MODEL_ID}", help="comma-separated preset ids")


@section("single", "single-stream prefill and decode, runner vs in-process mlx-lm", _single_flags)
def _single(run: Run) -> None:
    args, rounds = run.args, run.rounds
    print("Single stream (greedy; medians of alternating rounds; runner = real runner subprocess over IPC)")
    header = f"{'model':24} {'prompt':>6} {'gen':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'mlx-lm prefill':>15} {'mlx-lm decode':>14} {'decode ratio':>13}"
    print(header)
    singles = []
    for model_id in [m for m in args.models.split(",") if m]:
        path = ensure_model(model_id)
        small = model_id == SMALL_MODEL_ID
        res = bench_single(
            model_id, path, rounds,
            prompt_len=256 if args.quick else 512,
            decode_len=(64 if small else 128) if args.quick else (128 if small else 256),
        )  # fmt: skip
        singles.append(res)
        print(
            f"{model_id:24} {res['prompt_tokens']:>6} {res['decode_tokens']:>5} {res['runner_prefill_tps']:>14.1f} "
            f"{res['runner_decode_tps']:>13.1f} {res['mlx_prefill_tps']:>15.1f} {res['mlx_decode_tps']:>14.1f} "
            f"{res['decode_ratio']:>12.3f}x"
        )
    print("  per-round decode ratios: " + "; ".join(
        f"{r['model']}: " + ", ".join(f"{x:.3f}" for x in r["decode_ratios"]) for r in singles))  # fmt: skip
    print("  tokens per CPU-second, runner / mlx-lm (whole request, load-insensitive): " + "; ".join(
        f"{r['model']}: {r['cpu_efficiency_ratio']:.3f}" for r in singles))  # fmt: skip
    print()
    for res in singles:
        run.memory.append(f"  {res['model']}: runner RSS high-water {_mib(res['runner_peak_rss'])}; "
                          f"MLX peak allocation of in-process mlx-lm {_mib(res['mlx_peak_bytes'])}")  # fmt: skip


def _reference_blas_flags(group: Any) -> None:
    group.add_argument("--skip-reference-blas", action="store_true", help="skip the reference-BLAS prefill row")


@section("reference-blas", "prefill with the optimized BLAS vs the mlx wheel's reference BLAS", _reference_blas_flags)
def _reference_blas(run: Run) -> None:
    if run.args.skip_reference_blas:
        return
    blas_model = SMALL_MODEL_ID
    ref = bench_reference_blas(blas_model, ensure_model(blas_model), run.rounds, 256 if run.args.quick else 512)
    print(f"Prefill on {blas_model}, runner with the optimized BLAS vs the mlx wheel's reference BLAS (SKULK_FAST_BLAS=0)")
    print(f"  {ref['fast_prefill_tps']:.1f} vs {ref['reference_prefill_tps']:.1f} tok/s: {ref['speedup']:.1f}x")
    print()


def _concurrent_flags(group: Any) -> None:
    group.add_argument("--concurrency-model", default=DEFAULT_MODEL_ID, help="preset for the concurrency comparison")
    group.add_argument("--streams", default="1,4,8", help="concurrent stream counts")
    group.add_argument(
        "--server-blas", choices=("both", "same", "wheel"), default="both",
        help="mlx_lm.server on the mlx wheel's own BLAS (wheel, as shipped), on the runner's BLAS (same), or both",
    )  # fmt: skip


@section("concurrent", "aggregate decode at several concurrent streams, runner vs mlx_lm.server", _concurrent_flags)
def _concurrent(run: Run) -> None:
    args, rounds = run.args, run.rounds
    streams = [int(s) for s in args.streams.split(",") if s]
    max_tokens = 64 if args.quick else 128
    print(
        f"Concurrent streams on {args.concurrency_model} (aggregate completion tok/s; {max_tokens} tokens per stream, "
        "greedy, all submitted at once; mlx_lm.server over HTTP/SSE, Skulk runner over its IPC pipes)"
    )
    kinds = ["wheel", "same"] if args.server_blas == "both" else [args.server_blas]
    conc = bench_concurrent(
        args.concurrency_model, ensure_model(args.concurrency_model), streams, max_tokens, rounds, kinds
    )
    label = {"wheel": "mlx_lm.server (wheel BLAS)", "same": "mlx_lm.server (runner's BLAS)"}
    print(f"{'streams':>7} {'skulk tok/s':>12}" + "".join(f" {label[k]:>30} {'ratio':>6}" for k in kinds))
    for n, row in conc["rows"].items():
        line = f"{n:>7} {row['skulk'][0]:>12.1f}"
        for k in kinds:
            line += f" {row[k][0]:>30.1f} {row['skulk'][0] / row[k][0]:>5.2f}x"
        print(line)
    print("tokens per CPU-second of each serving process (all its threads; clients not counted), which")
    print("hardly moves with other load on the machine, unlike the wall-clock rates above:")
    print(f"{'streams':>7} {'skulk':>12}" + "".join(f" {label[k]:>30} {'ratio':>6}" for k in kinds))
    for n, row in conc["rows"].items():
        line = f"{n:>7} {row['skulk'][1]:>12.1f}"
        for k in kinds:
            line += f" {row[k][1]:>30.1f} {row['skulk'][1] / row[k][1]:>5.2f}x"
        print(line)
    print()
    run.memory.append(f"  concurrency run: runner RSS high-water {_mib(conc['runner_peak_rss'])}; " + "; ".join(
        f"{label[k]} {_mib(v)}" for k, v in conc["server_peak_rss"].items()))  # fmt: skip


def _multi_turn_flags(group: Any) -> None:
    from skulk.bench.kvcache import add_multi_turn_flags

    add_multi_turn_flags(group)


@section("multi-turn", "chat turns growing to ~2,000 tokens: time to first token with and without the prefix cache, and mlx_lm.server's", _multi_turn_flags)
def _multi_turn(run: Run) -> None:
    from skulk.bench.kvcache import multi_turn

    multi_turn(run)


def _oversubscription_flags(group: Any) -> None:
    from skulk.bench.kvcache import add_oversubscription_flags

    add_oversubscription_flags(group)


@section("oversubscription", "8 streams needing twice the KV budget: crashes, completions, 503s, p95 time to first token", _oversubscription_flags)
def _oversubscription(run: Run) -> None:
    from skulk.bench.kvcache import oversubscription

    oversubscription(run)


def _print_memory(run: Run) -> None:
    """The closing summary: every peak-memory line the sections left, if any."""
    if not run.memory:
        return
    print("Peak memory")
    for line in run.memory:
        print(line)
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m skulk.bench engine", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and tokens (about a minute)")
    parser.add_argument("--rounds", type=int, default=0, help="alternating rounds per figure (default 3, quick 1)")
    names = [s.name for s in SECTIONS]
    parser.add_argument(
        "--sections", default=",".join(names),
        help="comma-separated sections to run, in this order: " + "; ".join(f"{s.name} ({s.help})" for s in SECTIONS),
    )  # fmt: skip
    for s in SECTIONS:
        if s.flags is not None:
            s.flags(parser.add_argument_group(f"section {s.name}", s.help))
    args = parser.parse_args(argv)
    chosen = [name for name in args.sections.split(",") if name]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(names)}")
    run = Run(args=args, rounds=args.rounds or (1 if args.quick else 3))
    started = time.perf_counter()
    print(f"skulk engine benchmark  (python {sys.version.split()[0]}, mlx {mx.__version__}, {os.cpu_count()} CPUs)")
    print(f"BLAS (runner and in-process mlx-lm): {BLAS}")
    print("load average at start: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + "  (other work on the machine skews every figure)")
    print()
    for s in SECTIONS:
        if s.name in chosen:
            s.run(run)
    _print_memory(run)
    print(f"took {time.perf_counter() - started:.0f}s; load average at end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
