"""A strict, streaming safetensors reader and writer that needs no framework.

Why not the ``safetensors`` package: its numpy API has no bfloat16, and its
errors do not say which file or which tensor is wrong. This module
memory-maps the file, checks every header entry against the data region, and
returns :class:`~lorabridge.tensor.Tensor` views without copying.
Files it writes load unchanged with ``safetensors.safe_open`` (tested).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import weakref
from collections import Counter
from json.encoder import encode_basestring  # json.dumps' own escaping of a str (ensure_ascii=False)
from typing import Callable, Mapping

from ..errors import LoraBridgeError
from ..tensor import DTYPES, FileSpan, Tensor
from .atomic import atomic_write
from .input_file import map_input, source_of
from .json_safe import load_json
from .zero_copy import write_tensors

MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors format sets
PAGE_BYTES = 4096  # the page cache's unit: a kernel copy between equal places within pages moves whole pages

_Entry = tuple[str, tuple[int, ...], int, int]  # dtype, shape, begin and end in the data region
# Headers already parsed and checked, by the map they came from: inside held_inputs a file is mapped once
# however often it is opened, and detecting a format, reading it and summing up an output each open it
# (a 2,000-tensor header costs ~20 ms to parse and check). Maps outside held_inputs are new each time.
_parsed: weakref.WeakKeyDictionary[mmap.mmap, tuple[dict[str, str], dict[str, _Entry], int]] = weakref.WeakKeyDictionary()


def _is_count(value) -> bool:
    """A JSON integer usable as a dimension or offset: not a bool (``true`` is an int to Python) and below 2**63."""
    return type(value) is int and 0 <= value < 2**63


class SafetensorsFile:
    """A memory-mapped safetensors file: ``metadata`` (str -> str) and tensors by name.

    Example:
        >>> f = SafetensorsFile("lora.safetensors")   # doctest: +SKIP
        >>> f.metadata.get("format"), len(f)   # doctest: +SKIP
        ('pt', 1120)
    """

    def __init__(self, path: str | os.PathLike):
        self.path, mapped, size = map_input(path)
        if mapped is None or size < 8:  # None: an empty file
            raise LoraBridgeError(f"truncated: {size} bytes, a safetensors file has at least 8", path)
        self._map = mapped
        self._source = source_of(mapped)
        parsed = _parsed.get(mapped) if isinstance(mapped, mmap.mmap) else None
        if parsed is None:
            parsed = self._parse_header(size)
            if isinstance(mapped, mmap.mmap):
                _parsed[mapped] = parsed
        metadata, self._entries, self.data_start = parsed
        self.metadata: dict[str, str] = dict(metadata)  # the caller's own: changing it changes no other reader's
        self.data_size = size - self.data_start

    def _parse_header(self, size: int) -> tuple[dict[str, str], dict[str, _Entry], int]:
        """(metadata, entries by name, where the data starts), every entry checked against the data region."""
        path = self.path
        (header_len,) = struct.unpack("<Q", self._map[:8])
        if header_len > MAX_HEADER_BYTES:
            raise LoraBridgeError(f"header claims {header_len} bytes, over the {MAX_HEADER_BYTES} limit", path)
        if 8 + header_len > size:
            raise LoraBridgeError(f"truncated: header claims {header_len} bytes, file has {size - 8}", path)
        header = load_json(self._map[8:8 + header_len], "header", path)
        if not isinstance(header, dict):
            raise LoraBridgeError("header is not a JSON object", path)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise LoraBridgeError("__metadata__ must map strings to strings", path)
        data_size = size - 8 - header_len
        return metadata, {name: self._check_entry(name, entry, data_size) for name, entry in header.items()}, 8 + header_len

    def _check_entry(self, name: str, entry, data_size: int) -> _Entry:
        """(dtype, shape, begin, end) of one header entry, checked: a known dtype, a shape of counts, offsets that
        span exactly its bytes within the data region. Runs once per tensor of every file opened (1,680 for a kohya
        SDXL LoRA), so the checks are plain type tests, and the tensor's name is spelled only into an error."""
        try:
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError):  # not an object, or a key missing
            raise self._entry_error(name, "header entry needs dtype, shape and data_offsets") from None
        if type(dtype) is not str or dtype not in DTYPES:  # a list or an object would be unhashable
            raise self._entry_error(name, f"unknown dtype {dtype!r}")
        if type(shape) is not list or not all(map(_is_count, shape)):
            raise self._entry_error(name, f"shape must be a list of non-negative integers, got {shape!r}")
        if (type(offsets) is not list or len(offsets) != 2 or not (_is_count(offsets[0]) and _is_count(offsets[1]))
                or offsets[0] > offsets[1]):
            raise self._entry_error(name, f"bad data_offsets {offsets!r}")
        begin, end = offsets
        need = DTYPES[dtype][0]
        for dim in shape:
            need *= dim
        if end - begin != need:
            raise self._entry_error(name, f"{dtype}{shape} needs {need} bytes, offsets span {end - begin}")
        if end > data_size:
            raise self._entry_error(name, f"data ends at byte {end} but the file holds {data_size} (truncated?)")
        return dtype, tuple(shape), begin, end

    def _entry_error(self, name: str, problem: str) -> LoraBridgeError:
        return LoraBridgeError(f"tensor {name!r}: {problem}", self.path)

    def layout_problem(self) -> str | None:
        """Gaps, overlaps or bytes after the last tensor in the data region, as the safetensors library refuses them.

        Each tensor must start where the previous one (in offset order) ends and the last must end the file.
        """
        position = 0
        for name, (_, _, begin, end) in sorted(self._entries.items(), key=lambda item: item[1][2:]):
            if begin != position:
                what = "gap" if begin > position else "overlap"
                return f"tensor {name!r} starts at data byte {begin}, the previous tensor ends at {position} ({what})"
            position = end
        if position != self.data_size:
            return f"{self.data_size - position} byte(s) after the last tensor's data (trailing bytes)"
        return None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def header_entry(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(dtype, shape) of a tensor without touching its data."""
        dtype, shape, _, _ = self._entries[name]
        return dtype, shape

    def tensor(self, name: str) -> Tensor:
        """A zero-copy view of one tensor's bytes, with where they lie in the file when it is mapped
        (writers then copy them in the kernel: :mod:`.zero_copy`)."""
        dtype, shape, begin, end = self._entries[name]
        view = memoryview(self._map)[self.data_start + begin:self.data_start + end]
        return Tensor(dtype, shape, view, FileSpan(self._source, self.data_start + begin) if self._source else None)

    def tensors(self) -> dict[str, Tensor]:
        return {name: self.tensor(name) for name in self._entries}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read every tensor (zero-copy views) and the metadata.

    Example:
        >>> tensors, metadata = read_safetensors("lora.safetensors")   # doctest: +SKIP
    """
    handle = SafetensorsFile(path)
    return handle.tensors(), handle.metadata


def _compact_json(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _padding(data_start: int, shifts: Counter[int]) -> int:
    """Spaces to end the header with (JSON allows them; the safetensors library pads to 8 bytes too): the data
    8-byte aligned and, where most of its bytes come from an input file, at the same place within a page as
    there, so that the kernel copies them page by page (a 784 MB copy, flushed as it goes, measured 1.63 ->
    1.38 s when aligned so). Costs at most 4 KiB of spaces; the bytes of every tensor are unchanged.
    ``shifts``: (input offset - output offset) within a page -> bytes of input tensors at that shift.
    """
    shift = shifts.most_common(1)[0][0] if shifts else None
    if shift is None or shift % 8:  # nothing copied, or the input keeps its data off 8-byte boundaries
        return -data_start % 8
    return (shift - data_start) % PAGE_BYTES


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor],
                      metadata: Mapping[str, str] | None = None, progress=None,
                      late: Mapping[str, Callable[[], str]] | None = None) -> None:
    """Write tensors (in the given order) and metadata atomically, streaming tensor by tensor.

    ``progress``, if given, is called with the byte count of each tensor written. ``late`` maps
    placeholder text in ``metadata`` values to a callable giving the final text (of the same length),
    called once the tensor data is written: a value computed from the data while it is being written,
    such as a hash, costs no second pass over it. Each placeholder must occur exactly once in the header.
    Tensors that lie unchanged in an input file are copied from it in the kernel, the others written
    from memory (:func:`~lorabridge.io.zero_copy.write_tensors`: back-to-back input tensors in one copy).

    Example:
        >>> write_safetensors("out.safetensors", {"w": Tensor.from_numpy(np.zeros(3, "f4"))})   # doctest: +SKIP
    """
    if "__metadata__" in tensors:
        raise ValueError("a tensor cannot be named __metadata__: safetensors keeps that key for the metadata")
    entries = []  # the header's JSON, built entry by entry: json.dumps of 1,120 tensor dicts took 4.5 ms, this 2-3
    if metadata:
        entries.append('"__metadata__":' + _compact_json({str(k): str(v) for k, v in metadata.items()}))
    offset = 0
    shifts: Counter[int] = Counter()  # see _padding
    described: dict[tuple[str, tuple[int, ...]], str] = {}  # (dtype, shape) -> its JSON up to the offsets
    for name, tensor in tensors.items():
        nbytes = tensor.nbytes
        description = described.get((tensor.dtype, tensor.shape))
        if description is None:
            description = described[tensor.dtype, tensor.shape] = (
                ':{"dtype":' + _compact_json(tensor.dtype) + ',"shape":' + _compact_json(list(tensor.shape))
                + ',"data_offsets":[')
        entries.append(f"{encode_basestring(name)}{description}{offset},{offset + nbytes}]}}")
        if tensor.source is not None:
            shifts[(tensor.source.offset - offset) % PAGE_BYTES] += nbytes
        offset += nbytes
    raw = ("{" + ",".join(entries) + "}").encode("utf-8")
    raw += b" " * _padding(8 + len(raw), shifts)
    patches = {}
    for placeholder, final in (late or {}).items():
        needle = placeholder.encode("utf-8")
        if raw.count(needle) != 1:
            raise ValueError(f"placeholder {placeholder!r} occurs {raw.count(needle)} times in the header, not once")
        patches[8 + raw.index(needle)] = (needle, final)
    with atomic_write(path) as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for tensor in write_tensors(out, tensors.values()):
            if progress is not None:
                progress(tensor.nbytes)
        for position, (needle, final) in patches.items():
            text = final().encode("utf-8")
            if len(text) != len(needle):
                raise ValueError(f"late metadata {text!r} is not as long as its placeholder {needle!r}")
            out.seek(position)
            out.write(text)
