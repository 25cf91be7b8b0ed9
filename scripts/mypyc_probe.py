#!/usr/bin/env python3
"""How much faster does the simulator run with its hot modules compiled by mypyc? A measurement, not a build.

    scripts/mypyc_probe.py                          # both configurations, seeds 1-3 of every scenario, best of 2
    scripts/mypyc_probe.py --config core --seeds 5 --repeat 3

Theory of operation
-------------------
Skulk does not build or ship compiled modules (``docs/simulator.md``
section 11 says why); this script measures what compiling would buy, so the
figure there can be re-measured. For each configuration it:

1. installs the pinned, hash-checked mypy of ``scripts/mypyc-probe-tools.txt``
   into ``.tools-mypyc/`` on first use (apart from ``.venv``: Skulk never
   imports it);
2. copies ``skulk``, ``sim`` and ``chaos`` of the working tree to a scratch
   directory (the working tree is never written);
3. silences, in the copy only, every line mypy reports while checking the
   modules to compile and what they import (``# type: ignore``), because
   mypyc refuses code that does not type-check; the count is printed;
4. compiles those modules in place in the copy, so the compiled extension
   sits beside its source and is what Python imports;
5. runs ``chaos.speed``'s child in the working tree and in the copy,
   alternately: every run must pass, and the least CPU of the repeats counts.
   It then prints seeds per CPU-minute and the ratio.

The configurations:

- ``core``: the 13 modules of ``skulk/core`` that mypyc can compile. The
  other 24 define msgspec ``Struct`` records, whose class keywords
  (``frozen=True``) mypyc drops, or the timers, whose dataclass inheritance
  it breaks; they stay interpreted.
- ``core+sim``: the same, plus the simulator's and the checkers' hot modules.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "scripts"))

from chaos import speed  # noqa: E402
from lockfile import pinned_tool  # noqa: E402

TOOLS_REQ = ROOT / "scripts" / "mypyc-probe-tools.txt"
TOOLS_DIR = ROOT / ".tools-mypyc"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

CORE = tuple(f"skulk/core/{m}.py" for m in (
    "codec", "context", "ids", "ingest", "keeper", "master", "master_policy", "node", "outbox", "replica",
    "reporter", "requests", "worker",
))
SIM = tuple(f"sim/{m}.py" for m in ("network", "host", "world", "trace", "clients", "runners")) + tuple(
    f"chaos/{m}.py" for m in ("checkers", "efficiency", "oracles")
)
CONFIGS = {"core": CORE, "core+sim": CORE + SIM}

_ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: ")
_IGNORE = re.compile(r"\s*# type: ignore\S*.*$")


def tools() -> Path:
    """The bin directory of the pinned mypy, installed from scripts/mypyc-probe-tools.txt on first use."""
    return pinned_tool(TOOLS_REQ, TOOLS_DIR, "mypyc", "probe").parent


def silence(tree: Path, mypy_output: str) -> int:
    """Mark each line of ``tree`` mypy reported with ``# type: ignore`` (widening a narrow one); return how many."""
    lines_by_file: dict[str, set[int]] = {}
    for line in mypy_output.splitlines():
        m = _ERROR.match(line)
        if m and (tree / m["path"]).is_file():
            lines_by_file.setdefault(m["path"], set()).add(int(m["line"]))
    for rel, numbers in lines_by_file.items():
        path = tree / rel
        text = path.read_text(encoding="utf-8").split("\n")
        for n in numbers:
            text[n - 1] = _IGNORE.sub("", text[n - 1]) + "  # type: ignore"
        path.write_text("\n".join(text), encoding="utf-8")
    return sum(len(v) for v in lines_by_file.values())


def build(bindir: Path, tree: Path, modules: Sequence[str]) -> None:
    """Silence what mypy reports in ``modules`` of the copy ``tree``, then compile them in place."""
    env = dict(os.environ, MYPY_CACHE_DIR=str(tree / ".mypy_cache"))
    check = [str(bindir / "mypy"), "--python-executable", str(VENV_PYTHON), *modules]
    silenced = 0
    for _ in range(3):  # an ignore can uncover an error behind it; it settles in a pass or two
        done = subprocess.run(check, cwd=tree, env=env, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            break
        n = silence(tree, done.stdout)
        if n == 0:
            raise SystemExit(f"mypy fails on what this script cannot silence:\n{done.stdout[-3000:]}")
        silenced += n
    else:
        raise SystemExit("mypy still reports errors after three passes of silencing")
    print(f"[probe] {silenced} line(s) silenced for mypy in the copy; compiling {len(modules)} modules", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run([str(bindir / "mypyc"), "--python-executable", str(VENV_PYTHON), *modules],
                          cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"mypyc failed:\n{(done.stdout + done.stderr)[-3000:]}")
    print(f"[probe] compiled in {time.perf_counter() - t0:.0f} s", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), action="append",
                   help="what to compile (repeatable; default: both)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per scenario (default 3)")
    p.add_argument("--start", type=int, default=1, help="first seed")
    p.add_argument("--repeat", type=int, default=2, help="children per tree; the least CPU counts (default 2)")
    p.add_argument("--scenario", action="append", help="scenario (repeatable; default: all)")
    args = p.parse_args(argv)
    bindir = tools()
    for name in args.config or ["core", "core+sim"]:
        tmp = Path(tempfile.mkdtemp(prefix="skulk-mypyc-"))
        try:
            for pkg in ("skulk", "sim", "chaos"):
                shutil.copytree(ROOT / pkg, tmp / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
            build(bindir, tmp, CONFIGS[name])
            print(f"# {name}: the working tree (before) against the compiled copy (after), seeds "
                  f"{args.start}..{args.start + args.seeds - 1}, best of {args.repeat}", flush=True)
            before, after = speed.side_by_side(ROOT, tmp, seeds=args.seeds, start=args.start, repeat=args.repeat,
                                               scenarios=args.scenario)
            speed.table(before, after, "interpreted", print)
        except speed.RunFailed as exc:
            print(f"[probe] {name}: no figure: {exc}", file=sys.stderr)
            return 1
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
