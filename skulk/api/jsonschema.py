"""JSON Schema for records, in exactly the shape ``skulk.core.codec`` writes them.

Theory of operation
-------------------
``msgspec.json.schema_components`` cannot describe Skulk's wire format: the
codec writes members of tagged unions as single-key objects
(``{"RunnerReady": {...}}``) and msgspec refuses unions of untagged structs.
This module walks a type the way the codec's ``_build`` does and emits JSON
Schema 2020-12 (the dialect of OpenAPI 3.1):

- every struct becomes a named component (its class name) referenced with
  ``$ref``; a ``TaggedRecord`` component is an object with one required
  property, its class name, holding the body;
- field names are the encode names (camelCase for core records, as declared
  for API records); fields with defaults are optional and show the default
  when it is a plain JSON value;
- ``Annotated[..., msgspec.Meta(...)]`` constraints become ``minimum``,
  ``maxLength`` and friends, and descriptions carry over;
- NewType ids are their base type; tuples of ``T, ...`` and sets are arrays.

Invariant: a value produced by ``to_wire`` validates against the schema of its
declared type (checked by the tests for the state and the API records).
"""

from __future__ import annotations

import enum
import inspect
import types
import typing
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec

from skulk.core.codec import to_wire
from skulk.core.records import TaggedRecord

__all__ = ["SchemaBuilder"]

_NONE = type(None)


class SchemaBuilder:
    """Accumulates named components; ``schema(tp)`` returns an inline schema or a ``$ref``."""

    def __init__(self, ref_template: str = "#/components/schemas/{name}") -> None:
        self.ref_template = ref_template
        self.components: dict[str, dict[str, Any]] = {}
        self._owners: dict[str, type] = {}

    def schema(self, tp: Any) -> dict[str, Any]:
        return self._schema(tp, {})

    # --- dispatch --------------------------------------------------------------------------

    def _schema(self, tp: Any, meta: dict[str, Any]) -> dict[str, Any]:
        origin = get_origin(tp)
        if origin is Annotated:
            base, *extras = get_args(tp)
            merged = dict(meta)
            for extra in extras:
                if isinstance(extra, msgspec.Meta):
                    merged.update(_meta_fields(extra))
            return self._schema(base, merged)
        supertype = getattr(tp, "__supertype__", None)
        if supertype is not None:
            return self._schema(supertype, meta)
        if tp is Any:
            return _with_meta({}, meta, "any")
        if tp is _NONE or tp is None:
            return {"type": "null"}
        if tp is bool:
            return _with_meta({"type": "boolean"}, meta, "number")
        if tp is int:
            return _with_meta({"type": "integer"}, meta, "number")
        if tp is float:
            return _with_meta({"type": "number"}, meta, "number")
        if tp is str:
            return _with_meta({"type": "string"}, meta, "string")
        if tp is bytes:
            return _with_meta({"type": "string", "contentEncoding": "base64"}, meta, "string")
        if origin is Union or origin is types.UnionType:
            members = [self._schema(m, {}) for m in get_args(tp)]
            return _with_meta({"anyOf": members}, meta, "any")
        if origin is Literal:
            return _with_meta({"enum": list(get_args(tp))}, meta, "any")
        if origin in (list, tuple, set, frozenset, typing.Sequence):
            args = get_args(tp)
            if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
                fixed = [self._schema(a, {}) for a in args]
                return _with_meta(
                    {"type": "array", "prefixItems": fixed, "minItems": len(fixed), "maxItems": len(fixed)}, meta, "array"
                )
            item = args[0] if args else Any
            out: dict[str, Any] = {"type": "array", "items": self._schema(item, {})}
            if origin in (set, frozenset):
                out["uniqueItems"] = True
            return _with_meta(out, meta, "array")
        if origin in (dict, typing.Mapping):
            _key, value = get_args(tp) or (str, Any)
            return _with_meta({"type": "object", "additionalProperties": self._schema(value, {})}, meta, "object")
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return _with_meta({"enum": [m.value for m in tp]}, meta, "any")
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            return _with_meta(self._struct(tp), meta, "any")
        raise TypeError(f"no JSON schema for {tp!r}")

    def _struct(self, cls: type[msgspec.Struct]) -> dict[str, Any]:
        name = cls.__name__
        owner = self._owners.get(name)
        if owner is not None and owner is not cls:
            raise TypeError(f"two record types share the component name {name!r}: {owner} and {cls}")
        ref = {"$ref": self.ref_template.format(name=name)}
        if owner is not None:
            return ref
        self._owners[name] = cls
        self.components[name] = {}  # placeholder: self-references resolve to the ref
        properties: dict[str, Any] = {}
        required: list[str] = []
        for f in msgspec.structs.fields(cls):
            prop = self._schema(f.type, {})
            if f.required:
                required.append(f.encode_name)
            else:
                default = _json_default(f)
                if default is not _NO_DEFAULT:
                    prop = {**prop, "default": default}
            properties[f.encode_name] = prop
        body: dict[str, Any] = {"type": "object", "properties": properties}
        if required:
            body["required"] = required
        own_doc = cls.__dict__.get("__doc__")  # the class's own docstring, not an inherited one
        description = inspect.cleandoc(own_doc) if isinstance(own_doc, str) and own_doc.strip() else None
        if issubclass(cls, TaggedRecord):
            component: dict[str, Any] = {
                "title": name,
                "type": "object",
                "properties": {name: body},
                "required": [name],
                "additionalProperties": False,
            }
        else:
            component = {"title": name, **body}
        if description:
            component["description"] = description
        self.components[name] = component
        return ref


_NO_DEFAULT = object()


def _json_default(f: msgspec.structs.FieldInfo) -> Any:
    value = f.default if f.default is not msgspec.NODEFAULT else None
    if f.default is msgspec.NODEFAULT:
        if f.default_factory is msgspec.NODEFAULT:
            return _NO_DEFAULT
        value = f.default_factory()
    try:
        return to_wire(value)
    except Exception:  # noqa: BLE001 - an unencodable default is simply not shown
        return _NO_DEFAULT


def _meta_fields(meta: msgspec.Meta) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("gt", "ge", "lt", "le", "min_length", "max_length", "pattern", "description", "title", "examples"):
        value = getattr(meta, key, None)
        if value is not None:
            out[key] = value
    return out


_NUMERIC = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum", "le": "maximum"}


def _with_meta(schema: dict[str, Any], meta: dict[str, Any], kind: str) -> dict[str, Any]:
    if not meta:
        return schema
    out = dict(schema)
    for key, value in meta.items():
        if key in _NUMERIC:
            out[_NUMERIC[key]] = value
        elif key in ("min_length", "max_length"):
            suffix = "Length" if kind == "string" else ("Properties" if kind == "object" else "Items")
            out[("min" if key == "min_length" else "max") + suffix] = value
        elif key == "pattern":
            out["pattern"] = value
        else:
            out[key] = value
    if "$ref" in out and len(out) > 1:
        # Keywords beside a $ref are allowed in 2020-12, but keep the ref pure for older tools.
        ref = out.pop("$ref")
        out = {"allOf": [{"$ref": ref}], **out}
    return out
