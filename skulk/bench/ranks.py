"""Every carded architecture across ranks: 2-rank pipeline and tensor greedy tokens vs one process.

Run as ``python -m skulk.bench ranks [--families a,b] [--tokens N] [--root DIR] [--json OUT]``.

Theory of operation
-------------------
For each architecture (``family``) among the built-in cards, a small
random-weight model of that exact architecture is written
(``skulk.engine.archmodels``). One process loads it whole and decodes two
prompts greedily, each alone and then both together in one batch (the second
joining one step after the first, as the engine's continuous batching does),
through the same ``load_shard`` / ``BatchState`` code the runner uses.
Two worker processes joined by ``mx.distributed``'s ring backend over
loopback then do the same as a 2-rank pipeline (layers split in half) and,
where placement allows it, as 2-rank tensor shards. Rank 0 broadcasts each
chosen token, as the runner's plan channel does.

A row is *equal* when every greedy token matches one process's and the
first-step logits agree to float32 reduction-order noise (the maximum
absolute difference is printed). Where placement refuses a sharding for the
family's built-in card, the row shows the refusal and its reason, as the
master would word it (``skulk.core.placement.static_refusal``); such a
sharding is not run.

The prompts are longer than the shrunk sliding windows (8 tokens), so a stage
that gave a sliding layer the wrong mask or cache would decode differently.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PROMPTS", "Greedy", "Row", "carded_families", "run_table", "run_ranks", "single_process", "compare",
           "format_table", "main"]

PROMPTS = [
    "The river runs north through the valley, past the old mill, under the stone bridge and into the lake.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the seven days of the week.",
]
DEFAULT_TOKENS = 12
WORKER_TIMEOUT_S = 600.0
LOGIT_TOLERANCE = 1e-3  # float32 noise (tensor all-sums reorder additions); a wrong mask moves logits by O(1)


@dataclass
class Greedy:
    """What one placement decoded: tokens per prompt alone and batched, first-step logits per prompt."""

    alone: list[list[int]]
    batched: list[list[int]]
    first_logits: list[list[float]]


@dataclass
class Row:
    family: str
    card: str  # the built-in card the refusals come from
    layers: int
    single_batched_equal: bool
    pipeline: str  # "equal", "DIFFERENT: ...", "refused: ...", "error: ..."
    tensor: str
    pipeline_max_logit_diff: float | None = None
    tensor_max_logit_diff: float | None = None
    notes: list[str] = field(default_factory=list)


def carded_families() -> dict[str, str]:
    """Family -> one built-in card of that family, for every family among the built-in cards.

    The card is the first (by id) that placement allows the most shardings
    over 2 nodes, so a row shows what the architecture can do; a card whose
    own figures forbid more (SmolLM2's 3 KV heads do not split in 2) does
    not hide that.
    """
    from skulk.core.placement import static_refusal
    from skulk.cards import builtin_cards

    best: dict[str, tuple[int, str]] = {}
    for model_id, card in sorted(builtin_cards().items()):
        refused = sum(static_refusal(card, s, 2) is not None for s in ("Pipeline", "Tensor"))
        if card.family not in best or refused < best[card.family][0]:
            best[card.family] = (refused, str(model_id))
    return {family: model_id for family, (_, model_id) in sorted(best.items())}


# --- decoding, the same on every rank ------------------------------------------------------


def _greedy(shard: Any, tokenizer: Any, n_tokens: int, share: Any) -> Greedy:
    """Decode ``PROMPTS`` greedily with ``shard``; ``share`` gives every rank rank 0's tokens."""
    import mlx.core as mx

    from skulk.engine.batch import BatchState, Plan

    prompts = [tokenizer.encode(p) for p in PROMPTS]

    def step(state: Any, plan: Any) -> tuple[list[int], Any]:
        logits, pending = state.apply(plan, None)
        mx.eval(pending)
        picked = [] if logits is None else [int(t) for t in mx.argmax(logits, axis=-1).tolist()]
        return share(picked, len(plan.inputs)), logits

    alone, first = [], []
    for p in prompts:
        state = BatchState(shard)
        got, logits = step(state, Plan(prefill_start=True, prefill_tokens=tuple(p[:-1]), join=True, inputs=(p[-1],)))
        first.append([] if logits is None else [float(x) for x in logits[0].astype(mx.float32).tolist()])
        out = list(got)
        while len(out) < n_tokens:
            got, _ = step(state, Plan(inputs=(out[-1],)))
            out += got
        alone.append(out)
    state = BatchState(shard)
    a, b = prompts
    got, _ = step(state, Plan(prefill_start=True, prefill_tokens=tuple(a[:-1]), join=True, inputs=(a[-1],)))
    out_a = list(got)
    got, _ = step(state, Plan(prefill_start=True, prefill_tokens=tuple(b[:-1]), join=True, inputs=(out_a[-1], b[-1])))
    out_a.append(got[0])
    out_b = [got[1]]
    while len(out_b) < n_tokens:
        got, _ = step(state, Plan(inputs=(out_a[-1], out_b[-1])))
        out_a.append(got[0])
        out_b.append(got[1])
    return Greedy(alone=alone, batched=[out_a[:n_tokens], out_b[:n_tokens]], first_logits=first)


def _share_for(group: Any) -> Any:
    import mlx.core as mx

    def share(values: list[int], n: int) -> list[int]:
        local = values if group.rank() == 0 else [0] * n
        assert len(local) == n, (local, n)
        return [int(v) for v in mx.distributed.all_sum(mx.array(local, dtype=mx.int32), group=group).tolist()]

    return share


def single_process(path: Path, n_tokens: int) -> Greedy:
    """Greedy tokens of ``PROMPTS`` from the whole model in this process (the reference)."""
    from skulk.engine.shard import load_shard

    loaded = load_shard(path, None, None)
    return _greedy(loaded.shard, loaded.tokenizer, n_tokens, lambda values, n: values)


# --- the worker processes ------------------------------------------------------------------


def _worker(rank: int, hosts: list[str], jobs: list[dict[str, Any]], n_tokens: int, out: Path | None) -> None:
    """Join the ring, then run every job (family, sharding, path) in order; rank 0 writes the results."""
    from skulk.core.ids import ModelId
    from skulk.core.instances import PipelineShardMetadata, TensorShardMetadata
    from skulk.engine.dist import check_agreement, connect_group
    from skulk.engine.shard import load_shard

    group = connect_group(hosts, rank, 120.0)
    world = len(hosts)
    share = _share_for(group)
    results: dict[str, Any] = {}
    for job in jobs:
        key = f"{job['family']}:{job['sharding']}"
        n_layers = int(job["n_layers"])
        if job["sharding"] == "pipeline":
            bounds = [n_layers * r // world for r in range(world + 1)]  # even split, in rank order
            meta: Any = PipelineShardMetadata(model_id=ModelId(job["model_id"]), device_rank=rank, world_size=world,
                                              start_layer=bounds[rank], end_layer=bounds[rank + 1],
                                              n_layers=n_layers)  # fmt: skip
        else:
            meta = TensorShardMetadata(model_id=ModelId(job["model_id"]), device_rank=rank, world_size=world,
                                       n_layers=n_layers)  # fmt: skip
        error = ""
        try:
            loaded = load_shard(job["path"], meta, group)
        except Exception as exc:  # reported in the table: a load that placement should have refused
            error = f"{type(exc).__name__}: {exc}"
        # Both ranks go on only if both loaded (else one would wait in a collective forever).
        if any(ok == [0] for ok in check_agreement(group, [0 if error else 1])):
            results[key] = {"error": error or "the other rank failed to load"}
            continue
        greedy = _greedy(loaded.shard, loaded.tokenizer, n_tokens, share)
        results[key] = asdict(greedy)
    if rank == 0 and out is not None:
        out.write_text(json.dumps(results))


def run_ranks(jobs: list[dict[str, Any]], n_tokens: int, work: Path, world: int = 2) -> dict[str, Any]:
    """Run ``jobs`` (family, sharding, path, model_id, n_layers) on ``world`` ranks; results by "family:sharding"."""
    work.mkdir(parents=True, exist_ok=True)
    return _run_workers(jobs, n_tokens, work, world)


def _run_workers(jobs: list[dict[str, Any]], n_tokens: int, work: Path, world: int = 2) -> dict[str, Any]:
    from skulk.engine.accel import enable_fast_blas
    from skulk.runtime.localcluster import free_port_block

    # The workers compute on the BLAS this process computed the reference on (a caller that imported
    # MLX first has the wheel's own), so the logits compare sharding, not BLAS implementations.
    env = dict(os.environ)
    if not enable_fast_blas().active:
        env["SKULK_FAST_BLAS"] = "0"

    port = free_port_block(world, ["127.0.0.1"], low=45_000, high=60_000)
    hosts = [f"127.0.0.1:{port + r}" for r in range(world)]
    out = work / "ranks.json"
    jobs_file = work / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    procs = []
    for rank in range(world):
        cmd = [sys.executable, "-m", "skulk.bench.ranks", "--worker", str(rank), "--hosts", ",".join(hosts),
               "--jobs", str(jobs_file), "--tokens", str(n_tokens), "--out", str(out)]  # fmt: skip
        log = open(work / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc, _ in procs:
            proc.kill()
    finally:
        for proc, log in procs:
            proc.wait()
            log.close()
    codes = [proc.returncode for proc, _ in procs]
    if codes != [0] * world or not out.is_file():
        tail = "\n".join("\n".join((work / f"rank{r}.log").read_text().splitlines()[-15:]) for r in range(world))
        raise RuntimeError(f"rank workers exited with {codes}:\n{tail}")
    return json.loads(out.read_text())


# --- the table -----------------------------------------------------------------------------


def compare(single: Greedy, result: dict[str, Any]) -> tuple[str, float | None]:
    """(verdict, largest first-step logit difference) of a distributed run against one process."""
    if "error" in result:
        return f"error: {result['error']}", None
    got = Greedy(**result)
    diff = max(abs(a - b) for x, y in zip(single.first_logits, got.first_logits) for a, b in zip(x, y))
    same_tokens = got.alone == single.alone and got.batched == single.alone
    if same_tokens and diff <= LOGIT_TOLERANCE:
        return "equal", diff
    where = []
    if got.alone != single.alone:
        where.append(f"alone {got.alone} vs {single.alone}")
    if got.batched != single.alone:
        where.append(f"batched {got.batched} vs {single.alone}")
    if diff > LOGIT_TOLERANCE:
        where.append(f"first-step logits differ by {diff:.3g}")
    return "DIFFERENT: " + "; ".join(where), diff


def run_table(
    root: Path,
    families: list[str] | None = None,
    n_tokens: int = DEFAULT_TOKENS,
    log: Any = None,
) -> list[Row]:
    """Build (or reuse) each family's model under ``root``, run every placement, compare; one row per family."""
    from skulk.core.placement import static_refusal
    from skulk.engine.archmodels import write_arch_model
    from skulk.cards import builtin_cards, card_for_model_dir

    cards = builtin_cards()
    carded = carded_families()
    chosen = families or list(carded)
    rows: dict[str, Row] = {}
    singles: dict[str, Greedy] = {}
    jobs: list[dict[str, Any]] = []
    for family in chosen:
        path = root / family
        if not (path / "config.json").is_file():
            write_arch_model(family, path)
        own = card_for_model_dir(path)
        card = cards[carded[family]] if family in carded else own
        single = single_process(path, n_tokens)
        singles[family] = single
        row = Row(family=family, card=str(card.model_id), layers=own.n_layers,
                  single_batched_equal=single.batched == single.alone, pipeline="", tensor="")  # fmt: skip
        for sharding, column in (("pipeline", "pipeline"), ("tensor", "tensor")):
            reason = static_refusal(card, "Pipeline" if sharding == "pipeline" else "Tensor", 2)
            mine = static_refusal(own, "Pipeline" if sharding == "pipeline" else "Tensor", 2)
            if (reason is None) != (mine is None):
                row.notes.append(f"{sharding}: the built-in card and the model's own card disagree ({reason} / {mine})")
            if reason is not None:
                setattr(row, column, f"refused: {reason}")
            else:
                jobs.append({"family": family, "sharding": sharding, "path": str(path),
                             "model_id": str(own.model_id), "n_layers": own.n_layers})  # fmt: skip
        rows[family] = row
        if log is not None:
            log(f"{family}: one process done ({len(jobs)} distributed runs queued)")
    with tempfile.TemporaryDirectory(prefix="skulk-ranks-") as tmp:
        results = _run_workers(jobs, n_tokens, Path(tmp)) if jobs else {}
    for job in jobs:
        row = rows[job["family"]]
        verdict, diff = compare(singles[job["family"]], results[f"{job['family']}:{job['sharding']}"])
        setattr(row, job["sharding"], verdict)
        setattr(row, f"{job['sharding']}_max_logit_diff", diff)
    return [rows[f] for f in chosen]


def format_table(rows: list[Row]) -> str:
    """The architecture-by-rank table as Markdown (what docs/engine.md shows)."""

    def cell(verdict: str, diff: float | None) -> str:
        return f"{verdict} (max logit diff {diff:.1e})" if verdict == "equal" and diff is not None else verdict

    lines = ["| architecture | built-in card | layers | one process, batched = alone | pipeline, 2 ranks | tensor, 2 ranks |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r.family} | {r.card} | {r.layers} | {'yes' if r.single_batched_equal else 'NO'} | "
                     f"{cell(r.pipeline, r.pipeline_max_logit_diff)} | {cell(r.tensor, r.tensor_max_logit_diff)} |")  # fmt: skip
        lines += [f"|  | note: {n} | | | | |" for n in r.notes]
    return "\n".join(lines)


def _enable_blas() -> str:
    from skulk.engine.accel import enable_fast_blas

    return enable_fast_blas().backend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skulk.bench ranks", description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="comma-separated families (default: every family of the built-in cards)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="greedy tokens per prompt")
    parser.add_argument("--root", help="where the models are written (default: a temporary directory)")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hosts", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    backend = _enable_blas()  # every process alike, before mlx.core is imported
    if args.worker is not None:
        _worker(args.worker, args.hosts.split(","), json.loads(Path(args.jobs).read_text()), args.tokens,
                Path(args.out) if args.out else None)  # fmt: skip
        return 0
    families = args.families.split(",") if args.families else None
    print(f"architecture-by-rank check  (BLAS {backend}, {len(PROMPTS)} prompts, {args.tokens} greedy tokens each)")
    with tempfile.TemporaryDirectory(prefix="skulk-arch-") as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        rows = run_table(root, families, args.tokens, log=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    bad = [r.family for r in rows if not r.single_batched_equal or "DIFFERENT" in r.pipeline + r.tensor
           or "error" in r.pipeline + r.tensor]  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    raise SystemExit(main())
