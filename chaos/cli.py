"""The chaos command line.

    python -m chaos list
    python -m chaos run SCENARIO --seed N [--canary] [--set key=value ...] [--check-determinism]
    python -m chaos sweep [--scenario S ...] --seeds N [--start K] [--jobs J] [--canary] [--check-determinism]
    python -m chaos replay artifacts/chaos/<run>/trace.jsonl
    python -m chaos bench [--sim-seconds S] [--failover-seeds N] [--jobs J]
    python -m chaos speed --against REV [--seeds N] [--repeat R]   # seeds per minute, before and after
    python -m chaos digests --seeds N [--scenario S ...] [--jobs J] --out FILE
    python -m chaos digests --compare FILE [--jobs J] [--out FILE]
    python -m chaos mutate [--mutant M ...] [--time-cap S] [--jobs J] [--harness-from REV] [--out FILE]
    python -m chaos mutate --mutant M --scenario S --seed N   # replay one run of a planted mutant
    python -m chaos ci [--jobs J]          # the CI sample the test command runs
    python -m chaos nightly [--jobs J]     # 10,000 seeds over every scenario, determinism, mutation testing

Exit codes (chaos.exitcodes): 0 ok, 1 harness error, 2 usage, 3 safety
violation, 4 liveness failure, 5 nondeterminism.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from chaos import exitcodes
from chaos.harness import run_scenario
from chaos.scenarios import load_all
from chaos.sweep import sweep, worst_exit_code

__all__ = ["main"]

DEFAULT_ARTIFACTS = Path("artifacts/chaos")
_STATUS_CODES = {"ok": exitcodes.OK, "safety": exitcodes.SAFETY, "liveness": exitcodes.LIVENESS, "error": exitcodes.ERROR}


def _overrides(pairs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set wants key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _cmd_list(args: argparse.Namespace) -> int:
    for name, sc in sorted(load_all().items()):
        print(f"{name:<24} {sc.summary}")
    return exitcodes.OK


def _cmd_run(args: argparse.Namespace) -> int:
    over = _overrides(args.set)
    if args.check_determinism:
        from chaos.determinism import check_determinism

        det = check_determinism(args.scenario, args.seed, overrides=over, canary=args.canary)
        print(det.run.line())
        print(det.line())
        if not det.same:
            return exitcodes.NONDETERMINISM
        return det.run.exit_code
    result = run_scenario(
        args.scenario,
        args.seed,
        overrides=over,
        canary=args.canary,
        quiet=args.quiet,
        artifacts_dir=Path(args.artifacts),
        write_trace=args.trace,
    )
    print(result.line())
    for key, value in sorted(result.metrics.items()):
        print(f"  {key} = {value}")
    if not result.ok:
        print(f"FAILED: seed {result.seed}; replay with: {result.replay}")
    for path in result.artifacts:
        print(f"  artifact: {path}")
    return result.exit_code


def _cmd_digest(args: argparse.Namespace) -> int:
    """Internal: run a seed and print its digest as JSON (used by the determinism check)."""
    result = run_scenario(
        args.scenario,
        args.seed,
        overrides=_overrides(args.set),
        canary=args.canary,
        quiet=True,
        hashes_out=Path(args.hashes) if args.hashes else None,
        write_trace=args.trace is not None,
        artifacts_dir=Path(args.trace).parent / "child" if args.trace else None,
    )
    if args.trace:
        found = sorted((Path(args.trace).parent / "child").rglob("trace.jsonl"))
        if found:
            found[0].rename(args.trace)
    print(json.dumps({"digest": result.digest, "status": result.status, "steps": result.steps}))
    return exitcodes.OK


def _scenarios(names: list[str] | None) -> list[str]:
    registry = load_all()
    chosen = names or sorted(registry)
    unknown = [n for n in chosen if n not in registry]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; known: {', '.join(sorted(registry))}")
    return chosen


def _cmd_sweep(args: argparse.Namespace) -> int:
    names = _scenarios(args.scenario)
    seeds = range(args.start, args.start + args.seeds)
    print(f"# sweep: {', '.join(names)} x seeds {seeds.start}..{seeds.stop - 1}"
          f"{' with the canary' if args.canary else ''}, {args.jobs} job(s)", flush=True)
    summary = sweep(
        names,
        seeds,
        jobs=args.jobs,
        overrides=_overrides(args.set),
        canary=args.canary,
        artifacts_dir=Path(args.artifacts),
        check_determinism=args.check_determinism,
        echo=lambda line: print(line, flush=True),
    )
    print(summary.table())
    code = summary.exit_code
    print(f"# sweep exit code {code} ({exitcodes.NAMES[code]})")
    return code


def _cmd_replay(args: argparse.Namespace) -> int:
    path = Path(args.trace)
    with path.open(encoding="utf-8") as f:
        header = json.loads(f.readline())["header"]
    print(f"# replaying {header['scenario']} seed {header['seed']} (recorded: {header['status']}, digest {header['digest'][:16]})")
    result = run_scenario(
        header["scenario"],
        int(header["seed"]),
        overrides=header.get("overrides") or {},
        canary=bool(header.get("canary")),
        quiet=args.quiet,
        artifacts_dir=Path(args.artifacts),
        write_trace=True,
    )
    print(result.line())
    if result.digest != header["digest"]:
        print(f"NONDETERMINISM: the replay's digest {result.digest[:16]} differs from the recorded {header['digest'][:16]}")
        return exitcodes.NONDETERMINISM
    print("the replay reproduced the recorded trace exactly (same digest)")
    return result.exit_code


def _cmd_bench(args: argparse.Namespace) -> int:
    from chaos.bench import bench_failover, bench_seeds, bench_speed

    print(f"# simulator speed: idle 5-node cluster, {args.sim_seconds:g} simulated s", flush=True)
    bench_speed(args.sim_seconds, echo=lambda l: print(l, flush=True))
    if args.seeds_per_scenario > 0:
        print("# seeds per minute", flush=True)
        bench_seeds(args.seeds_per_scenario, echo=lambda l: print(l, flush=True))
    if args.failover_seeds > 0:
        print(f"# failover time: master_failover (crash) over {args.failover_seeds} seeds, {args.jobs} job(s)", flush=True)
        result = bench_failover(args.failover_seeds, jobs=args.jobs, echo=lambda l: print(l, flush=True))
        if result["failures"]:
            return exitcodes.LIVENESS
    return exitcodes.OK


def _cmd_speed(args: argparse.Namespace) -> int:
    """Seeds per minute of this tree against a git revision, side by side (``chaos.speed``)."""
    from chaos.speed import RunFailed, compare

    print(f"# speed: this tree against {args.against}, seeds {args.start}..{args.start + args.seeds - 1} of each "
          f"scenario, best of {args.repeat}", flush=True)
    try:
        compare(args.against, seeds=args.seeds, start=args.start, repeat=args.repeat,
                scenarios=_scenarios(args.scenario) if args.scenario else None, echo=lambda l: print(l, flush=True))
    except RunFailed as exc:
        print(f"speed: no figure: {exc}", file=sys.stderr, flush=True)
        return exitcodes.ERROR
    return exitcodes.OK


def _cmd_digests(args: argparse.Namespace) -> int:
    """Record the trace digests of many runs, or re-run a recording and compare."""
    from chaos import digests

    echo = lambda line: print(line, flush=True)  # noqa: E731
    if args.compare is not None:
        expected = digests.load(Path(args.compare))
        runs = [digests.parse_key(key) for key in expected]
        if args.scenario:
            wanted = set(_scenarios(args.scenario))
            runs = [(s, n) for s, n in runs if s in wanted]
            expected = {k: v for k, v in expected.items() if digests.parse_key(k)[0] in wanted}
        print(f"# digests: re-running the {len(runs)} runs of {args.compare}, {args.jobs} job(s)", flush=True)
    else:
        if args.seeds is None or args.out is None:
            print("digests: give --seeds N and --out FILE to record, or --compare FILE", file=sys.stderr)
            return exitcodes.USAGE
        seeds = range(args.start, args.start + args.seeds)
        runs = [(name, seed) for name in _scenarios(args.scenario) for seed in seeds]
        print(f"# digests: {len(runs)} runs (seeds {seeds.start}..{seeds.stop - 1}), {args.jobs} job(s)", flush=True)
    actual = digests.record(runs, jobs=args.jobs, echo=echo)
    if args.out is not None:
        digests.save(Path(args.out), actual)
        print(f"# wrote {len(actual)} digests to {args.out}", flush=True)
    not_ok = sorted(k for k, (_, status) in actual.items() if status != "ok")
    if args.compare is None:
        for key in not_ok:
            print(f"{key}: {actual[key][1]}")
        return worst_exit_code(_STATUS_CODES[actual[key][1]] for key in not_ok)
    diff = digests.compare(expected, actual)
    for line in diff:
        print(line)
    if diff:
        print(f"# {len(diff)} of {len(expected)} runs differ from {args.compare}")
        return exitcodes.NONDETERMINISM
    print(f"# all {len(expected)} runs have the recorded digest and status")
    return exitcodes.OK


def _cmd_mutate(args: argparse.Namespace) -> int:
    """Plant each mutant in a scratch copy and hunt it with the sweep (``chaos.mutate``)."""
    from chaos import mutate
    from chaos.mutants import StaleMutant

    if args.list:
        for m in mutate.mutants_named(args.mutant):
            print(f"{m.name:<42} {m.area:<16} {m.path}: {m.why}")
        return exitcodes.OK
    try:
        mutants = mutate.mutants_named(args.mutant)
        for m in mutants:  # fail loudly, naming the mutant, before anything runs
            m.apply((mutate.ROOT / m.path).read_text(encoding="utf-8"))
    except StaleMutant as exc:
        print(f"STALE: {exc}", file=sys.stderr)
        return exitcodes.ERROR
    if args.seed is not None:
        if len(mutants) != 1 or not args.scenario or len(args.scenario) != 1:
            print("mutate --seed replays one run: give exactly one --mutant and one --scenario", file=sys.stderr)
            return exitcodes.USAGE
        print(f"# {mutants[0].name} planted: {mutants[0].why}", flush=True)
        return mutate.replay_seed(mutants[0], args.scenario[0], args.seed, harness_from=args.harness_from)
    names = _scenarios(args.scenario) if args.scenario else None
    where = f"harness from {args.harness_from}" if args.harness_from else "this tree's harness"
    print(f"# mutate: {len(mutants)} mutant(s), {where}, time cap {args.time_cap:g} s each, {args.jobs} job(s)",
          flush=True)
    print(mutate._HEADER, flush=True)
    results = mutate.mutate_all(
        mutants, echo=lambda line: print(line, flush=True), time_cap_s=args.time_cap, jobs=args.jobs,
        scenarios=names, seeds=args.seeds, harness_from=args.harness_from,
    )
    print(mutate.table(results, time_cap_s=args.time_cap))
    if args.out:
        mutate.save(Path(args.out), results)
        print(f"# wrote {args.out}")
    missed = [r for r in results if r.verdict not in ("caught", "benign")]
    return exitcodes.OK if not missed else exitcodes.ERROR


def _cmd_ci(args: argparse.Namespace) -> int:
    """The CI sample: every scenario x a few seeds, a determinism sample, the canary proof."""
    from chaos.determinism import check_determinism

    started = time.perf_counter()
    names = _scenarios(None)
    artifacts = Path(args.artifacts)
    echo = lambda line: print(line, flush=True)  # noqa: E731
    print(f"# ci 1/4: {len(names)} scenarios x seeds 1..{args.seeds}, {args.jobs} job(s)", flush=True)
    summary = sweep(names, range(1, args.seeds + 1), jobs=args.jobs, artifacts_dir=artifacts, echo=echo)
    print(summary.table(), flush=True)
    codes = [summary.exit_code]
    det_seeds = range(args.seeds + 1, args.seeds + 1 + args.determinism_seeds)
    print(f"# ci 2/4: determinism, seeds {det_seeds.start}..{det_seeds.stop - 1} of every scenario, "
          "rerun in a fresh process", flush=True)
    for name in names:
        for seed in det_seeds:
            det = check_determinism(name, seed)
            print(det.line(), flush=True)
            if not det.same:
                codes.append(exitcodes.NONDETERMINISM)
            elif not det.run.ok:
                print(det.run.line(), flush=True)
                print(f"  replay: {det.run.replay}", flush=True)
                codes.append(det.run.exit_code)
    print("# ci 3/4: the canary (a deposed master also acts as master) must be caught", flush=True)
    canary = sweep(["partition_heal", "master_failover"], range(1, 3), jobs=args.jobs, canary=True, echo=echo,
                   overrides={"master_loss_mode": "isolate"})
    caught = [r for r in canary.results if r.status == "safety"]
    print(f"# canary caught in {len(caught)} of {len(canary.results)} runs (sweep exit code {canary.exit_code})", flush=True)
    if canary.exit_code != exitcodes.SAFETY or not any(r.scenario == "partition_heal" for r in caught):
        print("CANARY NOT CAUGHT: the checkers would miss a double master", flush=True)
        codes.append(exitcodes.ERROR)
    codes.append(_ci_mutant(args))
    code = worst_exit_code(codes)
    print(f"# ci done in {time.perf_counter() - started:.0f} s wall: exit code {code} ({exitcodes.NAMES[code]})")
    return code


def _ci_mutant(args: argparse.Namespace) -> int:
    """CI step 4: one fast mutant of the catalogue, planted in a scratch copy, must be caught."""
    from chaos import mutate
    from chaos.mutants import FAST, StaleMutant, by_name

    mutant = by_name(FAST)
    print(f"# ci 4/4: the mutant {mutant.name} ({mutant.why}) must be caught within {args.mutant_cap:g} s", flush=True)
    try:
        result = mutate.run_mutant(mutant, time_cap_s=args.mutant_cap, jobs=args.jobs)
    except StaleMutant as exc:
        print(f"STALE MUTANT: {exc}", flush=True)
        return exitcodes.ERROR
    print(mutate.row(result), flush=True)
    if result.verdict != "caught":
        print(f"MUTANT NOT CAUGHT: {result.name} ({result.verdict}); replay with {result.replay}", flush=True)
        return exitcodes.ERROR
    return exitcodes.OK


def _cmd_nightly(args: argparse.Namespace) -> int:
    """``--total`` seeds (default 10,000) spread evenly over every scenario, a determinism sample, then mutation testing."""
    names = _scenarios(None)
    per = args.seeds if args.seeds else -(-args.total // len(names))
    print(f"# nightly: {len(names)} scenarios x seeds 1..{per} ({len(names) * per} runs), {args.jobs} job(s)", flush=True)
    summary = sweep(names, range(1, per + 1), jobs=args.jobs, artifacts_dir=Path(args.artifacts),
                    echo=lambda line: print(line, flush=True))
    print(summary.table())
    det_summary = sweep(names, range(per + 1, per + 1 + args.determinism_seeds), jobs=args.jobs,
                        artifacts_dir=Path(args.artifacts), check_determinism=True,
                        echo=lambda line: print(line, flush=True))
    print(det_summary.table())
    codes = [summary.exit_code, det_summary.exit_code]
    if not args.no_mutate:
        from chaos import mutate

        print(f"# nightly: mutation testing, the whole catalogue, {args.mutant_cap:g} s each", flush=True)
        print(mutate._HEADER, flush=True)
        results = mutate.mutate_all(echo=lambda line: print(line, flush=True), time_cap_s=args.mutant_cap, jobs=args.jobs)
        print(mutate.table(results, time_cap_s=args.mutant_cap))
        mutate.save(Path(args.artifacts) / "mutate.json", results)
        if any(r.verdict not in ("caught", "benign") for r in results):
            codes.append(exitcodes.ERROR)
    code = worst_exit_code(codes)
    print(f"# nightly exit code {code} ({exitcodes.NAMES[code]})")
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m chaos", description="Skulk's deterministic chaos harness.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an option (core.X for CoreConfig)")
        sp.add_argument("--canary", action="store_true", help="plant the double-master bug the checkers must catch")
        sp.add_argument("--artifacts", default=str(DEFAULT_ARTIFACTS), help="where failures write trace and timeline")

    sub.add_parser("list", help="list the scenarios").set_defaults(fn=_cmd_list)

    run = sub.add_parser("run", help="run one scenario with one seed")
    run.add_argument("scenario")
    run.add_argument("--seed", type=int, required=True)
    run.add_argument("--check-determinism", action="store_true", help="run twice (second in a fresh process) and compare")
    run.add_argument("--trace", action="store_true", help="write the trace and timeline even when the run passes")
    run.add_argument("--quiet", action="store_true", help="do not print the options")
    common(run)
    run.set_defaults(fn=_cmd_run)

    digest = sub.add_parser("digest", help="(internal) run a seed, print its trace digest as JSON")
    digest.add_argument("scenario")
    digest.add_argument("--seed", type=int, required=True)
    digest.add_argument("--hashes")
    digest.add_argument("--trace")
    common(digest)
    digest.set_defaults(fn=_cmd_digest)

    sw = sub.add_parser("sweep", help="run many seeds")
    sw.add_argument("--scenario", action="append", help="scenario (repeatable; default: all)")
    sw.add_argument("--seeds", type=int, required=True, help="how many seeds")
    sw.add_argument("--start", type=int, default=1, help="first seed")
    sw.add_argument("--jobs", type=int, default=1, help="worker processes")
    sw.add_argument("--check-determinism", action="store_true", help="rerun every seed in a fresh process and compare")
    common(sw)
    sw.set_defaults(fn=_cmd_sweep)

    rp = sub.add_parser("replay", help="re-run the seed a trace file was recorded from")
    rp.add_argument("trace")
    rp.add_argument("--quiet", action="store_true")
    rp.add_argument("--artifacts", default=str(DEFAULT_ARTIFACTS / "replay"))
    rp.set_defaults(fn=_cmd_replay)

    be = sub.add_parser("bench", help="simulator speed, seeds per minute, failover time")
    be.add_argument("--sim-seconds", type=float, default=3_600.0)
    be.add_argument("--seeds-per-scenario", type=int, default=3)
    be.add_argument("--failover-seeds", type=int, default=1_000)
    be.add_argument("--jobs", type=int, default=2)
    be.set_defaults(fn=_cmd_bench)

    sp = sub.add_parser("speed", help="seeds per minute of this tree against a git revision, side by side")
    sp.add_argument("--against", required=True, help="git revision to compare with (e.g. main)")
    sp.add_argument("--seeds", type=int, default=3, help="seeds per scenario")
    sp.add_argument("--start", type=int, default=1)
    sp.add_argument("--repeat", type=int, default=2, help="alternate the trees this many times; the best counts")
    sp.add_argument("--scenario", action="append", help="scenario (repeatable; default: all)")
    sp.set_defaults(fn=_cmd_speed)

    dg = sub.add_parser("digests", help="record the trace digests of many runs, or compare with a recording")
    dg.add_argument("--scenario", action="append", help="scenario (repeatable; default: all)")
    dg.add_argument("--seeds", type=int, help="how many seeds per scenario (when recording)")
    dg.add_argument("--start", type=int, default=1, help="first seed")
    dg.add_argument("--jobs", type=int, default=2, help="worker processes")
    dg.add_argument("--out", help="write the digests here (JSON: {scenario:seed: [digest, status]})")
    dg.add_argument("--compare", help="re-run the runs of this recording; exit 5 on any difference")
    dg.set_defaults(fn=_cmd_digests)

    mu = sub.add_parser("mutate", help="plant each mutant of the catalogue in a scratch copy; does the sweep catch it?")
    mu.add_argument("--mutant", action="append", help="mutant name (repeatable; default: the whole catalogue)")
    mu.add_argument("--time-cap", type=float, default=60.0, help="seconds of hunting per mutant")
    mu.add_argument("--jobs", type=int, default=2)
    mu.add_argument("--scenario", action="append", help="hunt with these scenarios only (default: all)")
    mu.add_argument("--seeds", type=int, default=1_000, help="seeds per scenario at most")
    mu.add_argument("--seed", type=int, help="replay one run: this seed of the one --scenario, with the mutant planted")
    mu.add_argument("--harness-from", help="take sim/ and chaos/ from this git revision (the checkers before a change)")
    mu.add_argument("--out", help="write the results as JSON")
    mu.add_argument("--list", action="store_true", help="list the catalogue")
    mu.set_defaults(fn=_cmd_mutate)

    ci = sub.add_parser("ci", help="the CI sample (about 5 minutes on 2 cores)")
    ci.add_argument("--seeds", type=int, default=10, help="seeds per scenario")
    ci.add_argument("--determinism-seeds", type=int, default=2, help="seeds per scenario rerun in a fresh process")
    ci.add_argument("--jobs", type=int, default=2)
    ci.add_argument("--artifacts", default=str(DEFAULT_ARTIFACTS))
    ci.add_argument("--mutant-cap", type=float, default=120.0, help="seconds the CI mutant may take to be caught")
    ci.set_defaults(fn=_cmd_ci)

    ni = sub.add_parser("nightly", help="10,000 seeds over every scenario, a determinism sample, the mutant catalogue")
    ni.add_argument("--total", type=int, default=10_000, help="seeds in all, spread evenly over the scenarios")
    ni.add_argument("--seeds", type=int, default=0, help="seeds per scenario instead of --total")
    ni.add_argument("--determinism-seeds", type=int, default=10)
    ni.add_argument("--jobs", type=int, default=2)
    ni.add_argument("--artifacts", default=str(DEFAULT_ARTIFACTS))
    ni.add_argument("--mutant-cap", type=float, default=60.0, help="seconds of hunting per mutant")
    ni.add_argument("--no-mutate", action="store_true", help="skip the mutation testing")
    ni.set_defaults(fn=_cmd_nightly)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except KeyError as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return exitcodes.USAGE
