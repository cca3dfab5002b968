"""A small, honest JSON Schema validator: the subset that checks the shape of generated JSON.

Supported keywords: ``type`` (a name or a list of names), ``properties``, ``required``, ``items`` (one schema
for every element), ``enum``, ``additionalProperties`` (true/false or a schema), ``minimum``, ``maximum``,
``minLength``, ``maxLength``; annotations (``$schema``, ``$id``, ``title``, ``description``, ``default``,
``examples``) are ignored. Any other keyword (``$ref``, ``oneOf``, ``pattern``, ``format``, ...) is refused
when the schema is loaded, so a schema is never silently half-checked. Semantics follow JSON Schema 2020-12
for these keywords (``1.0`` is an integer; booleans are not numbers; lengths count code points).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

SUPPORTED = frozenset({"type", "properties", "required", "items", "enum", "additionalProperties", "minimum",
                       "maximum", "minLength", "maxLength"})
ANNOTATIONS = frozenset({"$schema", "$id", "title", "description", "default", "examples", "$comment"})
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")


class SchemaError(ValueError):
    """A schema this validator cannot check; names the file and the JSON pointer of the problem."""


def load_schema(path: str | Path) -> dict:
    path = Path(path)
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SchemaError(f"{path}: schema file not found") from None
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    check_schema(schema, where=str(path))
    return schema


def check_schema(schema, where: str = "schema", pointer: str = "#") -> None:
    """Raise SchemaError for keywords outside the supported subset (recursively)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise SchemaError(f"{where}: {pointer} must be an object or a boolean")
    unknown = set(schema) - SUPPORTED - ANNOTATIONS
    if unknown:
        raise SchemaError(f"{where}: unsupported JSON Schema keyword(s) {sorted(unknown)} at {pointer}; this "
                          f"validator supports {sorted(SUPPORTED)}")
    types = schema.get("type")
    for t in [types] if isinstance(types, str) else (types or []):
        if t not in TYPES:
            raise SchemaError(f"{where}: {pointer}/type: unknown type {t!r}; use one of {', '.join(TYPES)}")
    for name, sub in (schema.get("properties") or {}).items():
        check_schema(sub, where, f"{pointer}/properties/{name}")
    for key in ("items", "additionalProperties"):
        if key in schema and not isinstance(schema[key], bool):
            check_schema(schema[key], where, f"{pointer}/{key}")


def _is_type(value, t: str) -> bool:
    if t == "object":
        return isinstance(value, dict)
    if t == "array":
        return isinstance(value, list)
    if t == "string":
        return isinstance(value, str)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "null":
        return value is None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return t == "number" or (isinstance(value, int) or (math.isfinite(value) and float(value).is_integer()))


def validate(value, schema, path: str = "$") -> str | None:
    """The first way ``value`` violates ``schema`` (a message with its JSON path), or None if it conforms."""
    if schema is True:
        return None
    if schema is False:
        return f"{path}: no value is allowed here"
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_is_type(value, t) for t in names):
            return f"{path}: expected {' or '.join(names)}, got {_json_type(value)}"
    if "enum" in schema and not any(_json_equal(value, e) for e in schema["enum"]):
        return f"{path}: {json.dumps(value)[:60]} is not one of {json.dumps(schema['enum'])[:120]}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{path}: {value} is below the minimum {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{path}: {value} is above the maximum {schema['maximum']}"
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            return f"{path}: string of length {len(value)} is shorter than minLength {schema['minLength']}"
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return f"{path}: string of length {len(value)} is longer than maxLength {schema['maxLength']}"
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                return f"{path}: missing required property {name!r}"
        props = schema.get("properties", {})
        for name, item in value.items():
            if name in props:
                sub = props[name]
            elif "additionalProperties" in schema:
                sub = schema["additionalProperties"]
                if sub is False:
                    return f"{path}: property {name!r} is not allowed (additionalProperties is false)"
            else:
                continue
            err = validate(item, sub, f"{path}.{name}")
            if err:
                return err
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            err = validate(item, schema["items"], f"{path}[{i}]")
            if err:
                return err
    return None


def _json_type(value) -> str:
    for t in ("null", "boolean", "object", "array", "string", "integer", "number"):
        if _is_type(value, t):
            return t
    return type(value).__name__


def _json_equal(a, b) -> bool:
    """JSON equality: 1 == 1.0, but true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b
