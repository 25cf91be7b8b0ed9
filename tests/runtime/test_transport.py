"""The zenoh transport: membership needs the key, drops are counted, never applied.

Real zenoh sessions on loopback, in this process (each with its own endpoint,
scouting off). Tests wait for conditions (``_until``), never for a fixed time:
"nothing arrived" is shown by a counter that proves the thing was handled
(dropped), or by the key routing that makes it impossible.
"""

from __future__ import annotations

import asyncio
import os
import time

import zenoh

from skulk.core.codec import encode_msgpack
from skulk.core.commands import PlaceInstance
from skulk.core.ids import CommandId, ModelId, NodeId
from skulk.core.messages import CommandMessage, ElectionMessage, Message
from skulk.runtime import auth
from skulk.runtime.transport import Transport, TransportSettings, key_prefix
from tests.support.cluster import free_port_block, zenoh_spy

SECRET = b"s" * 32


class Peer:
    def __init__(self, node: str, port: int, connect: tuple[str, ...], *, secret: bytes = SECRET,
                 namespace: str = "tns") -> None:
        self.messages: list[tuple[NodeId, Message]] = []
        self.peer_sets: list[frozenset[NodeId]] = []
        self.transport = Transport(
            TransportSettings(node_id=node, namespace=namespace, secret=secret,
                              listen=(f"tcp/127.0.0.1:{port}",), connect=connect, multicast=False,
                              lease_ms=1000, api_port=40000 + port % 1000, incarnation="i"),
            on_message=lambda s, m: self.messages.append((s, m)),
            on_peers=self.peer_sets.append,
        )


async def _until(pred, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _sees_alive(session: zenoh.Session, prefix: str, node: str) -> bool:
    """The bare ``session`` sees ``node``'s liveliness token: zenoh has routes between them."""
    replies = session.liveliness().get(f"{prefix}/alive/{node}", timeout=1.0)
    return any(r.ok is not None for r in replies)


def _ports(n: int) -> list[int]:
    base = free_port_block(n, ["127.0.0.1"])
    return [base + i for i in range(n)]


def test_keyed_peers_become_members_and_exchange_messages() -> None:
    async def main() -> None:
        pa, pb, pc = _ports(3)
        a = Peer("a", pa, ())
        b = Peer("b", pb, (f"tcp/127.0.0.1:{pa}",))
        c = Peer("c", pc, (f"tcp/127.0.0.1:{pa}", f"tcp/127.0.0.1:{pb}"))
        for p in (a, b, c):
            await p.transport.start()
        try:
            await _until(lambda: all(len(p.transport.members) == 2 for p in (a, b, c)))
            assert a.transport.members == {"b", "c"}
            assert a.transport.peer_info["b"].api_port == 40000 + pb % 1000
            b.transport.send(ElectionMessage(clock=7, campaigning=True, votes=()), None)
            b.transport.send(ElectionMessage(clock=8, campaigning=True, votes=()), NodeId("c"))
            await _until(lambda: len(c.messages) == 2 and len(a.messages) == 1)
            # A directed message goes on the destination's own key, which no other
            # node subscribes to: it cannot reach a, however long one waits.
            prefix = key_prefix("tns")
            directed = zenoh.KeyExpr(f"{prefix}/election/c")
            assert not any(zenoh.KeyExpr(k).intersects(directed) for k in a.transport.subscriptions)
            assert any(zenoh.KeyExpr(k).intersects(directed) for k in c.transport.subscriptions)
            assert [m.clock for _, m in a.messages] == [7], "a directed message reaches its destination only"
            # zenoh orders samples per key only: a broadcast and a directed send
            # travel on different keys, so either may arrive first.
            assert sorted((s, m.clock) for s, m in c.messages) == [("b", 7), ("b", 8)]
            # On one key (one publisher), order is kept: the chunk streams rely on it.
            for clock in range(10, 20):
                b.transport.send(ElectionMessage(clock=clock, campaigning=False, votes=()), NodeId("c"))
            await _until(lambda: len(c.messages) == 12)
            assert [m.clock for _, m in c.messages[2:]] == list(range(10, 20))
            assert b.messages == [], "a node's own broadcast is not delivered back"
            assert [m.clock for _, m in a.messages] == [7], "still nothing meant for c at a"
            # A peer that leaves is no longer a member, within about a second.
            await c.transport.close()
            await _until(lambda: a.transport.members == {"b"}, timeout_s=3.0)
        finally:
            for p in (a, b, c):
                await p.transport.close()

    asyncio.run(main())


def test_a_peer_without_the_key_never_becomes_a_member_and_cannot_inject() -> None:
    async def main() -> None:
        pa, pi = _ports(2)
        a = Peer("a", pa, ())
        intruder = Peer("intruder", pi, (f"tcp/127.0.0.1:{pa}",), secret=b"w" * 32)
        await a.transport.start()
        await intruder.transport.start()
        try:
            # The intruder's liveliness token is visible, its hellos arrive: still no member.
            await _until(lambda: "intruder" in a.transport._alive)
            for i in range(5):
                intruder.transport.send(ElectionMessage(clock=10**9 + i, campaigning=True, votes=()), None)
                intruder.transport.send(
                    CommandMessage(origin=NodeId("intruder"),
                                   command=PlaceInstance(command_id=CommandId(f"x{i}"), model_id=ModelId("m"))),
                    NodeId("a"),
                )
            await _until(lambda: a.transport.drops["bad_mac"] >= 10)
            # The intruder repeats its hello every second (it sees a live peer that
            # is not a member): wait until two more were rejected.
            await _until(lambda: a.transport.drops["bad_mac"] >= 12, timeout_s=10.0)
            assert a.messages == [], "nothing from a keyless node is delivered"
            assert a.transport.members == frozenset() and a.peer_sets in ([], [frozenset()])
            assert "intruder" not in a.transport.peer_info
            # The intruder cannot read us either: our messages fail its check.
            assert intruder.transport.members == frozenset()
            assert intruder.transport.drops["bad_mac"] >= 1
        finally:
            await intruder.transport.close()
            await a.transport.close()

    asyncio.run(main())


def test_foreign_namespace_and_garbage_are_dropped_and_counted() -> None:
    async def main() -> None:
        (pa,) = _ports(1)
        a = Peer("a", pa, ())
        await a.transport.start()
        raw_session = zenoh_spy([f"tcp/127.0.0.1:{pa}"])
        try:
            prefix = key_prefix("tns")
            await _until(lambda: _sees_alive(raw_session, prefix, "a"))  # the route to a is up
            # Sealed for another namespace with the very same secret, put into ours.
            other = auth.Sealer(auth.derive_key(SECRET, "other"), "other", "x")
            raw_session.put(f"{prefix}/election", other.seal("election", None, b"\x80"))
            raw_session.put(f"{prefix}/election", b"garbage")
            # Authentic, but the payload is not a message of the topic it claims.
            x = auth.Sealer(auth.derive_key(SECRET, "tns"), "tns", "x")
            msg = ElectionMessage(clock=1, campaigning=True, votes=())
            raw_session.put(f"{prefix}/commands", x.seal("commands", None, encode_msgpack(msg)))
            # Authentic, but meant for another node.
            raw_session.put(f"{prefix}/election/a", x.seal("election", "zz", encode_msgpack(msg)))
            await _until(lambda: sum(a.transport.drops.values()) >= 4)
            assert a.transport.drops["foreign_namespace"] == 1
            assert a.transport.drops["malformed"] == 1
            assert a.transport.drops["wrong_topic"] == 1
            assert a.transport.drops["misdirected"] == 1
            assert a.messages == []
        finally:
            raw_session.close()
            await a.transport.close()

    asyncio.run(main())


def test_captured_messages_replayed_are_dropped_and_stale_ones_too() -> None:
    """An eavesdropper without the key records real traffic and puts it back: nothing is delivered twice."""

    async def main() -> None:
        pa, pb = _ports(2)
        a = Peer("a", pa, ())
        b = Peer("b", pb, (f"tcp/127.0.0.1:{pa}",))
        for p in (a, b):
            await p.transport.start()
        spy = zenoh_spy([f"tcp/127.0.0.1:{pa}"])
        captured: list[tuple[str, bytes]] = []
        prefix = key_prefix("tns")
        sub = spy.declare_subscriber(f"{prefix}/**", lambda smp: captured.append((str(smp.key_expr),
                                                                                   smp.payload.to_bytes())))
        try:
            await _until(lambda: a.transport.members == {"b"} and b.transport.members == {"a"})
            await _until(lambda: _sees_alive(spy, prefix, "b"))  # the spy's routes are up
            for clock in range(1, 6):
                b.transport.send(ElectionMessage(clock=clock, campaigning=False, votes=()), None)
            await _until(lambda: len(a.messages) == 5 and sum(k == f"{prefix}/election" for k, _ in captured) >= 5)
            replays = [(k, raw) for k, raw in captured if k.startswith(f"{prefix}/election")]
            for k, raw in replays:
                spy.put(k, raw)
            await _until(lambda: a.transport.drops["replayed"] >= len(replays))
            # A capture older than the window (here: sealed with a clock 10 minutes behind).
            old = auth.Sealer(auth.derive_key(SECRET, "tns"), "tns", "b", clock_ms=lambda: int(time.time() * 1000) - 600_000)
            spy.put(f"{prefix}/election", old.seal("election", None, encode_msgpack(
                ElectionMessage(clock=99, campaigning=False, votes=()))))
            await _until(lambda: a.transport.drops["stale"] == 1)
            # Every replay was counted as dropped (each sample ends in exactly one
            # counter or one delivery), so none was delivered.
            assert a.transport.drops["replayed"] == len(replays)
            assert [m.clock for _, m in a.messages] == [1, 2, 3, 4, 5], "each message delivered once"
            assert a.transport.members == {"b"}
        finally:
            sub.undeclare()
            spy.close()
            for p in (a, b):
                await p.transport.close()

    asyncio.run(main())


def test_zenoh_config_gives_zenoh_its_reader_threads_unless_the_operator_chose(monkeypatch) -> None:
    # zenoh reads ZENOH_RUNTIME when the process first opens a session: the configuration sets it
    # (a lost host's lingering links each block one of zenoh's RX threads; docs/operations.md).
    from skulk.runtime.transport import ZENOH_RUNTIME, zenoh_config

    settings = TransportSettings(node_id="n", namespace="tns", secret=SECRET, listen=(), connect=(),
                                 multicast=False, lease_ms=1000, api_port=0, incarnation="i")
    monkeypatch.delenv("ZENOH_RUNTIME", raising=False)
    zenoh_config(settings)
    assert ZENOH_RUNTIME == "(rx: (worker_threads: 8))"
    assert os.environ["ZENOH_RUNTIME"] == ZENOH_RUNTIME
    monkeypatch.setenv("ZENOH_RUNTIME", "(rx: (worker_threads: 3))")
    zenoh_config(settings)
    assert os.environ["ZENOH_RUNTIME"] == "(rx: (worker_threads: 3))"
