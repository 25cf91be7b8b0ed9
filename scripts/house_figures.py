#!/usr/bin/env python3
"""Figures of the house at a git revision: modules over 500 lines and the largest functions.

    python scripts/house_figures.py [REV ...]      # default: HEAD

Reads the tree of each revision with ``git show`` (no checkout), so two
revisions are measured side by side from one working tree. Counts physical
lines of ``skulk/``, ``sim/``, ``chaos/`` and ``loadtests/`` Python files;
a function's size is its line span (decorators to last line).
"""

from __future__ import annotations

import ast
import subprocess
import sys

ROOTS = ("skulk/", "sim/", "chaos/", "loadtests/")


def _files(rev: str) -> list[str]:
    out = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev], capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if p.endswith(".py") and p.startswith(ROOTS)]


def _read(rev: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout


def figures(rev: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    big, funcs = [], []
    for path in _files(rev):
        text = _read(rev, path)
        lines = text.count("\n")
        if lines > 500:
            big.append((lines, path))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                funcs.append((node.end_lineno - start + 1, f"{path}:{node.name}"))
    return sorted(big, reverse=True), sorted(funcs, reverse=True)


def main(argv: list[str]) -> int:
    for rev in argv or ["HEAD"]:
        big, funcs = figures(rev)
        print(f"== {rev}")
        print(f"modules over 500 lines ({len(big)}):")
        for n, path in big:
            print(f"  {n:5d}  {path}")
        core = [f for f in funcs if f[1].startswith("skulk/core/")]
        print("largest functions in skulk/core:")
        for n, name in core[:8]:
            print(f"  {n:5d}  {name}")
        print("largest functions overall:")
        for n, name in funcs[:8]:
            print(f"  {n:5d}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
