"""``skulk.api.body``: invalid UTF-8 is ``invalid_encoding`` whatever the JSON library raises.

Regression pin (issue 11): msgspec 0.23 began reporting invalid UTF-8 as a
``msgspec.DecodeError`` ("Invalid UTF-8 encoded string") where 0.22 raised
``UnicodeDecodeError``, and ``decode_body`` classified by that exception
class, so a fresh install answered ``invalid_json`` where the API documents
``invalid_encoding``. The encoding is now checked before decoding, so the
classification cannot depend on the library's internal exception.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from skulk.api.body import check_utf8, decode_body
from skulk.api.errors import ApiError


class Tiny(msgspec.Struct):
    content: str


# Each is invalid under RFC 3629 (which Python's strict codec implements), with
# the offset of its first bad byte counted by hand: `{"content": "` is 13 bytes.
INVALID: dict[str, tuple[bytes, int]] = {
    "lone-continuation": (b'{"content": "\x80"}', 13),
    "bom-bytes": (b'{"content": "\xff\xfe"}', 13),
    "truncated-sequence": (b'{"content": "\xe2\x82"}', 13),
    "overlong-slash": (b'{"content": "\xc0\xaf"}', 13),
    "encoded-surrogate": (b'{"content": "\xed\xa0\x80"}', 13),
    "beyond-u10ffff": (b'{"content": "\xf4\x90\x80\x80"}', 13),
    "in-a-key": (b'{"c\xffntent": "x"}', 3),
    "after-the-json": (b'{"content": "x"}\xff', 16),
}


def _refusal(raw: bytes) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_body(raw, Tiny)
    return info.value


@pytest.mark.parametrize(("raw", "offset"), list(INVALID.values()), ids=list(INVALID))
def test_invalid_utf8_is_invalid_encoding_with_the_byte_offset(raw: bytes, offset: int) -> None:
    err = _refusal(raw)
    assert err.status == 400 and err.code == "invalid_encoding", (err.code, err.message)
    assert f"byte {offset}:" in err.message, err.message


def test_valid_utf8_of_every_width_decodes() -> None:
    text = "a é € 𝄞"
    assert decode_body(('{"content": "%s"}' % text).encode(), Tiny).content == text
    check_utf8(text.encode())


@pytest.mark.parametrize("behaviour", ["msgspec-0.22", "msgspec-0.23"])
def test_classification_does_not_depend_on_the_json_library_exception(
    monkeypatch: pytest.MonkeyPatch, behaviour: str
) -> None:
    """Both msgspec behaviours, reproduced, give the documented code."""

    def decode(raw: bytes, *args: Any, **kwargs: Any) -> Any:
        if behaviour == "msgspec-0.22":
            raise UnicodeDecodeError("utf-8", raw, 0, 1, "invalid start byte")
        raise msgspec.DecodeError("Invalid UTF-8 encoded string")

    monkeypatch.setattr(msgspec.json, "decode", decode)
    for raw, _ in INVALID.values():
        assert _refusal(raw).code == "invalid_encoding"


def test_invalid_json_in_valid_utf8_is_still_invalid_json() -> None:
    assert _refusal('{"content": "é"'.encode()).code == "invalid_json"
