"""The asyncio driver: serialised inputs, timers, persistence, fatal core errors.

Driven with a real ``CoreNode`` and a real zenoh transport (a lone node on a
free loopback port); the disk is a temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest

from skulk.core.config import CoreConfig
from skulk.core.effects import NodeRecord
from skulk.core.ids import NodeId
from skulk.core.inputs import Boot, PersistFailed, TimerFired
from skulk.core.node import CoreNode
from skulk.modelcards import builtin_cards
from skulk.runtime.driver import Driver, load_node_record, write_node_record
from skulk.runtime.eventlog import EventLog
from skulk.runtime.logsetup import JsonFormatter, setup_logging
from skulk.runtime.supervisor import Supervisor
from skulk.runtime.transport import Transport, TransportSettings
from tests.support.cluster import free_port_block


async def _lone_node(tmp_path: Path, node: str = "solo", record: NodeRecord | None = None,
                     fatal=None) -> tuple[Driver, Transport]:
    port = free_port_block(1, ["127.0.0.1"])
    core = CoreNode(NodeId(node), CoreConfig(campaign_timeout_s=0.3, heartbeat_interval_s=0.5),
                    cards=builtin_cards(), record=record)
    holder: dict[str, Driver] = {}
    transport = Transport(
        TransportSettings(node_id=node, namespace="drv", secret=b"k" * 32, listen=(f"tcp/127.0.0.1:{port}",),
                          connect=(), multicast=False, lease_ms=1000, api_port=0, incarnation="x"),
        on_message=lambda s, m: None, on_peers=lambda p: None,
    )
    log = EventLog(tmp_path / "eventlog", on_failure=lambda e: holder["d"].on_log_failure(e), min_free_bytes=0)
    sup = Supervisor(feed=lambda i: holder["d"].feed(i), models_dir=tmp_path / "models", work_dir=tmp_path / "r",
                     env={})
    driver = Driver(core, transport=transport, supervisor=sup, eventlog=log,
                    record_path=tmp_path / "node.msgpack", fatal=fatal)
    holder["d"] = driver
    await transport.start()
    return driver, transport


def test_a_lone_node_elects_itself_persists_its_clock_and_logs_its_session(tmp_path: Path) -> None:
    async def main() -> None:
        driver, transport = await _lone_node(tmp_path)
        try:
            driver.feed(Boot())
            assert "election.campaign" in driver.pending_timers
            deadline = time.monotonic() + 5
            while not driver.core.is_master:
                assert time.monotonic() < deadline, "no mastership"
                await asyncio.sleep(0.02)
            assert driver.master_session_started_at is not None
            assert driver.inputs["TimerFired"] >= 1 and driver.effects["AppendLog"] >= 1
        finally:
            driver.cancel_timers()
            await transport.close()
            driver.eventlog.close()  # type: ignore[attr-defined]
        record = load_node_record(tmp_path / "node.msgpack", "solo")
        assert record is not None and record.election_clock >= 1
        assert load_node_record(tmp_path / "node.msgpack", "someone-else") is None

    asyncio.run(main())


def test_a_restarted_node_never_goes_back_in_election_time(tmp_path: Path) -> None:
    write_node_record(tmp_path / "node.msgpack", NodeRecord(node_id=NodeId("solo"), election_clock=41))

    async def main() -> None:
        record = load_node_record(tmp_path / "node.msgpack", "solo")
        driver, transport = await _lone_node(tmp_path, record=record)
        try:
            driver.feed(Boot())
            deadline = time.monotonic() + 5
            while not driver.core.is_master:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert driver.core.session is not None and driver.core.session.clock == 42
        finally:
            driver.cancel_timers()
            await transport.close()

    asyncio.run(main())


def test_timers_replace_by_key_cancel_and_fire_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        driver, transport = await _lone_node(tmp_path)
        fired: list[str] = []
        try:
            real = driver.feed

            def spy(inp):  # records the timer inputs the driver feeds (the core still gets them)
                if isinstance(inp, TimerFired):
                    fired.append(inp.key)
                real(inp)

            driver.feed = spy  # type: ignore[method-assign]
            now = time.time()
            driver._set_timer("a", now + 0.2)
            driver._set_timer("a", now + 0.05)  # replaces the first
            driver._set_timer("b", now + 0.1)
            driver._set_timer("c", now + 0.15)
            driver._timers.pop("c").cancel()
            await asyncio.sleep(0.4)
            assert fired == ["a", "b"]
            assert driver.pending_timers == []
        finally:
            await transport.close()

    asyncio.run(main())


def test_inputs_fed_while_effects_run_are_queued_not_reentrant(tmp_path: Path, caplog) -> None:
    async def main() -> None:
        driver, transport = await _lone_node(tmp_path)
        try:
            # A node record that cannot be written: the failure is fed back as
            # PersistFailed *after* the current input, and the core logs it once.
            (tmp_path / "node.msgpack").mkdir()
            with caplog.at_level(logging.CRITICAL, logger="skulk.core"):
                driver.feed(Boot())
                deadline = time.monotonic() + 5
                while driver.inputs["PersistFailed"] < 1:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                driver.feed(PersistFailed(what="node record", error="again"))
            assert driver.persist_failures >= 1
            critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
            assert len(critical) == 1 and "node record" in critical[0]
        finally:
            driver.cancel_timers()
            await transport.close()

    asyncio.run(main())


def test_a_core_assertion_is_fatal_and_stops_feeding(tmp_path: Path) -> None:
    async def main() -> None:
        errors: list[BaseException] = []
        driver, transport = await _lone_node(tmp_path, fatal=errors.append)
        try:
            driver.feed(Boot())
            driver.feed(Boot())  # the core asserts: "Boot twice"
            assert len(errors) == 1 and isinstance(errors[0], AssertionError)
            count = sum(driver.inputs.values())
            driver.feed(TimerFired(key="election.campaign"))
            assert sum(driver.inputs.values()) == count, "nothing reaches a core that broke an invariant"
        finally:
            driver.cancel_timers()
            await transport.close()

    asyncio.run(main())


def test_monotone_wall_clock(tmp_path: Path) -> None:
    async def main() -> None:
        driver, transport = await _lone_node(tmp_path)
        try:
            driver._last_now = time.time() + 100  # as if the system clock stepped back by 100 s
            assert driver.now() >= driver._last_now
            assert abs(driver.now() - time.time()) > 50
        finally:
            await transport.close()

    asyncio.run(main())


def test_json_logs_for_shippers(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging(node_id="n-9", external=True, level="INFO")
    try:
        logging.getLogger("skulk.test").warning("disk %s", "full", extra={"free_bytes": 12})
        line = capsys.readouterr().out.strip().splitlines()[-1]
        doc = json.loads(line)
        assert doc["level"] == "warning" and doc["msg"] == "disk full" and doc["node_id"] == "n-9"
        assert doc["logger"] == "skulk.test" and doc["free_bytes"] == 12 and doc["ts"] > 0
        setup_logging(node_id="n-9", external=False, level="DEBUG")
        logging.getLogger("skulk.test").info("hello")
        err = capsys.readouterr().err
        assert "INFO" in err and "[n-9] skulk.test: hello" in err
        assert isinstance(JsonFormatter("x").format(logging.makeLogRecord({"msg": "m"})), str)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
