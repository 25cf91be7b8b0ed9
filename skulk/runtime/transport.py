"""The cluster transport: eclipse-zenoh in peer mode, authenticated.

Theory of operation
-------------------
Key expressions (``<ns>`` is the cluster namespace, ``<topic>`` from
``skulk.core.messages.topic_of``)::

    skulk/<ns>/<topic>           a message for every peer
    skulk/<ns>/<topic>/<node>    a message for one node (directed sends)
    skulk/<ns>/hello[/<node>]    transport hellos (api port, for probes)
    skulk/<ns>/alive/<node>      liveliness token (membership)

Each node subscribes to ``skulk/<ns>/*`` and ``skulk/<ns>/*/<self>``. Every
payload is a sealed envelope (``skulk.runtime.auth``); envelopes that fail
verification, carry another namespace, or do not decode to a message of the
envelope's topic are dropped and counted in ``drops`` by reason, never
delivered; so are authentic envelopes that are stale or seen before
(``auth.ReplayGuard``, ``replay_window_s``). A node's own broadcasts are not delivered back (the core loops
its own messages back itself).

Membership: a peer is a member while its liveliness token is present *and*
an authenticated message from it has been received since the token appeared.
A token alone (anyone can declare one) never makes a member. To make the
second condition quick, a node broadcasts a hello when it starts, answers a
new peer's hello directly, and repeats its hello every second while some live
token is still unauthenticated. ``on_peers`` is called with the member set
whenever it changes. A ``kill -9``'d peer's token disappears when its TCP
link closes (tens of ms); a silent partition when the zenoh lease expires
(``lease_ms``, short by default).

zenoh delivers samples on its own threads: verification and decoding happen
there, and the result hops to the asyncio loop with ``call_soon_threadsafe``.
Callbacks into the node (``on_message``, ``on_peers``) run on the loop only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zenoh

from skulk.core.codec import WireError, decode_msgpack, encode_msgpack
from skulk.core.ids import NodeId
from skulk.core.messages import ChunkMessage, Message, topic_of
from skulk.runtime import auth

__all__ = ["Transport", "TransportSettings", "PeerInfo", "Hello", "key_prefix"]

log = logging.getLogger("skulk.transport")

HELLO_TOPIC = "hello"
_HELLO_REPEAT_S = 1.0


class Hello(msgspec.Struct, frozen=True, kw_only=True):
    """Transport-level greeting: what a peer needs to probe this node's links."""

    node_id: str
    api_port: int
    incarnation: str


@dataclass(frozen=True)
class PeerInfo:
    node_id: str
    api_port: int
    incarnation: str


@dataclass(frozen=True)
class TransportSettings:
    node_id: str
    namespace: str
    secret: bytes
    listen: tuple[str, ...]
    connect: tuple[str, ...]
    multicast: bool
    lease_ms: int
    api_port: int
    incarnation: str
    # Envelopes sent longer ago than this (by the sender's clock) are dropped
    # as stale, and younger ones are dropped when seen before; 0: no replay guard.
    replay_window_s: float = 300.0


def key_prefix(namespace: str) -> str:
    return f"skulk/{namespace}"


# zenoh reads its link receivers on a tokio runtime of 2 worker threads (ZRuntime::RX), and its TCP
# links set SO_LINGER to 10 s (zenoh-link-tcp, TCP_LINGER_TIMEOUT, fixed when zenoh is compiled). When
# a peer's host is lost (its links down, nothing closes or resets), the lease expires after lease_ms
# and zenoh closes the links to it on RX workers; on Linux, close() of a lingering socket whose FIN is
# never acknowledged blocks its thread, non-blocking socket or not, until the linger time is up. Each
# survivor had two such links, so both RX workers sat in the kernel (sk_stream_wait_close) for up to
# 10 s and no other link was read: the survivors stopped hearing each other, a split brain.
# With more workers the others keep reading. Measured with three plain zenoh 1.10.2 peers
# (python -m loadtests.zenoh_peer_loss, 5 trials each): deaf 5 of 5 with zenoh's 2 workers,
# 0 of 5 with 3 or 8 (not one half second without the other's messages); docs/operations.md.
# 8 covers three hosts lost within the same 10 s (two blocked workers each).
# zenoh reads ZENOH_RUNTIME once, when the process first opens a session; one set by the operator wins.
ZENOH_RUNTIME = "(rx: (worker_threads: 8))"


def zenoh_config(settings: TransportSettings) -> zenoh.Config:
    """The zenoh session configuration for ``settings`` (peer mode).

    Also gives zenoh's runtime its reader threads (``ZENOH_RUNTIME``, process-wide;
    only if the environment does not set it already): call it before the
    process's first ``zenoh.open``.
    """
    if "ZENOH_RUNTIME" not in os.environ:
        os.environ["ZENOH_RUNTIME"] = ZENOH_RUNTIME
    cfg = zenoh.Config()
    cfg.insert_json5("mode", '"peer"')
    cfg.insert_json5("listen/endpoints", json.dumps(list(settings.listen)))
    cfg.insert_json5("connect/endpoints", json.dumps(list(settings.connect)))
    cfg.insert_json5("scouting/multicast/enabled", "true" if settings.multicast else "false")
    cfg.insert_json5("scouting/gossip/enabled", "true")
    cfg.insert_json5("transport/link/tx/lease", str(int(settings.lease_ms)))
    cfg.insert_json5("transport/link/tx/keep_alive", "4")
    return cfg


class Transport:
    """One node's zenoh session. Create, ``await start()``, ``send``, ``await close()``."""

    def __init__(
        self,
        settings: TransportSettings,
        *,
        on_message: Callable[[NodeId, Message], None],
        on_peers: Callable[[frozenset[NodeId]], None],
    ) -> None:
        assert settings.secret, "the transport needs a cluster secret"
        self.settings = settings
        self.node_id = settings.node_id
        key = auth.derive_key(settings.secret, settings.namespace)
        self._key = key
        self._sealer = auth.Sealer(key, settings.namespace, settings.node_id)
        self.replay_guard = auth.ReplayGuard(settings.replay_window_s)
        self._stale_senders: set[str] = set()
        self._prefix = key_prefix(settings.namespace)
        self._on_message = on_message
        self._on_peers = on_peers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: zenoh.Session | None = None
        self._declared: list[object] = []
        self._publishers: dict[str, zenoh.Publisher] = {}
        self._alive: set[str] = set()
        self._authenticated: set[str] = set()
        self._members: frozenset[NodeId] = frozenset()
        self.peer_info: dict[str, PeerInfo] = {}
        self.drops: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self._hello_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """The key expressions this node takes messages from: every broadcast, and what is addressed to it."""
        return (f"{self._prefix}/*", f"{self._prefix}/*/{self.node_id}")

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the zenoh session, subscribe, declare the liveliness token, say hello."""
        self._loop = asyncio.get_running_loop()
        self._session = await asyncio.to_thread(zenoh.open, zenoh_config(self.settings))
        s = self._session
        p = self._prefix
        for key in self.subscriptions:
            self._declared.append(s.declare_subscriber(key, self._on_sample))
        self._declared.append(
            s.liveliness().declare_subscriber(f"{p}/alive/*", self._on_liveliness, history=True)
        )
        self._declared.append(s.liveliness().declare_token(f"{p}/alive/{self.node_id}"))
        self._send_hello(None)
        self._hello_task = asyncio.create_task(self._hello_loop(), name="transport-hello")
        log.info(
            "transport up: namespace %s, listen %s, connect %s, multicast %s, lease %d ms",
            self.settings.namespace,
            ",".join(self.settings.listen),
            ",".join(self.settings.connect) or "-",
            "on" if self.settings.multicast else "off",
            self.settings.lease_ms,
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._hello_task is not None:
            self._hello_task.cancel()
        session, self._session = self._session, None
        if session is not None:
            await asyncio.to_thread(session.close)

    @property
    def members(self) -> frozenset[NodeId]:
        return self._members

    # --- sending ---------------------------------------------------------------------

    def send(self, message: Message, to: NodeId | None) -> None:
        """Seal and put ``message`` on its topic (``to`` None: every peer)."""
        topic = topic_of(message)
        self._put(topic, to, encode_msgpack(message), data=isinstance(message, ChunkMessage))

    def _put(self, topic: str, to: str | None, payload: bytes, *, data: bool = False) -> None:
        session = self._session
        if session is None:
            return
        key = f"{self._prefix}/{topic}" + (f"/{to}" if to else "")
        raw = self._sealer.seal(topic, to, payload)
        pub = self._publishers.get(key)
        if pub is None:
            pub = session.declare_publisher(
                key,
                # Tokens must not be lost (a stream has no retransmission); control
                # messages may be (the core retries and NACKs), and a slow peer
                # must not stall the node's loop for them.
                congestion_control=zenoh.CongestionControl.BLOCK if data else zenoh.CongestionControl.DROP,
                priority=zenoh.Priority.DATA if data else zenoh.Priority.INTERACTIVE_HIGH,
            )
            self._publishers[key] = pub
        try:
            pub.put(raw)
            self.sent[topic] += 1
        except zenoh.ZError as exc:
            self.drops["send_error"] += 1
            log.warning("put on %s failed: %s", key, exc)

    def _send_hello(self, to: str | None) -> None:
        hello = Hello(node_id=self.node_id, api_port=self.settings.api_port, incarnation=self.settings.incarnation)
        self._put(HELLO_TOPIC, to, msgspec.msgpack.encode(hello))

    async def _hello_loop(self) -> None:
        while True:
            await asyncio.sleep(_HELLO_REPEAT_S)
            if self._alive - self._authenticated:
                self._send_hello(None)

    # --- receiving (zenoh threads) ---------------------------------------------------

    def _on_sample(self, sample: zenoh.Sample) -> None:
        try:
            raw = sample.payload.to_bytes()
            result = auth.open_envelope(self._key, self.settings.namespace, raw)
            if isinstance(result, auth.Rejected):
                self._drop(result.reason)
                return
            if result.sender == self.node_id:
                return  # our own broadcast
            if result.destination is not None and result.destination != self.node_id:
                self._drop("misdirected")
                return
            replay = self.replay_guard.check(result)
            if replay is not None:
                if replay.reason == "stale" and result.sender not in self._stale_senders:
                    self._stale_senders.add(result.sender)
                    log.warning("dropping stale messages: %s (limit %g s; clocks out of sync? see SKULK_REPLAY_WINDOW_S)",
                                replay.detail, self.settings.replay_window_s)
                self._drop(replay.reason)
                return
            if result.topic == HELLO_TOPIC:
                hello = msgspec.msgpack.decode(result.payload, type=Hello)
                if hello.node_id != result.sender:
                    self._drop("malformed")
                    return
                self._call(self._on_hello, hello)
                return
            message = decode_msgpack(Message, result.payload)
            if topic_of(message) != result.topic:
                self._drop("wrong_topic")
                return
            self._call(self._deliver, NodeId(result.sender), message)
        except (WireError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._drop("malformed")
            log.debug("undecodable message: %s", exc)
        except Exception:  # a transport thread must never die
            self._drop("internal_error")
            log.exception("error handling a zenoh sample")

    def _on_liveliness(self, sample: zenoh.Sample) -> None:
        try:
            node = str(sample.key_expr).rsplit("/", 1)[-1]
            alive = sample.kind == zenoh.SampleKind.PUT
            self._call(self._on_token, node, alive)
        except Exception:
            log.exception("error handling a liveliness sample")

    def _drop(self, reason: str) -> None:
        # Counter updates from zenoh threads: hop to the loop so counts are not torn.
        self._call(self._count_drop, reason)

    def _count_drop(self, reason: str) -> None:
        self.drops[reason] += 1
        if self.drops[reason] in (1, 100, 10_000):
            log.warning("dropped %d message(s) so far: %s", self.drops[reason], reason)

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or self._closed:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is shutting down

    # --- receiving (loop) ------------------------------------------------------------

    def _deliver(self, sender: NodeId, message: Message) -> None:
        self.received[topic_of(message)] += 1
        self._authenticate(sender)
        self._on_message(sender, message)

    def _on_hello(self, hello: Hello) -> None:
        self.received[HELLO_TOPIC] += 1
        known = self.peer_info.get(hello.node_id)
        self.peer_info[hello.node_id] = PeerInfo(hello.node_id, hello.api_port, hello.incarnation)
        if hello.node_id not in self._authenticated or known is None or known.incarnation != hello.incarnation:
            self._send_hello(hello.node_id)  # let the newcomer authenticate us at once
        self._authenticate(hello.node_id)

    def _authenticate(self, node: str) -> None:
        if node in self._authenticated:
            return
        self._authenticated.add(node)
        self._update_members()

    def _on_token(self, node: str, alive: bool) -> None:
        if node == self.node_id:
            return
        if alive:
            self._alive.add(node)
            if node not in self._authenticated:
                self._send_hello(None)
        else:
            self._alive.discard(node)
            # A returning peer must authenticate again (it may be someone else now).
            self._authenticated.discard(node)
            self.peer_info.pop(node, None)
        self._update_members()

    def _update_members(self) -> None:
        members = frozenset(NodeId(n) for n in self._alive & self._authenticated)
        if members != self._members:
            self._members = members
            log.info("members: %s", ", ".join(sorted(members)) or "(none)")
            self._on_peers(members)
