"""``skulk models``: which node holds which model files, what is moving, how much disk is left.

Reads one node's ``/state`` (the replicated ``modelCopies`` and ``nodeDisk``)
and prints, per node, its models disk and each copy: status, what it holds
(layers, or the whole model), where it came from, and for a transfer in
flight its bytes, rate and ETA; a failed copy with its reason.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

__all__ = ["summarise_copies", "cmd_models_status"]


def _bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _eta(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


def _holds(cov: dict[str, Any]) -> str:
    n = cov.get("nLayers", 0)
    runs = cov.get("layers", [])
    if not n or (not runs and not cov.get("head")):
        return "nothing verified yet"
    if cov.get("head") and runs == [[0, n]]:
        return "the whole model"
    text = ", ".join(f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in runs) or "no layer"
    return f"layers {text} of {n}" + (" and the head" if cov.get("head") else "")


def summarise_copies(state: dict[str, Any]) -> str:
    """A human summary of the model files in a ``/state`` document."""
    copies: dict[str, dict[str, Any]] = state.get("modelCopies", {})
    disks: dict[str, dict[str, Any]] = state.get("nodeDisk", {})
    names = state.get("nodeIdentities", {})
    nodes = sorted(set(copies) | set(disks))
    if not nodes:
        return "no node has reported model files yet"
    lines: list[str] = []
    for node in nodes:
        name = names.get(node, {}).get("friendlyName", node)
        disk = disks.get(node)
        if disk:
            budget = f", budget {_bytes(disk['budgetBytes'])}" if disk.get("budgetBytes") else ""
            lines.append(f"{node} ({name}): disk {_bytes(disk['freeBytes'])} free of {_bytes(disk['totalBytes'])}, "
                         f"models {_bytes(disk.get('modelsBytes', 0))}{budget}")
        else:
            lines.append(f"{node} ({name}): disk not reported")
        for model, c in sorted(copies.get(node, {}).items()):
            source = f" from {c['source']}" if c.get("source") else ""
            line = f"  {model}: {c['status']}{source}; {_holds(c.get('coverage', {}))}"
            if c["status"] in ("downloading", "requested") and c.get("totalBytes"):
                done, total = c.get("doneBytes", 0), c["totalBytes"]
                line += (f"; {_bytes(done)} of {_bytes(total)} ({100 * done / total:.0f} %), "
                         f"{_bytes(c.get('rateBps', 0))}/s, ETA {_eta(c.get('etaS'))}")
            elif c.get("bytes"):
                line += f"; {_bytes(c['bytes'])}"
            if c.get("error") and c["status"] == "failed":
                line += f"\n    error: {c['error']}"
            lines.append(line)
    return "\n".join(lines)


def cmd_models_status(args: argparse.Namespace) -> int:
    """Print the cluster's model files (``--watch``: again every ``--interval`` seconds)."""
    from skulk.runtime.localcluster import http_json

    url = args.url
    if not url:
        from skulk.runtime.config import load_config

        cfg = load_config(create=False)
        host = "127.0.0.1" if cfg.api_host in ("0.0.0.0", "::", "") else cfg.api_host
        url = f"http://{host}:{cfg.api_port}"
    url = url.rstrip("/")
    while True:
        try:
            state = http_json(url + "/state", timeout_s=args.timeout)
        except OSError as exc:
            print(f"skulk: no node answers at {url}: {exc}", file=sys.stderr)
            return 1
        if args.watch:
            print("\033[2J\033[H", end="")
        print(summarise_copies(state))
        if not args.watch:
            return 0
        time.sleep(args.interval)
