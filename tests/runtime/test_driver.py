"""The asyncio driver: serialised inputs, timers, persistence, fatal core errors.

Driven with a real ``CoreNode`` and a real zenoh transport (a lone node on a
free loopback port); the disk is a temporary directory. Time is a
``ManualClock`` the tests advance by hand, so no test waits on the wall clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from skulk.cards import builtin_cards
from skulk.core.config import CoreConfig
from skulk.core.effects import CancelTimer, NodeRecord, SetTimer
from skulk.core.ids import NodeId
from skulk.core.inputs import Boot, PersistFailed, TimerFired
from skulk.core.node import CoreNode
from skulk.runtime.clock import ManualClock
from skulk.runtime.driver import Driver, load_node_record, write_node_record
from skulk.runtime.eventlog import EventLog
from skulk.runtime.logsetup import JsonFormatter, setup_logging
from skulk.runtime.supervisor import Supervisor
from skulk.runtime.transport import Transport, TransportSettings
from tests.support.cluster import free_port_block


async def _lone_node(tmp_path: Path, node: str = "solo", record: NodeRecord | None = None,
                     fatal=None, clock: ManualClock | None = None) -> tuple[Driver, Transport]:
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
                    record_path=tmp_path / "node.msgpack", fatal=fatal, clock=clock or ManualClock())
    holder["d"] = driver
    await transport.start()
    return driver, transport


def test_a_lone_node_elects_itself_persists_its_clock_and_logs_its_session(tmp_path: Path) -> None:
    async def main() -> None:
        clock = ManualClock()
        driver, transport = await _lone_node(tmp_path, clock=clock)
        try:
            driver.feed(Boot())
            assert "election.campaign" in driver.pending_timers
            assert not driver.core.is_master
            clock.advance(0.3)  # the campaign timeout: alone, it wins
            assert driver.core.is_master, "no mastership"
            assert driver.master_session_started_at == clock.now()
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
        clock = ManualClock()
        driver, transport = await _lone_node(tmp_path, record=record, clock=clock)
        try:
            driver.feed(Boot())
            clock.advance(0.3)
            assert driver.core.is_master
            assert driver.core.session is not None and driver.core.session.clock == 42
        finally:
            driver.cancel_timers()
            await transport.close()

    asyncio.run(main())


def test_timers_replace_by_key_cancel_and_fire_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        clock = ManualClock()
        driver, transport = await _lone_node(tmp_path, clock=clock)
        fired: list[tuple[str, float]] = []
        try:
            real = driver.feed

            def spy(inp):  # records the timer inputs the driver feeds (the core still gets them)
                if isinstance(inp, TimerFired):
                    fired.append((inp.key, clock.now()))
                real(inp)

            driver.feed = spy  # type: ignore[method-assign]
            now = clock.now()
            driver.carry_out([
                SetTimer(key="a", at=now + 0.2),
                SetTimer(key="a", at=now + 0.05),  # replaces the first
                SetTimer(key="b", at=now + 0.1),
                SetTimer(key="c", at=now + 0.15),
                CancelTimer(key="c"),
            ])
            assert driver.pending_timers == ["a", "b"]
            clock.advance(0.04)
            assert fired == [], "nothing fires before its time"
            clock.advance(0.36)
            assert fired == [("a", now + 0.05), ("b", now + 0.1)]
            assert driver.pending_timers == [] and clock.pending == 0
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
                driver.feed(Boot())  # persists the campaign clock: the write fails
                assert driver.inputs == {"Boot": 1, "PersistFailed": 1}, "handled after Boot, in the same drain"
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


def test_an_indexed_event_is_on_disk_before_any_message_leaves_the_node(tmp_path: Path) -> None:
    """Write-ahead of sends. Regression pin: a master killed (kill -9) after sending
    event 127 but before its end-of-batch flush left followers applying an event
    its disk log never held; the failover-under-load trace then showed invariant 2
    violated (a follower ahead of its master). Every send now reads, from the
    file on disk, every event appended before it."""
    from skulk.runtime.eventlog import Entry, iter_segments, read_segment

    async def main() -> None:
        clock = ManualClock()
        driver, transport = await _lone_node(tmp_path, clock=clock)
        appended: list[int] = []
        checked: list[tuple[int, int]] = []
        real_send, real_append = transport.send, driver.carry_append_log

        def on_disk() -> int:
            indices = [r.indexed.index for seg in iter_segments(tmp_path / "eventlog")
                       for r in read_segment(seg).records if isinstance(r, Entry)]
            return max(indices, default=-1)

        def append(effect) -> None:  # type: ignore[no-untyped-def]
            real_append(effect)
            appended.append(effect.indexed.index)

        def send(message, to=None) -> None:  # type: ignore[no-untyped-def]
            if appended:
                checked.append((max(appended), on_disk()))
            real_send(message, to)

        transport.send = send  # type: ignore[method-assign]
        driver.carry_append_log = append  # type: ignore[method-assign]
        driver._carry = driver.effect_table()
        try:
            driver.feed(Boot())
            clock.advance(0.3)  # wins alone: indexes its session's first events and announces them
            assert driver.core.is_master
            clock.advance(1.0)  # heartbeats and telemetry: more events, more sends
        finally:
            driver.cancel_timers()
            await transport.close()
            driver.eventlog.close()  # type: ignore[attr-defined]
        assert checked, "no message left the node after an append: the test proves nothing"
        behind = [(sent, disk) for sent, disk in checked if disk < sent]
        assert not behind, f"messages left while appended events were only buffered: {behind[:5]}"

    asyncio.run(main())
