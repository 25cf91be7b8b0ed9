"""Exit codes of ``python -m chaos``: one per failure class, so CI can tell them apart."""

from __future__ import annotations

__all__ = ["OK", "ERROR", "USAGE", "SAFETY", "LIVENESS", "NONDETERMINISM", "NAMES"]

OK = 0  # every run passed
ERROR = 1  # the harness itself failed (a bug in sim/ or chaos/, not in the core)
USAGE = 2  # bad command line (argparse's own code)
SAFETY = 3  # a safety invariant broke (DESIGN.md section 6), or an assertion in the core fired
LIVENESS = 4  # after faults healed, no master or no convergence within the bound
NONDETERMINISM = 5  # the same seed gave two different traces

NAMES = {OK: "ok", ERROR: "error", USAGE: "usage", SAFETY: "safety", LIVENESS: "liveness", NONDETERMINISM: "nondeterminism"}
