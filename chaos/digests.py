"""Trace digests of many runs, recorded to a file and compared against it later.

Theory of operation
-------------------
A run's trace digest (``sim.trace``) is a fingerprint of everything that
happened in it: every input every node handled, in order, with its time. A
refactor that claims "behaviour unchanged" can prove it: record the digests of
seeds 1..N of every scenario before the change, and compare after::

    python -m chaos digests --seeds 100 --out before.json
    ...change the code...
    python -m chaos digests --compare before.json

The file is one JSON object ``{"scenario:seed": [digest, status]}``. A
comparison re-runs exactly the runs the file names and lists every run whose
digest or status differs (or that the file lacks); any difference is exit
code 5 (``NONDETERMINISM``: the same seed no longer gives the same trace).

Invariants kept: a digest depends only on (scenario, seed); the file's keys
are sorted, so two recordings of the same runs are byte-identical.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from chaos.sweep import sweep

__all__ = ["Digests", "record", "compare", "load", "save", "run_key", "parse_key"]

Digests = dict[str, tuple[str, str]]
"""``"scenario:seed"`` -> (trace digest, status)."""


def run_key(scenario: str, seed: int) -> str:
    return f"{scenario}:{seed}"


def parse_key(key: str) -> tuple[str, int]:
    scenario, sep, seed = key.rpartition(":")
    if not sep or not scenario or not seed.isdigit():
        raise ValueError(f"not a run key (scenario:seed): {key!r}")
    return scenario, int(seed)


def record(
    runs: Iterable[tuple[str, int]], *, jobs: int = 2, echo: Callable[[str], None] = lambda line: None
) -> Digests:
    """Run every (scenario, seed) and return its digest and status, keyed by ``run_key``."""
    by_scenario: dict[str, list[int]] = {}
    for scenario, seed in runs:
        by_scenario.setdefault(scenario, []).append(seed)
    out: Digests = {}
    for scenario in sorted(by_scenario):
        seeds = sorted(set(by_scenario[scenario]))
        summary = sweep([scenario], seeds, jobs=jobs, echo=lambda line: None)
        for result in summary.results:
            out[run_key(result.scenario, result.seed)] = (result.digest, result.status)
        failed = sum(1 for r in summary.results if not r.ok)
        echo(f"{scenario}: {len(summary.results)} runs, {failed} not ok, {summary.wall_s:.0f} s wall")
    return out


def compare(expected: Mapping[str, tuple[str, str]], actual: Mapping[str, tuple[str, str]]) -> list[str]:
    """One line per run whose digest or status differs, or that only one side has; sorted."""
    lines = []
    for key in sorted(set(expected) | set(actual)):
        want, got = _show(expected.get(key)), _show(actual.get(key))
        if want != got:
            lines.append(f"{key}: recorded {want}, now {got}")
    return lines


def _show(entry: tuple[str, str] | None) -> str:
    return "(absent)" if entry is None else f"{entry[0][:16]} {entry[1]}"


def load(path: Path) -> Digests:
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of run -> [digest, status]")
    out: Digests = {}
    for key, value in raw.items():
        parse_key(key)
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{path}: {key}: expected [digest, status], got {value!r}")
        out[key] = (value[0], value[1])
    return out


def save(path: Path, digests: Mapping[str, tuple[str, str]]) -> None:
    body = {key: list(digests[key]) for key in sorted(digests)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=0, sort_keys=True), encoding="utf-8")
