"""Cluster authentication: keys derived from a cluster secret, sealed envelopes.

Theory of operation
-------------------
Every message a node puts on the network travels in an *envelope*::

    msgpack([VERSION, namespace, sender, topic, destination, payload, mac])

``mac`` is HMAC-SHA256, keyed with a key derived from the cluster secret by
HKDF-SHA256 (RFC 5869; salt ``skulk-cluster-v1``, info ``control-plane/`` +
namespace), over the length-prefixed fields ``namespace, sender, topic,
destination, payload``. A node without the secret cannot produce a valid mac,
so it cannot join (membership needs an authenticated message), vote or inject
events. Binding the namespace into both the key and the mac means a message
sealed for another cluster never verifies here, even with the same secret.

``open_envelope`` never raises on hostile input: it returns a ``Rejected``
naming the reason (``malformed``, ``foreign_namespace``, ``bad_mac``) so the
transport can count drops per reason.

Not covered: replay of a captured authentic message. Replays are harmless to
the protocol (indices, origin indices and command ids are deduplicated by the
core) but are not rejected here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import msgspec

__all__ = [
    "VERSION",
    "KEY_FILENAME",
    "derive_key",
    "load_or_create_secret",
    "parse_secret",
    "Envelope",
    "Rejected",
    "seal",
    "open_envelope",
]

VERSION = 1
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


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why an envelope was dropped: ``malformed``, ``foreign_namespace`` or ``bad_mac``."""

    reason: str
    detail: str = ""


_LEN = struct.Struct(">I")


def _mac_input(namespace: str, sender: str, topic: str, destination: str | None, payload: bytes) -> bytes:
    parts = [namespace.encode(), sender.encode(), topic.encode(), (destination or "").encode(), payload]
    return b"".join(_LEN.pack(len(p)) + p for p in parts)


def seal(key: bytes, namespace: str, sender: str, topic: str, destination: str | None, payload: bytes) -> bytes:
    """The wire bytes of an authenticated envelope."""
    mac = hmac.new(key, _mac_input(namespace, sender, topic, destination, payload), hashlib.sha256).digest()
    return msgspec.msgpack.encode([VERSION, namespace, sender, topic, destination or "", payload, mac])


def open_envelope(key: bytes, namespace: str, raw: bytes) -> Envelope | Rejected:
    """Verify ``raw``; an ``Envelope`` when authentic and ours, else a ``Rejected``."""
    try:
        items = msgspec.msgpack.decode(raw)
    except msgspec.DecodeError as exc:
        return Rejected("malformed", f"not msgpack: {exc}")
    if not isinstance(items, list) or len(items) != 7 or items[0] != VERSION:
        return Rejected("malformed", "not a version-1 envelope")
    _, ns, sender, topic, dest, payload, mac = items
    if not all(isinstance(x, str) and len(x) < _MAX_ENVELOPE_FIELD for x in (ns, sender, topic, dest)):
        return Rejected("malformed", "bad header field")
    if not isinstance(payload, bytes) or not isinstance(mac, bytes) or len(mac) != _MAC_BYTES:
        return Rejected("malformed", "bad payload or mac")
    if ns != namespace:
        return Rejected("foreign_namespace", f"namespace {ns!r}")
    expected = hmac.new(key, _mac_input(ns, sender, topic, dest or None, payload), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, mac):
        return Rejected("bad_mac", f"sender {sender!r}")
    return Envelope(namespace=ns, sender=sender, topic=topic, destination=dest or None, payload=payload)
