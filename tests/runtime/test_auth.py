"""Cluster authentication (DESIGN.md section 4: "a foreign process cannot join or inject events")."""

from __future__ import annotations

import msgspec
import pytest

from skulk.runtime import auth

STAMP = auth.Stamp(boot=7, seq=0, sent_ms=1_000)


def test_hkdf_matches_rfc5869_test_case_1() -> None:
    okm = auth._hkdf_sha256(
        bytes.fromhex("0b" * 22), bytes.fromhex("000102030405060708090a0b0c"), bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"), 42
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_keys_differ_per_secret_and_per_namespace() -> None:
    k = auth.derive_key(b"s" * 32, "prod")
    assert len(k) == 32
    assert k == auth.derive_key(b"s" * 32, "prod")
    assert k != auth.derive_key(b"t" * 32, "prod")
    assert k != auth.derive_key(b"s" * 32, "lab")


def test_a_sealed_envelope_opens_with_the_same_key_and_namespace() -> None:
    key = auth.derive_key(b"k" * 32, "ns")
    raw = auth.seal(key, "ns", "node-a", "commands", None, b"payload", STAMP)
    env = auth.open_envelope(key, "ns", raw)
    assert isinstance(env, auth.Envelope)
    assert (env.sender, env.topic, env.destination, env.payload) == ("node-a", "commands", None, b"payload")
    directed = auth.open_envelope(key, "ns", auth.seal(key, "ns", "node-a", "data", "node-b", b"x", STAMP))
    assert isinstance(directed, auth.Envelope) and directed.destination == "node-b"


def test_a_wrong_key_is_rejected_as_bad_mac() -> None:
    ours = auth.derive_key(b"k" * 32, "ns")
    theirs = auth.derive_key(b"x" * 32, "ns")
    got = auth.open_envelope(ours, "ns", auth.seal(theirs, "ns", "intruder", "commands", None, b"p", STAMP))
    assert isinstance(got, auth.Rejected) and got.reason == "bad_mac"


def test_another_namespace_is_rejected_even_with_the_same_secret() -> None:
    other = auth.derive_key(b"k" * 32, "other")
    got = auth.open_envelope(auth.derive_key(b"k" * 32, "ns"), "ns", auth.seal(other, "other", "n", "commands", None, b"", STAMP))
    assert isinstance(got, auth.Rejected) and got.reason == "foreign_namespace"


@pytest.mark.parametrize("field", [2, 3, 4, 5, 6, 7, 8])
def test_tampering_with_any_covered_field_breaks_the_mac(field: int) -> None:
    key = auth.derive_key(b"k" * 32, "ns")
    items = msgspec.msgpack.decode(auth.seal(key, "ns", "node-a", "commands", "node-b", b"payload", STAMP))
    value = items[field]
    items[field] = b"tampered" if isinstance(value, bytes) else value + 1 if isinstance(value, int) else value + "x"
    got = auth.open_envelope(key, "ns", msgspec.msgpack.encode(items))
    assert isinstance(got, auth.Rejected) and got.reason == "bad_mac"


@pytest.mark.parametrize("raw", [b"", b"\xff\x00garbage", msgspec.msgpack.encode([9, "ns"]),
                                 msgspec.msgpack.encode([auth.VERSION, "ns", "a", "t", "", 1, 2, 3, "not-bytes", b"m" * 32]),
                                 msgspec.msgpack.encode([auth.VERSION, "ns", "a", "t", "", -1, 2, 3, b"p", b"m" * 32]),
                                 msgspec.msgpack.encode([1, "ns", "a", "t", "", b"old v1", b"m" * 32]),
                                 msgspec.msgpack.encode({"a": 1})])
def test_malformed_input_is_rejected_never_raised(raw: bytes) -> None:
    got = auth.open_envelope(auth.derive_key(b"k" * 32, "ns"), "ns", raw)
    assert isinstance(got, auth.Rejected) and got.reason == "malformed"


def test_the_secret_is_created_once_with_private_permissions(tmp_path) -> None:
    secret, text, created = auth.load_or_create_secret(tmp_path)
    assert created and len(secret) == 32 and text == secret.hex()
    assert (tmp_path / auth.KEY_FILENAME).stat().st_mode & 0o777 == 0o600
    again, text2, created2 = auth.load_or_create_secret(tmp_path)
    assert (again, text2, created2) == (secret, text, False)


def test_operator_secrets_are_hex_or_long_text() -> None:
    assert auth.parse_secret("00" * 16) == bytes(16)
    assert auth.parse_secret("a long passphrase here") == b"a long passphrase here"
    with pytest.raises(ValueError, match="too short"):
        auth.parse_secret("short")
    with pytest.raises(ValueError, match="empty"):
        auth.parse_secret("  ")


# --- replay guard ---------------------------------------------------------------------------------


class Clock:
    def __init__(self, ms: int = 10_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def _env(seq: int, sent_ms: int, *, sender: str = "a", boot: int = 1) -> auth.Envelope:
    return auth.Envelope(namespace="ns", sender=sender, topic="t", destination=None, payload=b"",
                         stamp=auth.Stamp(boot=boot, seq=seq, sent_ms=sent_ms))


def _verdict(guard: auth.ReplayGuard, env: auth.Envelope) -> str:
    got = guard.check(env)
    return "ok" if got is None else got.reason


def test_the_guard_drops_an_envelope_seen_before_and_keeps_reordered_ones() -> None:
    clock = Clock()
    guard = auth.ReplayGuard(300, width=16, clock_ms=clock)
    now = clock.ms
    # zenoh orders per key only: 3 arriving before 2 is normal and both are fresh.
    assert [_verdict(guard, _env(s, now)) for s in (0, 1, 3, 2)] == ["ok"] * 4
    assert [_verdict(guard, _env(s, now)) for s in (0, 3, 2)] == ["replayed"] * 3
    # Far behind the newest (more than the window's width): cannot tell, so dropped.
    assert _verdict(guard, _env(40, now)) == "ok"
    assert _verdict(guard, _env(20, now)) == "replayed"
    assert _verdict(guard, _env(30, now)) == "ok"
    # Another boot of the same sender, or another sender, has its own window.
    assert _verdict(guard, _env(0, now, boot=2)) == "ok"
    assert _verdict(guard, _env(0, now, sender="b")) == "ok"


def test_the_guard_drops_stale_envelopes_either_side_of_its_clock() -> None:
    clock = Clock()
    guard = auth.ReplayGuard(300, clock_ms=clock)
    assert _verdict(guard, _env(0, clock.ms - 299_000)) == "ok"
    assert _verdict(guard, _env(1, clock.ms + 299_000)) == "ok"
    old = guard.check(_env(2, clock.ms - 301_000))
    assert old is not None and old.reason == "stale" and "-301.0 s" in old.detail
    assert _verdict(guard, _env(3, clock.ms + 301_000)) == "stale"


def test_the_guard_forgets_idle_windows_once_their_envelopes_are_stale() -> None:
    clock = Clock()
    guard = auth.ReplayGuard(10, width=4, clock_ms=clock)
    for i in range(2_000):
        assert guard.check(_env(i, clock.ms, sender=f"n{i % 3}", boot=i // 3)) is None
    assert len(guard) == 2_000
    captured = _env(5, clock.ms)
    clock.ms += 21_000  # more than twice the window later
    assert guard.check(_env(0, clock.ms, sender="fresh")) is None
    assert len(guard) == 1, "idle windows are pruned"
    assert _verdict(guard, captured) == "stale", "what a pruned window would have caught is stale"
    # Long runs keep the per-window memory bounded.
    for i in range(10_000):
        guard.check(_env(i, clock.ms, sender="busy"))
    assert max(len(w.seen) for w in guard._windows.values()) <= 2 * guard.width


def test_a_guard_with_a_zero_window_is_off() -> None:
    guard = auth.ReplayGuard(0)
    assert not guard.enabled
    assert guard.check(_env(0, 0)) is None and guard.check(_env(0, 0)) is None


def test_a_sealer_stamps_a_counter_under_one_random_boot() -> None:
    key = auth.derive_key(b"k" * 32, "ns")
    one, two = auth.Sealer(key, "ns", "a"), auth.Sealer(key, "ns", "a")
    assert one.boot != two.boot
    stamps = []
    for _ in range(3):
        env = auth.open_envelope(key, "ns", one.seal("t", None, b"x"))
        assert isinstance(env, auth.Envelope)
        stamps.append(env.stamp)
    assert [s.seq for s in stamps] == [0, 1, 2] and {s.boot for s in stamps} == {one.boot}
    guard = auth.ReplayGuard(300)
    raw = one.seal("t", None, b"x")
    env = auth.open_envelope(key, "ns", raw)
    assert isinstance(env, auth.Envelope)
    assert guard.check(env) is None
    again = auth.open_envelope(key, "ns", raw)
    assert isinstance(again, auth.Envelope) and _verdict(guard, again) == "replayed"
