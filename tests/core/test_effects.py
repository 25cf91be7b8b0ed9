"""Effects and their drivers: one table from effect type to driver method, every driver complete.

Adding an effect type is adding its record, its place in the ``Effect`` union
and an abstract ``carry_*`` method on ``EffectCarrier``; these tests fail for
every driver that cannot carry it out.
"""

from __future__ import annotations

from typing import get_args

import pytest

from sim.host import SimHost
from sim.manual import ManualCluster
from skulk.core.effects import EFFECT_METHODS, Effect, EffectCarrier, Log
from skulk.runtime.driver import Driver

DRIVERS = {"runtime": Driver, "simulator": SimHost, "manual cluster": type(ManualCluster(1).hosts["n1"])}


def test_every_effect_type_has_one_method_and_every_method_one_type() -> None:
    assert set(EFFECT_METHODS) == set(get_args(Effect))
    assert set(EFFECT_METHODS.values()) == set(EffectCarrier.__abstractmethods__)
    assert EFFECT_METHODS[Log] == "carry_log"


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_every_driver_carries_out_every_effect_type(name: str) -> None:
    driver = DRIVERS[name]
    assert issubclass(driver, EffectCarrier), f"the {name} driver does not dispatch through EFFECT_METHODS"
    assert not driver.__abstractmethods__, f"the {name} driver cannot carry out {sorted(driver.__abstractmethods__)}"


def test_a_driver_missing_a_method_cannot_be_built() -> None:
    class Incomplete(EffectCarrier):
        def carry_log(self, effect: Log) -> None:
            pass

    with pytest.raises(TypeError, match="carry_send"):
        Incomplete()  # type: ignore[abstract]


def test_carry_out_dispatches_each_effect_to_its_method_in_order() -> None:
    seen: list[str] = []

    def method(name: str):
        return lambda self, effect: seen.append(f"{name}:{type(effect).__name__}")

    Recorder = type("Recorder", (EffectCarrier,), {name: method(name) for name in EFFECT_METHODS.values()})
    Recorder().carry_out([Log(level="info", message="a"), Log(level="debug", message="b")])
    assert seen == ["carry_log:Log", "carry_log:Log"]
