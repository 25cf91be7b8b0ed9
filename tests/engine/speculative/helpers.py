"""Builders shared by the speculation tests: prompts, speculators, and an engine that records its chunks."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec

from skulk.core.instances import SpeculationConfig
from skulk.core.tasks import Task, TokenChunk
from skulk.engine.batch import Engine, EngineConfig
from skulk.engine.speculative.engine import SpeculativeEngine, Speculator, build_speculator
from tests.engine.helpers import make_spec, make_task

PROMPTS = [
    "The quick brown fox",
    "What is the capital of France? The capital of France is",
    # Longer than one prefill chunk of the engines below.
    "Numbers like 0, 1, 2, 3 appear in code and in tables. " * 4,
]


def speculator(loaded: Any, dirs: tuple[Path, Path], drafter: str, depth: int) -> Speculator:
    config = SpeculationConfig(drafter=drafter, depth=depth, draft_model_id=str(dirs[1]))  # type: ignore[arg-type]
    spec = msgspec.structs.replace(make_spec(), speculation=config)
    built, reason = build_speculator(spec, loaded, dirs[0], None)
    assert built is not None, reason
    assert built.depth == depth and built.kind == drafter and built.placement == "local"
    return built


class Run:
    """One engine (plain or speculative) and what it emitted per task."""

    def __init__(self, loaded: Any, spec: Speculator | None = None, **config: Any) -> None:
        config.setdefault("context_ceiling", 4096)
        config.setdefault("prefill_step_tokens", 32)
        config.setdefault("prefill_chunk_tokens", 16)
        self.by_task: dict[str, list[TokenChunk]] = defaultdict(list)
        emit = lambda chunks: [self.by_task[c.task_id].append(c) for c in chunks]  # noqa: E731
        if spec is None:
            self.engine: Engine = Engine(loaded.shard, loaded.tokenizer, EngineConfig(**config), emit)
        else:
            self.engine = SpeculativeEngine(loaded.shard, loaded.tokenizer, EngineConfig(**config), emit, speculator=spec)

    def run(self, *tasks: Task, stagger: int = 0) -> list[list[TokenChunk]]:
        """Submit ``tasks`` (one every ``stagger`` steps when > 0) and drain."""
        for i, task in enumerate(tasks):
            self.engine.submit(task)
            for _ in range(stagger if i < len(tasks) - 1 else 0):
                self.engine.step()
        self.engine.drain()
        return [self.by_task[t.task_id] for t in tasks]


def greedy(prompt: str, max_tokens: int, **kw: Any) -> Task:
    return make_task(prompt=prompt, max_tokens=max_tokens, temperature=0.0, **kw)
