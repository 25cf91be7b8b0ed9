"""docs/simulator.md keeps up with the code: every option, fault kind and scenario is documented."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from chaos.scenarios import load_all
from sim.options import FAULT_KINDS, SimOptions

DOC = (Path(__file__).resolve().parents[2] / "docs" / "simulator.md").read_text(encoding="utf-8")


def test_every_option_is_in_the_options_table_with_its_unit() -> None:
    for f in dataclasses.fields(SimOptions):
        if f.name == "core":
            continue
        row = f"| `{f.name}` |"
        assert row in DOC, f"docs/simulator.md does not document option {f.name}"
        line = next(l for l in DOC.splitlines() if l.startswith(row))
        assert f"| {f.metadata['unit']} |" in line, f"{f.name}: the unit in the docs differs from the code"


def test_every_fault_kind_and_scenario_is_described() -> None:
    for kind in FAULT_KINDS:
        assert f"| `{kind}` |" in DOC, f"fault kind {kind} is not in the fault table"
    for name in load_all():
        assert f"`{name}`" in DOC, f"scenario {name} is not described"
