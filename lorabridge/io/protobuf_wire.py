"""The protobuf wire format, the subset a MindSpore checkpoint uses: varints, fields, flat messages.

Generic and bounds-checked: every read stays inside the [start, end) span it is given, and every
structural problem is a :class:`Malformed` carrying the byte offset, so a caller (``io/ms_ckpt.py``)
can name its file and say where. It knows nothing of MindSpore; message schemas are the caller's data.

Example:
    >>> data = len_field(1, 2) + b"hi" + encode_varint(2 << 3 | VARINT) + encode_varint(300)
    >>> [(number, wire, value) for number, wire, value, _ in fields(data, 0, len(data))]
    [(1, 2, (2, 4)), (2, 0, 300)]
    >>> parse_message(data, 0, len(data), {1: ("name", "bytes"), 2: ("sizes", "varints")}, "Demo")
    {'name': (2, 4), 'sizes': [300]}
"""

from __future__ import annotations

from typing import Any, Iterator

VARINT, I64, LEN, I32 = 0, 1, 2, 5  # wire types
FIXED_WIDTH = {I64: 8, I32: 4}


class Malformed(Exception):
    """A structural problem found at a byte offset; the caller adds the file name."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


def varint(buf, pos: int, end: int) -> tuple[int, int]:
    """Decode one varint starting at ``pos``, never reading at or past ``end``.

    One and two bytes (values under 16,384: nearly every key, length and dimension) are read without the loop.
    """
    if pos + 1 < end:
        first = buf[pos]
        if first < 0x80:
            return first, pos + 1
        second = buf[pos + 1]
        if second < 0x80:
            return first & 0x7F | second << 7, pos + 2
    start, result, shift = pos, 0, 0
    while True:
        if pos >= end:
            raise Malformed("varint runs past the end of its message (truncated?)", start)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if result >> 64:
                raise Malformed("varint does not fit in 64 bits", start)
            return result, pos
        shift += 7
        if shift >= 70:
            raise Malformed("varint longer than 10 bytes", start)


def fields(buf, start: int, end: int) -> Iterator[tuple[int, int, Any, int]]:
    """Yield (field number, wire type, value, offset) for each field of the message in [start, end).

    The value is an int for varints and a (begin, end) byte span for everything else. Keys, lengths and
    values under 128 (one byte: nearly all of a checkpoint's) are read inline, without a call to :func:`varint`.
    """
    pos = start
    while pos < end:
        at = pos
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        value: int | tuple[int, int]
        if number == 0:
            raise Malformed("protobuf field number 0", at)
        if wire == VARINT:
            if pos < end and buf[pos] < 0x80:
                value, pos = buf[pos], pos + 1
            else:
                value, pos = varint(buf, pos, end)
        elif wire == LEN:
            if pos < end and buf[pos] < 0x80:
                length, pos = buf[pos], pos + 1
            else:
                length, pos = varint(buf, pos, end)
            if length > end - pos:
                raise Malformed(f"field {number} claims {length} bytes but only {end - pos} remain (truncated?)", at)
            value, pos = (pos, pos + length), pos + length
        elif wire in FIXED_WIDTH:
            if FIXED_WIDTH[wire] > end - pos:
                raise Malformed(f"field {number} runs past the end of its message (truncated?)", at)
            value, pos = (pos, pos + FIXED_WIDTH[wire]), pos + FIXED_WIDTH[wire]
        else:
            raise Malformed(f"unsupported protobuf wire type {wire}", at)
        yield number, wire, value, at


def packed_varints(buf, start: int, end: int) -> list[int]:
    """The integers of a packed repeated field, whose payload is [start, end)."""
    values, pos = [], start
    while pos < end:
        value, pos = varint(buf, pos, end)
        values.append(value)
    return values


def parse_message(buf, start: int, end: int, schema: dict[int, tuple[str, str]], what: str) -> dict:
    """The fields of the message in [start, end) that ``schema`` names, by name; ``what`` names it in errors.

    ``schema`` maps field number -> (name, kind). "bytes" fields are length-delimited and singular
    (their value is a (begin, end) span); "varints" fields are repeated integers, plain or packed.
    Unknown fields are skipped, as protobuf does.
    """
    found: dict[str, Any] = {}
    for number, wire, value, at in fields(buf, start, end):
        if number not in schema:
            continue
        name, kind = schema[number]
        if kind == "varints" and wire == VARINT:
            found.setdefault(name, []).append(value)
        elif kind == "varints" and wire == LEN:
            found.setdefault(name, []).extend(packed_varints(buf, *value))
        elif kind == "bytes" and wire == LEN:
            if name in found:
                raise Malformed(f"{what}.{name} appears twice", at)
            found[name] = value
        else:
            raise Malformed(f"{what}.{name} has the wrong protobuf wire type {wire}", at)
    return found


def text(buf, span: tuple[int, int], what: str, at: int) -> str:
    """The UTF-8 string in ``span``; ``what`` and ``at`` place the error if it is not UTF-8."""
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed(f"{what} is not valid UTF-8", at) from None


def encode_varint(value: int) -> bytes:
    """A non-negative integer as a varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def len_field(number: int, payload_len: int) -> bytes:
    """Key and length of a length-delimited field; the payload follows."""
    return encode_varint(number << 3 | LEN) + encode_varint(payload_len)
