"""Parsing JSON that comes from a file: bounded, and every failure a one-line :class:`LoraBridgeError`.

``json.loads`` on untrusted text fails in ways that are not ``JSONDecodeError``: a 100 000-deep
array raises ``RecursionError``, an integer over 4300 digits ``ValueError``, and it happily returns
strings holding lone surrogates (``"\\ud800"``) that crash whoever later encodes them as UTF-8.
Whatever parses a safetensors header, a neutral manifest, ``lora_adapter_metadata`` or an
``adapter_config.json`` goes through :func:`load_json`, which refuses all of these up front with
the file's name, so no later stage (schema validation, writers, ``json.dumps``) meets them.

NaN and Infinity constants are left as Python parses them (floats); what a NaN means where a
number is expected is for the format checks to say.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any

from ..errors import LoraBridgeError
from .input_file import open_regular

MAX_JSON_BYTES = 100_000_000  # the safetensors header limit; no JSON lorabridge reads is near it
MAX_JSON_DEPTH = 32  # manifests nest 4 levels, adapter configs 2; deep nesting only serves to exhaust the stack
MAX_JSON_INT = 2**64  # integers are shapes, offsets, ranks: anything at or beyond this is not one


class _NotStrictJson(ValueError):
    """A number that strict JSON (RFC 8259) has no value for."""


def _not_json(token: str) -> Any:
    raise _NotStrictJson(f"{token} is not a JSON number")


def _finite(text: str, parse=float) -> Any:
    try:
        value = parse(text)
        finite = math.isfinite(float(value))
    except OverflowError:
        finite = False
    if not finite:
        raise _NotStrictJson(f"the number {text[:20]}{'...' if len(text) > 20 else ''} is beyond the float64 range")
    return value


# json.loads hooks for strict JSON: Python accepts NaN, Infinity and -Infinity and turns 1e400 into inf;
# no other JSON reader does, and a non-finite alpha makes delta W NaN.
STRICT_HOOKS: dict[str, Any] = {"parse_constant": _not_json, "parse_float": _finite, "parse_int": lambda text: _finite(text, int)}


def load_json(raw: bytes | memoryview | str, what: str, path: str | os.PathLike | None, *, strict: bool = False) -> Any:
    """Parse ``raw`` (``what`` names it in messages, e.g. "header") or raise :class:`LoraBridgeError`.

    Refused: more than :data:`MAX_JSON_BYTES`, not UTF-8, not JSON, nested deeper than
    :data:`MAX_JSON_DEPTH`, an integer of magnitude :data:`MAX_JSON_INT` or more, or a string (key
    or value) that is not valid Unicode (a lone surrogate). ``strict``: also NaN, Infinity and numbers
    beyond the float64 range, which are not JSON (RFC 8259), so every language reads the same values.

    Example:
        >>> load_json(b'{"r": 4}', "adapter config", "adapter_config.json")
        {'r': 4}
    """
    if len(raw) > MAX_JSON_BYTES:
        raise LoraBridgeError(f"{what} is {len(raw)} bytes, over the {MAX_JSON_BYTES} limit", path)
    try:
        text = raw if isinstance(raw, str) else str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise LoraBridgeError(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})", path) from None
    try:
        value = json.loads(text, **(STRICT_HOOKS if strict else {}))
    except _NotStrictJson as exc:
        raise LoraBridgeError(f"{what} is not JSON ({exc})", path) from None
    except json.JSONDecodeError as exc:
        raise LoraBridgeError(f"{what} is not JSON ({exc})", path) from None
    except RecursionError:
        raise LoraBridgeError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels", path) from None
    except ValueError:  # an integer longer than sys.get_int_max_str_digits()
        raise LoraBridgeError(f"{what} holds an integer of over {sys.get_int_max_str_digits()} digits", path) from None
    try:
        suspect = _suspect(text.encode("utf-8") if isinstance(raw, str) else bytes(raw))
    except UnicodeEncodeError:  # a str holding a lone surrogate itself, not as an escape
        suspect = True
    problem = _problem(value) if suspect else None
    if problem:
        raise LoraBridgeError(f"{what} {problem}", path)
    return value


def load_json_file(path: str | os.PathLike, what: str) -> Any:
    """:func:`load_json` of a file's content, read only if it is a regular file and at most
    :data:`MAX_JSON_BYTES` long (a FIFO or ``/dev/zero`` named ``adapter_config.json`` cannot hang us).

    Example:
        >>> config = load_json_file("adapter/adapter_config.json", "adapter config")   # doctest: +SKIP
    """
    fd = open_regular(path)
    try:
        with open(fd, "rb", closefd=False) as handle:
            raw = handle.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise LoraBridgeError(f"cannot read: {exc.strerror or exc}", path) from None
    finally:
        os.close(fd)
    return load_json(raw, what, path)


# What _suspect works with: bytes, whole-buffer operations only (no per-character Python).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # decoding UTF-8 never makes a surrogate; an escape can
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER = b"0" * 20  # integers of 19 digits or fewer are below MAX_JSON_INT
_BRACKETS_AS_PARENS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


def _suspect(raw: bytes) -> bool:
    """False when the JSON text ``raw`` (which json.loads accepted) certainly breaks no limit of
    :func:`_problem`; True when it may. Whole-buffer byte operations only, about a quarter of what
    json.loads takes, where walking every parsed node of a 2000-tensor header costs as much as parsing."""
    if _SURROGATE_ESCAPE.search(raw):
        return True
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")  # now every quote opens or closes a string
    bare = b"".join(unescaped.split(b'"')[::2])  # the text outside strings
    if _LONG_NUMBER in bare.translate(_DIGITS_AS_ZERO):
        return True
    brackets = bare.translate(_BRACKETS_AS_PARENS, _NOT_BRACKETS)
    for _ in range(MAX_JSON_DEPTH):  # each pass removes the innermost level
        if not brackets:
            return False
        brackets = brackets.replace(b"()", b"")
    return bool(brackets)


def _problem(value: Any) -> str | None:
    """What is wrong with parsed JSON (depth, huge integer, invalid string), or None; iterative, no recursion."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return f"nests deeper than {MAX_JSON_DEPTH} levels"
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in items:
                if isinstance(key, str) and not is_unicode(key):
                    return f"has a key that is not valid Unicode ({_sample(key)})"
                stack.append((child, depth + 1))
        elif isinstance(node, str) and not is_unicode(node):
            return f"has a string that is not valid Unicode ({_sample(node)})"
        elif isinstance(node, int) and not isinstance(node, bool) and not -MAX_JSON_INT < node < MAX_JSON_INT:
            return f"has an integer out of range ({len(str(abs(node)))} digits)"
    return None


def is_unicode(text: str) -> bool:
    """False for strings holding lone surrogates, which no UTF-8 writer can encode."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _sample(text: str) -> str:
    """A short, printable excerpt naming the bad character."""
    bad = next((c for c in text if 0xD800 <= ord(c) <= 0xDFFF), "")
    return f"{ascii(text[:40])}, lone surrogate {ascii(bad)}"
