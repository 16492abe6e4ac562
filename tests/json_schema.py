"""A small JSON Schema validator for the subset ``pipeline/report/run_record.schema.json``
uses (``jsonschema`` is not a dependency): type, properties, required,
additionalProperties, items, const, enum and local ``$ref``. A keyword it does not know is
an error, so a schema can never be silently checked less than it reads."""
from __future__ import annotations

from typing import Any

_ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description"}
_KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "const", "enum", "$ref"}
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
}


def validate(instance: Any, schema: dict[str, Any]) -> list[str]:
    """Every violation as ``path: message`` (empty: valid)."""
    errors: list[str] = []
    _check(instance, schema, schema, "$", errors)
    return errors


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref are supported, not {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _check(v: Any, schema: dict[str, Any], root: dict[str, Any], path: str, errors: list[str]) -> None:
    unknown = set(schema) - _KEYWORDS - _ANNOTATIONS
    if unknown:
        raise ValueError(f"schema at {path} uses keywords this validator does not implement: {sorted(unknown)}")
    if "$ref" in schema:
        _check(v, _resolve(schema["$ref"], root), root, path, errors)
    if "type" in schema:
        types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        if not any(_TYPES[t](v) for t in types):
            errors.append(f"{path}: expected {' or '.join(types)}, found {type(v).__name__} {str(v)[:60]!r}")
            return
    if "const" in schema and v != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}, found {v!r}")
    if "enum" in schema and v not in schema["enum"]:
        errors.append(f"{path}: expected one of {schema['enum']!r}, found {v!r}")
    if isinstance(v, dict):
        for key in schema.get("required", []):
            if key not in v:
                errors.append(f"{path}: missing key {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in v.items():
            if key in props:
                _check(value, props[key], root, f"{path}.{key}", errors)
            elif extra is False:
                errors.append(f"{path}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                _check(value, extra, root, f"{path}.{key}", errors)
    if isinstance(v, list) and "items" in schema:
        for i, item in enumerate(v):
            _check(item, schema["items"], root, f"{path}[{i}]", errors)
