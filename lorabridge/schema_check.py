"""A quick "surely valid" answer for a JSON document against a JSON Schema, without importing jsonschema.

Every neutral file read or written has its manifest checked against the published schema; importing
jsonschema (attrs, referencing, rpds, its format checkers) costs about as much as the rest of a small
conversion's start-up. Nearly every manifest is valid, and proving that needs only the few keywords the
schema uses. :func:`surely_valid` says True only when every keyword it meets is one it knows and
the document passes it; anything else (an unknown keyword or format, a number given as ``1.0`` where an
integer is wanted, a value it cannot compare exactly) gives False, and the caller asks jsonschema, which
also words the problems. So True implies jsonschema finds nothing; False says nothing.
"""

from __future__ import annotations

import datetime as _dt
import re
from functools import lru_cache
from typing import Any

# Keywords that only annotate: they never make a document invalid.
_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "$defs", "title", "description", "examples", "default"})
_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str), "null": lambda v: v is None, "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: type(v) is int,  # jsonschema also takes 2.0: not surely, then
    "number": lambda v: type(v) in (int, float),
}
# RFC 3339 date-time as the schema's own pattern writes it, the day checked by datetime below.
_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})")


@lru_cache(maxsize=64)
def _pattern(text: str) -> re.Pattern:
    return re.compile(text)


def _same(a: Any, b: Any) -> bool:
    """Surely equal as JSON Schema compares (``const``, ``enum``): same Python type and equal."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _date_time(value: Any) -> bool:
    if not isinstance(value, str) or not _DATE_TIME.fullmatch(value):
        return False
    try:
        _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))  # a real day and time (no Feb 30, no leap second)
    except ValueError:
        return False
    return True


def surely_valid(instance: Any, schema: Any, root: Any = None) -> bool:
    """True only if ``instance`` is valid against ``schema`` (draft 2020-12 keywords; ``root``: where
    ``#/$defs/...`` references point, ``schema`` itself by default).

    Example:
        >>> schema = {"type": "object", "required": ["rank"], "properties": {"rank": {"type": "integer", "minimum": 1}}}
        >>> surely_valid({"rank": 4}, schema), surely_valid({"rank": 0}, schema), surely_valid({"rank": 4.0}, schema)
        (True, False, False)
    """
    root = schema if root is None else root
    if schema is True:
        return True
    if not isinstance(schema, dict):
        return False
    for keyword, value in schema.items():
        if keyword in _ANNOTATIONS or keyword in ("then", "else"):
            continue
        if not _KEYWORDS.get(keyword, _unknown)(instance, value, schema, root):
            return False
    return True


def _unknown(instance, value, schema, root) -> bool:
    return False


def _ref(instance, value, schema, root) -> bool:
    if not isinstance(value, str) or not value.startswith("#/$defs/"):
        return False
    target = root.get("$defs", {}).get(value[len("#/$defs/"):])
    return target is not None and surely_valid(instance, target, root)


def _type(instance, value, schema, root) -> bool:
    names = value if isinstance(value, list) else [value]
    return any(name in _TYPES and _TYPES[name](instance) for name in names)


def _properties(instance, value, schema, root) -> bool:
    if not isinstance(instance, dict):
        return True
    return all(surely_valid(instance[key], sub, root) for key, sub in value.items() if key in instance)


def _additional(instance, value, schema, root) -> bool:
    if not isinstance(instance, dict):
        return True
    if "patternProperties" in schema:
        return False
    known = schema.get("properties", {})
    return all(surely_valid(v, value, root) for k, v in instance.items() if k not in known)


def _if(instance, value, schema, root) -> bool:
    then, otherwise = schema.get("then", True), schema.get("else", True)
    if surely_valid(instance, value, root):
        return surely_valid(instance, then, root)
    if _surely_invalid(instance, value):
        return surely_valid(instance, otherwise, root)
    return surely_valid(instance, then, root) and surely_valid(instance, otherwise, root)  # whichever applies


def _surely_unequal(a: Any, b: Any) -> bool:
    """Surely different JSON values: two different strings, or a string and a non-string."""
    return (isinstance(a, str) or isinstance(b, str)) and a != b


def _surely_invalid(instance: Any, schema: Any) -> bool:
    """True only if ``instance`` surely fails ``schema``: what an ``if`` of the neutral schema needs (a property
    whose ``const``/``enum`` surely differs); False says nothing."""
    if not isinstance(schema, dict):
        return False
    if "const" in schema and _surely_unequal(instance, schema["const"]):
        return True
    if "enum" in schema and all(_surely_unequal(instance, e) for e in schema["enum"]):
        return True
    properties = schema.get("properties", {})
    return isinstance(instance, dict) and any(k in instance and _surely_invalid(instance[k], sub) for k, sub in properties.items())


def _unique(instance, value, schema, root) -> bool:
    if not isinstance(instance, list) or value is not True:
        return isinstance(value, bool)
    return all(isinstance(v, str) for v in instance) and len(set(instance)) == len(instance)


def _number(instance) -> bool:
    return type(instance) in (int, float)


_KEYWORDS = {
    "$ref": _ref,
    "type": _type,
    "properties": _properties,
    "additionalProperties": _additional,
    "required": lambda i, v, s, r: not isinstance(i, dict) or all(k in i for k in v),
    "propertyNames": lambda i, v, s, r: not isinstance(i, dict) or all(surely_valid(k, v, r) for k in i),
    "items": lambda i, v, s, r: not isinstance(i, list) or ("prefixItems" not in s and all(surely_valid(x, v, r) for x in i)),
    "minItems": lambda i, v, s, r: not isinstance(i, list) or len(i) >= v,
    "uniqueItems": _unique,
    "minLength": lambda i, v, s, r: not isinstance(i, str) or len(i) >= v,
    "minimum": lambda i, v, s, r: (not _number(i) and not isinstance(i, bool)) or (_number(i) and i >= v),
    "pattern": lambda i, v, s, r: not isinstance(i, str) or _pattern(v).search(i) is not None,
    "format": lambda i, v, s, r: v == "date-time" and (not isinstance(i, str) or _date_time(i)),
    "const": lambda i, v, s, r: _same(i, v),
    "enum": lambda i, v, s, r: any(_same(i, e) for e in v),
    "allOf": lambda i, v, s, r: all(surely_valid(i, sub, r) for sub in v),
    "anyOf": lambda i, v, s, r: any(surely_valid(i, sub, r) for sub in v),
    "if": _if,
}
