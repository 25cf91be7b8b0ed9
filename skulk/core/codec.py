"""Wire codec: records to JSON/msgpack and back, with externally tagged unions.

Theory of operation
-------------------
msgspec does the byte-level work; this module only reshapes. ``to_wire`` turns
a record into builtins (camelCase keys, tagged-union members wrapped as
``{ClassName: {...}}``, sets as sorted lists so bytes never depend on hash
order). ``from_wire(tp, data)`` walks the declared type ``tp`` and rebuilds the
records, validating as it goes; converters are compiled once per type and
cached.

Invariants kept: ``from_wire(T, to_wire(x)) == x`` for every record ``x`` of
type ``T``; encoding is deterministic for equal inputs.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin

import msgspec

from skulk.core.records import TaggedRecord

__all__ = [
    "WireError",
    "to_wire",
    "wire_key",
    "from_wire",
    "encode_json",
    "decode_json",
    "encode_msgpack",
    "decode_msgpack",
]


class WireError(ValueError):
    """Data did not match the declared record type; the message names the path."""


_NONE_TYPE = type(None)
_ENCODE_FIELDS: dict[type, tuple[tuple[str, str], ...]] = {}
_CONVERTERS: dict[Any, Callable[[Any, str], Any]] = {}


def _fields_for_encode(cls: type) -> tuple[tuple[str, str], ...]:
    fields = _ENCODE_FIELDS.get(cls)
    if fields is None:
        fields = tuple((f.name, f.encode_name) for f in msgspec.structs.fields(cls))
        _ENCODE_FIELDS[cls] = fields
    return fields


def to_wire(obj: Any) -> Any:
    """Convert ``obj`` to JSON-compatible builtins in Skulk's wire shape.

    Dispatches on the exact type through a table of encoders built once per
    type (``_encoder_for``): a persisted state is thousands of nested records,
    and a chain of ``isinstance`` tests per value was most of its cost. The
    result is the same as testing, in order: None and plain values (``str``,
    ``bool``, ``int``, ``float`` and their subclasses) as they are; records
    as dicts of their encoded field names (tagged-union members wrapped as
    ``{ClassName: {...}}``); dicts (enum keys by value); lists and tuples as
    lists; sets sorted by their JSON; enums by value; bytes as they are.
    """
    if type(obj) in _PLAIN:
        return obj
    encoder = _WIRE.get(type(obj))
    if encoder is None:
        encoder = _encoder_for(type(obj))
    return encoder(obj)


def _same(obj: Any) -> Any:
    return obj


_PLAIN: frozenset[type] = frozenset((str, int, float, bool, _NONE_TYPE))
_WIRE: dict[type, Callable[[Any], Any]] = {}


def _encoder_for(cls: type) -> Callable[[Any], Any]:
    """The encoder of values of exactly ``cls`` (cached); ``WireError`` for a type with no wire shape."""
    encoder: Callable[[Any], Any]
    if cls is _NONE_TYPE or issubclass(cls, (str, bool, int, float)) or issubclass(cls, bytes):
        encoder = _same
    elif issubclass(cls, msgspec.Struct):
        encoder = _struct_encoder(cls)
    elif issubclass(cls, dict):
        encoder = _encode_dict
    elif issubclass(cls, (list, tuple)):
        encoder = _encode_list
    elif issubclass(cls, (set, frozenset)):
        encoder = _encode_set
    elif issubclass(cls, enum.Enum):
        encoder = _encode_enum
    else:
        raise WireError(f"cannot encode {cls.__name__}")
    _WIRE[cls] = encoder
    return encoder


def _struct_encoder(cls: type) -> Callable[[Any], Any]:
    fields = _fields_for_encode(cls)
    plain = _PLAIN

    if issubclass(cls, TaggedRecord):
        name = cls.__name__

        def encode_tagged(obj: Any) -> Any:
            return {name: {key: (v if type(v) in plain else to_wire(v))
                           for attr, key in fields for v in (getattr(obj, attr),)}}

        return encode_tagged

    def encode(obj: Any) -> Any:
        return {key: (v if type(v) in plain else to_wire(v)) for attr, key in fields for v in (getattr(obj, attr),)}

    return encode


def _encode_dict(obj: dict[Any, Any]) -> Any:
    plain = _PLAIN
    return {(k if type(k) in plain else _key_to_wire(k)): (v if type(v) in plain else to_wire(v)) for k, v in obj.items()}


def _encode_list(obj: Any) -> Any:
    plain = _PLAIN
    return [v if type(v) in plain else to_wire(v) for v in obj]


def _encode_set(obj: Any) -> Any:
    return sorted((to_wire(v) for v in obj), key=_sort_key)


def _encode_enum(obj: enum.Enum) -> Any:
    return obj.value


def _key_to_wire(key: Any) -> Any:
    if isinstance(key, enum.Enum):
        return key.value
    return key


def wire_key(key: Any) -> Any:
    """A mapping key as ``to_wire`` writes it (an enum by its value)."""
    return _key_to_wire(key)


def _sort_key(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def from_wire(tp: Any, data: Any) -> Any:
    """Rebuild a value of declared type ``tp`` from wire builtins; raises WireError."""
    return _converter(tp)(data, "$")


def encode_json(obj: Any) -> bytes:
    return msgspec.json.encode(to_wire(obj))


def decode_json(tp: Any, raw: bytes | str) -> Any:
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise WireError(f"invalid JSON: {exc}") from None
    return from_wire(tp, data)


def encode_msgpack(obj: Any) -> bytes:
    return msgspec.msgpack.encode(to_wire(obj))


def decode_msgpack(tp: Any, raw: bytes) -> Any:
    try:
        data = msgspec.msgpack.decode(raw)
    except msgspec.DecodeError as exc:
        raise WireError(f"invalid msgpack: {exc}") from None
    return from_wire(tp, data)


# --- converters -------------------------------------------------------------


def _converter(tp: Any) -> Callable[[Any, str], Any]:
    conv = _CONVERTERS.get(tp)
    if conv is None:
        conv = _build(tp)
        _CONVERTERS[tp] = conv
    return conv


def _fail(path: str, expected: str, data: Any) -> WireError:
    return WireError(f"{path}: expected {expected}, got {type(data).__name__}")


def _build(tp: Any) -> Callable[[Any, str], Any]:
    if tp is Any:
        return lambda data, path: data
    supertype = getattr(tp, "__supertype__", None)
    if supertype is not None:  # NewType
        return _converter(supertype)
    if tp is _NONE_TYPE or tp is None:
        return _build_none()
    if tp is bool:
        return _build_exact(bool, "boolean")
    if tp is int:
        return _build_int()
    if tp is float:
        return _build_float()
    if tp is str:
        return _build_exact(str, "string")
    if tp is bytes:
        return _build_exact(bytes, "bytes")
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return _build_union(get_args(tp))
    if origin is Literal:
        return _build_literal(get_args(tp))
    if origin in (list, tuple, frozenset, set, typing.Sequence):
        return _build_sequence(origin, get_args(tp))
    if origin is dict or origin is typing.Mapping:
        key_t, val_t = get_args(tp)
        return _build_dict(key_t, val_t)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _build_enum(tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return _build_struct(tp)
    raise TypeError(f"codec does not support {tp!r}")


def _build_none() -> Callable[[Any, str], Any]:
    def conv(data: Any, path: str) -> Any:
        if data is not None:
            raise _fail(path, "null", data)
        return None

    return conv


def _build_exact(py_type: type, name: str) -> Callable[[Any, str], Any]:
    def conv(data: Any, path: str) -> Any:
        if type(data) is not py_type:
            raise _fail(path, name, data)
        return data

    return conv


def _build_int() -> Callable[[Any, str], Any]:
    def conv(data: Any, path: str) -> Any:
        if type(data) is not int:
            raise _fail(path, "integer", data)
        return data

    return conv


def _build_float() -> Callable[[Any, str], Any]:
    def conv(data: Any, path: str) -> Any:
        if type(data) is float:
            return data
        if type(data) is int:
            return float(data)
        raise _fail(path, "number", data)

    return conv


def _build_literal(values: tuple[Any, ...]) -> Callable[[Any, str], Any]:
    allowed = frozenset(values)

    def conv(data: Any, path: str) -> Any:
        if isinstance(data, (str, int, bool)) and data in allowed:
            return data
        raise WireError(f"{path}: expected one of {sorted(map(str, values))}, got {data!r}")

    return conv


def _build_enum(cls: type[enum.Enum]) -> Callable[[Any, str], Any]:
    def conv(data: Any, path: str) -> Any:
        try:
            return cls(data)
        except ValueError:
            names = [str(m.value) for m in cls]
            raise WireError(f"{path}: expected one of {names}, got {data!r}") from None

    return conv


def _build_union(members: tuple[Any, ...]) -> Callable[[Any, str], Any]:
    optional = _NONE_TYPE in members
    rest = tuple(m for m in members if m is not _NONE_TYPE)
    tagged = {m.__name__: m for m in rest if isinstance(m, type) and issubclass(m, TaggedRecord)}
    untagged = tuple(m for m in rest if m.__name__ not in tagged or not isinstance(m, type))
    if tagged and untagged:
        raise TypeError(f"union mixes tagged and untagged members: {members!r}")
    if tagged:
        expected = "object with one key of " + ", ".join(sorted(tagged))

        def conv_tagged(data: Any, path: str) -> Any:
            if data is None and optional:
                return None
            if not isinstance(data, dict) or len(data) != 1:
                raise _fail(path, expected, data)
            ((name, body),) = data.items()
            member = tagged.get(name)
            if member is None:
                raise WireError(f"{path}: unknown variant {name!r}; expected {expected}")
            return _converter(member)({name: body}, path)

        return conv_tagged

    convs = [_converter(m) for m in rest]

    def conv_plain(data: Any, path: str) -> Any:
        if data is None and optional:
            return None
        errors = []
        for c in convs:
            try:
                return c(data, path)
            except WireError as exc:
                errors.append(str(exc))
        raise WireError(errors[0] if len(errors) == 1 else f"{path}: no union member matched ({'; '.join(errors)})")

    return conv_plain


def _build_sequence(origin: Any, args: tuple[Any, ...]) -> Callable[[Any, str], Any]:
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _converter(args[0])
        ctor: Callable[[Any], Any] = tuple
    elif origin is tuple:
        fixed = [_converter(a) for a in args]

        def conv_fixed(data: Any, path: str) -> Any:
            if not isinstance(data, (list, tuple)) or len(data) != len(fixed):
                raise _fail(path, f"array of {len(fixed)}", data)
            return tuple(c(v, f"{path}[{i}]") for i, (c, v) in enumerate(zip(fixed, data)))

        return conv_fixed
    else:
        item = _converter(args[0] if args else Any)
        ctor = {list: list, frozenset: frozenset, set: set, typing.Sequence: tuple}[origin]

    def conv(data: Any, path: str) -> Any:
        if not isinstance(data, (list, tuple)):
            raise _fail(path, "array", data)
        return ctor(item(v, f"{path}[{i}]") for i, v in enumerate(data))

    return conv


def _build_dict(key_t: Any, val_t: Any) -> Callable[[Any, str], Any]:
    key = _converter(key_t)
    val = _converter(val_t)

    def conv(data: Any, path: str) -> Any:
        if not isinstance(data, dict):
            raise _fail(path, "object", data)
        return {key(k, path): val(v, f"{path}.{k}") for k, v in data.items()}

    return conv


def _build_struct(cls: type[msgspec.Struct]) -> Callable[[Any, str], Any]:
    infos = msgspec.structs.fields(cls)
    is_tagged = issubclass(cls, TaggedRecord)
    name = cls.__name__
    # Converters are resolved lazily so that self-referencing records work.
    plan: list[tuple[str, str, Any, bool]] = [
        (f.name, f.encode_name, f.type, f.required) for f in infos
    ]

    def conv(data: Any, path: str) -> Any:
        if is_tagged:
            if not isinstance(data, dict) or len(data) != 1 or name not in data:
                raise _fail(path, f'{{"{name}": {{...}}}}', data)
            data = data[name]
            path = f"{path}.{name}"
        if not isinstance(data, dict):
            raise _fail(path, "object", data)
        kwargs = {}
        for attr, enc, ftype, required in plan:
            if enc in data:
                kwargs[attr] = _converter(ftype)(data[enc], f"{path}.{enc}")
            elif required:
                raise WireError(f"{path}: missing required field {enc!r}")
        return cls(**kwargs)

    return conv
