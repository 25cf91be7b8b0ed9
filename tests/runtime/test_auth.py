"""Cluster authentication (DESIGN.md section 4: "a foreign process cannot join or inject events")."""

from __future__ import annotations

import msgspec
import pytest

from skulk.runtime import auth


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
    raw = auth.seal(key, "ns", "node-a", "commands", None, b"payload")
    env = auth.open_envelope(key, "ns", raw)
    assert isinstance(env, auth.Envelope)
    assert (env.sender, env.topic, env.destination, env.payload) == ("node-a", "commands", None, b"payload")
    directed = auth.open_envelope(key, "ns", auth.seal(key, "ns", "node-a", "data", "node-b", b"x"))
    assert isinstance(directed, auth.Envelope) and directed.destination == "node-b"


def test_a_wrong_key_is_rejected_as_bad_mac() -> None:
    ours = auth.derive_key(b"k" * 32, "ns")
    theirs = auth.derive_key(b"x" * 32, "ns")
    got = auth.open_envelope(ours, "ns", auth.seal(theirs, "ns", "intruder", "commands", None, b"p"))
    assert isinstance(got, auth.Rejected) and got.reason == "bad_mac"


def test_another_namespace_is_rejected_even_with_the_same_secret() -> None:
    other = auth.derive_key(b"k" * 32, "other")
    got = auth.open_envelope(auth.derive_key(b"k" * 32, "ns"), "ns", auth.seal(other, "other", "n", "commands", None, b""))
    assert isinstance(got, auth.Rejected) and got.reason == "foreign_namespace"


@pytest.mark.parametrize("field", [2, 3, 4, 5])
def test_tampering_with_any_covered_field_breaks_the_mac(field: int) -> None:
    key = auth.derive_key(b"k" * 32, "ns")
    items = msgspec.msgpack.decode(auth.seal(key, "ns", "node-a", "commands", "node-b", b"payload"))
    items[field] = b"tampered" if isinstance(items[field], bytes) else items[field] + "x"
    got = auth.open_envelope(key, "ns", msgspec.msgpack.encode(items))
    assert isinstance(got, auth.Rejected) and got.reason == "bad_mac"


@pytest.mark.parametrize("raw", [b"", b"\xff\x00garbage", msgspec.msgpack.encode([9, "ns"]),
                                 msgspec.msgpack.encode([1, "ns", "a", "t", "", "not-bytes", b"m" * 32]),
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
