"""The scenario registry: every module in this package registers its scenarios.

Theory of operation
-------------------
A scenario is a name, a one-line summary, an ``adjust`` function that narrows
the seed's options to what the scenario is about, and a ``script``: a simpy
generator that, given a ``Stage``, places models, starts clients and injects
faults. The harness (``chaos.harness``) wraps every script in the same
phases: boot and settle, the script, heal every fault, then the liveness
check. Safety is checked after every step throughout.

Adding a scenario is adding a module here::

    from chaos.scenarios import Stage, scenario

    @scenario("my_scenario", "what it proves, in one line")
    def my_scenario(stage: Stage):
        yield from stage.place_and_wait()
        ...

Modules are imported in name order by ``load_all``, so a new file is all it
takes (issue 3's scenarios slot in the same way).
"""

from __future__ import annotations

import importlib
import pkgutil
import random
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from chaos.stage import Stage
from sim.options import SimOptions

__all__ = ["Scenario", "SCENARIOS", "scenario", "load_all", "get", "Stage"]

Script = Callable[[Stage], Generator[Any, Any, None]]
Adjust = Callable[[SimOptions, random.Random], SimOptions]


def _keep(opts: SimOptions, rng: random.Random) -> SimOptions:
    return opts


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    script: Script
    adjust: Adjust = _keep
    # Seeds the nightly sweep runs for this scenario.
    nightly_seeds: int = 200


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, summary: str, *, adjust: Adjust | None = None, nightly_seeds: int = 200) -> Callable[[Script], Script]:
    """Register the decorated script as scenario ``name``."""

    def register(script: Script) -> Script:
        assert name not in SCENARIOS, f"scenario {name!r} registered twice"
        assert name.isidentifier(), f"scenario names are identifiers, got {name!r}"
        SCENARIOS[name] = Scenario(name, summary, script, adjust or _keep, nightly_seeds)
        return script

    return register


_loaded = False


def load_all() -> dict[str, Scenario]:
    """Import every scenario module of this package (once); returns the registry."""
    global _loaded
    if not _loaded:
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True
    return SCENARIOS


def get(name: str) -> Scenario:
    registry = load_all()
    if name not in registry:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]
