"""Cluster authentication: keys derived from a cluster secret, sealed envelopes.

Theory of operation
-------------------
Every message a node puts on the network travels in an *envelope*::

    msgpack([VERSION, namespace, sender, topic, destination,
             boot, seq, sent_ms, payload, mac])

``mac`` is HMAC-SHA256, keyed with a key derived from the cluster secret by
HKDF-SHA256 (RFC 5869; salt ``skulk-cluster-v1``, info ``control-plane/`` +
namespace), over every other field, length-prefixed. ``boot`` is a random
63-bit number a sender draws when its transport starts, ``seq`` counts the
envelopes it sealed since, and ``sent_ms`` is its wall clock in milliseconds.
A node without the secret cannot produce a valid mac,
so it cannot join (membership needs an authenticated message), vote or inject
events. Binding the namespace into both the key and the mac means a message
sealed for another cluster never verifies here, even with the same secret.

``open_envelope`` never raises on hostile input: it returns a ``Rejected``
naming the reason (``malformed``, ``foreign_namespace``, ``bad_mac``) so the
transport can count drops per reason.

Replays. A captured authentic envelope verifies when sent again, so the
receiver's ``ReplayGuard`` also checks, after the mac: ``sent_ms`` within
``window_s`` of its own clock (else ``stale``: an old capture, or clocks out
of sync), and ``(sender, boot, seq)`` not seen before (else ``replayed``),
with a sliding window of the last ``width`` sequence numbers per sender boot
(envelopes on different zenoh keys may arrive out of order; one more than
``width`` behind the newest is dropped as ``replayed`` too, which the core's
retries absorb). Windows idle for longer than twice ``window_s`` are forgotten:
anything they would catch is stale by then. Left open: a receiver that
restarts has no windows, so a message captured less than ``window_s`` ago
can be delivered to it once more; the core deduplicates events, local events
and chunks by index and sequence, and a command by its id for as long as the
master remembers its result.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

__all__ = [
    "KEY_FILENAME",
    "VERSION",
    "Envelope",
    "derive_transfer_key",
    "Rejected",
    "ReplayGuard",
    "Sealer",
    "Stamp",
    "derive_key",
    "load_or_create_secret",
    "open_envelope",
    "parse_secret",
    "seal",
]

VERSION = 2
KEY_FILENAME = "cluster.key"
_SALT = b"skulk-cluster-v1"
_MAC_BYTES = 32
_MAX_ENVELOPE_FIELD = 1 << 16  # namespace, sender, topic, destination: short strings


def _hkdf_sha256(secret: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF with SHA-256 (extract, then expand to ``length`` bytes)."""
    assert 0 < length <= 255 * 32
    prk = hmac.new(salt, secret, hashlib.sha256).digest()
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def derive_key(secret: bytes, namespace: str) -> bytes:
    """The control-plane MAC key of ``namespace`` for cluster secret ``secret``."""
    assert secret, "an empty cluster secret authenticates nothing"
    assert namespace, "a namespace is required"
    return _hkdf_sha256(secret, _SALT, b"control-plane/" + namespace.encode("utf-8"))


def derive_transfer_key(secret: bytes, namespace: str) -> bytes:
    """The key that signs node-to-node file-transfer requests (``skulk.runtime.transfer``).

    A separate HKDF purpose, so a file-transfer signature can never pass as a
    control-plane MAC or the other way round.
    """
    assert secret and namespace
    return _hkdf_sha256(secret, _SALT, b"file-transfer/" + namespace.encode("utf-8"))


def parse_secret(text: str) -> bytes:
    """Cluster secret bytes from the operator's text (hex when it is hex, else UTF-8)."""
    text = text.strip()
    if not text:
        raise ValueError("the cluster key is empty")
    try:
        raw = bytes.fromhex(text)
        if len(raw) >= 16:
            return raw
    except ValueError:
        pass
    if len(text) < 16:
        raise ValueError("the cluster key is too short: use at least 16 characters (32 hex digits recommended)")
    return text.encode("utf-8")


def load_or_create_secret(data_dir: Path) -> tuple[bytes, str, bool]:
    """The cluster secret stored under ``data_dir``, created on first start.

    Returns ``(secret, hex_text, created)``. The file holds 32 random bytes as
    hex and is created with mode 0600 (atomically: written to a temporary file
    and renamed, so two nodes starting at once agree on one key).
    """
    path = data_dir / KEY_FILENAME
    if path.is_file():
        text = path.read_text().strip()
        return parse_secret(text), text, False
    data_dir.mkdir(parents=True, exist_ok=True)
    text = secrets.token_hex(32)
    tmp = path.with_name(f".{KEY_FILENAME}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (text + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created the key first
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    text = path.read_text().strip()
    return parse_secret(text), text, True


@dataclass(frozen=True, slots=True)
class Envelope:
    """A verified message: who sent it, on which topic, to whom (None: everyone)."""

    namespace: str
    sender: str
    topic: str
    destination: str | None
    payload: bytes
    stamp: Stamp


@dataclass(frozen=True, slots=True)
class Stamp:
    """Where an envelope sits in its sender's stream: boot, sequence number, send time."""

    boot: int
    seq: int
    sent_ms: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why an envelope was dropped.

    ``malformed``, ``foreign_namespace`` or ``bad_mac`` from ``open_envelope``;
    ``stale`` or ``replayed`` from a ``ReplayGuard``.
    """

    reason: str
    detail: str = ""


_LEN = struct.Struct(">I")
_STAMP = struct.Struct(">QQq")
_MAX_U63 = (1 << 63) - 1


def _mac_input(namespace: str, sender: str, topic: str, destination: str | None, stamp: Stamp, payload: bytes) -> bytes:
    parts = [namespace.encode(), sender.encode(), topic.encode(), (destination or "").encode(),
             _STAMP.pack(stamp.boot, stamp.seq, stamp.sent_ms), payload]
    return b"".join(_LEN.pack(len(p)) + p for p in parts)


def seal(key: bytes, namespace: str, sender: str, topic: str, destination: str | None, payload: bytes,
         stamp: Stamp) -> bytes:
    """The wire bytes of an authenticated envelope."""
    mac = hmac.new(key, _mac_input(namespace, sender, topic, destination, stamp, payload), hashlib.sha256).digest()
    return msgspec.msgpack.encode(
        [VERSION, namespace, sender, topic, destination or "", stamp.boot, stamp.seq, stamp.sent_ms, payload, mac]
    )


def open_envelope(key: bytes, namespace: str, raw: bytes) -> Envelope | Rejected:
    """Verify ``raw``; an ``Envelope`` when authentic and ours, else a ``Rejected``.

    Authentic is not fresh: pass the envelope through a ``ReplayGuard`` too.
    """
    try:
        items = msgspec.msgpack.decode(raw)
    except msgspec.DecodeError as exc:
        return Rejected("malformed", f"not msgpack: {exc}")
    if not isinstance(items, list) or len(items) != 10 or items[0] != VERSION:
        return Rejected("malformed", f"not a version-{VERSION} envelope")
    _, ns, sender, topic, dest, boot, seq, sent_ms, payload, mac = items
    if not all(isinstance(x, str) and len(x) < _MAX_ENVELOPE_FIELD for x in (ns, sender, topic, dest)):
        return Rejected("malformed", "bad header field")
    if not all(type(x) is int and 0 <= x <= _MAX_U63 for x in (boot, seq, sent_ms)):
        return Rejected("malformed", "bad stamp")
    if not isinstance(payload, bytes) or not isinstance(mac, bytes) or len(mac) != _MAC_BYTES:
        return Rejected("malformed", "bad payload or mac")
    if ns != namespace:
        return Rejected("foreign_namespace", f"namespace {ns!r}")
    stamp = Stamp(boot=boot, seq=seq, sent_ms=sent_ms)
    expected = hmac.new(key, _mac_input(ns, sender, topic, dest or None, stamp, payload), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, mac):
        return Rejected("bad_mac", f"sender {sender!r}")
    return Envelope(namespace=ns, sender=sender, topic=topic, destination=dest or None, payload=payload, stamp=stamp)


def _wall_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Sealer:
    """One transport's sending side: its key, identity, boot number and sequence counter.

    ``seal`` may be called from any thread (the counter is ``itertools.count``,
    whose ``next`` is atomic in CPython).
    """

    key: bytes
    namespace: str
    sender: str
    boot: int = field(default_factory=lambda: secrets.randbits(63))
    clock_ms: Callable[[], int] = _wall_ms
    _seq: Iterator[int] = field(default_factory=itertools.count, repr=False)

    def stamp(self) -> Stamp:
        return Stamp(boot=self.boot, seq=next(self._seq), sent_ms=max(0, self.clock_ms()))

    def seal(self, topic: str, destination: str | None, payload: bytes) -> bytes:
        return seal(self.key, self.namespace, self.sender, topic, destination, payload, self.stamp())


class _Window:
    __slots__ = ("top", "seen", "last_ms")

    def __init__(self, seq: int, now_ms: int) -> None:
        self.top = seq
        self.seen = {seq}
        self.last_ms = now_ms


class ReplayGuard:
    """Drops stale and replayed envelopes (see the module notes). Thread-safe.

    ``window_s`` <= 0 turns the guard off (for hosts whose clocks cannot be
    kept in sync); ``width`` is how many sequence numbers per sender boot it
    remembers.
    """

    def __init__(self, window_s: float, *, width: int = 4096, clock_ms: Callable[[], int] = _wall_ms) -> None:
        assert width > 0
        self.window_ms = int(window_s * 1000)
        self.width = width
        self._clock_ms = clock_ms
        self._windows: dict[tuple[str, int], _Window] = {}
        self._lock = threading.Lock()
        self._next_prune_ms = 0

    @property
    def enabled(self) -> bool:
        return self.window_ms > 0

    def __len__(self) -> int:
        return len(self._windows)

    def check(self, envelope: Envelope) -> Rejected | None:
        """None when ``envelope`` is fresh (and remember it), else why it is not."""
        if not self.enabled:
            return None
        stamp = envelope.stamp
        now = self._clock_ms()
        skew = stamp.sent_ms - now
        if abs(skew) > self.window_ms:
            return Rejected("stale", f"sender {envelope.sender!r} clock is {skew / 1000:+.1f} s from ours")
        key = (envelope.sender, stamp.boot)
        with self._lock:
            if now >= self._next_prune_ms:
                self._prune(now)
            window = self._windows.get(key)
            if window is None:
                self._windows[key] = _Window(stamp.seq, now)
                return None
            window.last_ms = now
            if stamp.seq > window.top:
                window.top = stamp.seq
                window.seen.add(stamp.seq)
                if len(window.seen) > 2 * self.width:
                    floor = window.top - self.width
                    window.seen = {s for s in window.seen if s > floor}
                return None
            if stamp.seq <= window.top - self.width or stamp.seq in window.seen:
                return Rejected("replayed", f"sender {envelope.sender!r} seq {stamp.seq} (newest {window.top})")
            window.seen.add(stamp.seq)
            return None

    def _prune(self, now: int) -> None:
        # A sender clock up to window ahead keeps its envelopes fresh until
        # window after their send time: twice the window covers both.
        cutoff = now - 2 * self.window_ms
        for key in [k for k, w in self._windows.items() if w.last_ms < cutoff]:
            del self._windows[key]
        self._next_prune_ms = now + max(1000, self.window_ms // 4)
