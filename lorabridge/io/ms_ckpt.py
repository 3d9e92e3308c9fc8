"""Read and write MindSpore ``.ckpt`` checkpoints without MindSpore.

Why not ``mindspore.load_checkpoint``: it needs MindSpore installed, reads the
whole file into memory and parses it as one protobuf message (so a big file is
held twice), and it raises generic errors. This module memory-maps the file,
walks its records with a small bounds-checked protobuf reader (``io/protobuf_wire.py``) and returns
zero-copy :class:`~lorabridge.tensor.Tensor` views; every problem is a
one-line :class:`~lorabridge.errors.LoraBridgeError` naming the file.

The container, as ``mindspore.save_checkpoint`` 2.10 writes it (byte-identity
with MindSpore's own output is tested in ``tests/test_ms_ckpt_mindspore.py``)::

    file        = record* [b"crc_num" + crc32(all records) as 10 big-endian bytes]
    record      = one serialized Checkpoint message holding one Value:
                  0x0a, varint length, Value
    Value       = {1: tag (string), 2: TensorProto | 3: MapTensorProto}
    TensorProto = {1: dims (repeated int64), 2: tensor_type (string), 3: tensor_content (bytes)}

A tensor over 512 MiB is written as consecutive records with the same tag and
the full dims, each holding the next slice of the bytes. Text entries
(``append_dict`` strings) have tensor_type ``"str"`` and UTF-32 content.
MindSpore's safetensors checkpoints are ``io/ms_safetensors.py``.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple

from ..errors import LoraBridgeError
from ..tensor import DTYPES, FileSpan, Tensor
from .atomic import atomic_write
from .input_file import map_input, source_of
from .ms_dtypes import MS_STR_TYPE, MS_TO_SAFETENSORS, MS_UNSUPPORTED, SAFETENSORS_TO_MS
from .protobuf_wire import Malformed, encode_varint, len_field, parse_message, text, varint
from .streaming import release_pages
from .zero_copy import READ_CHUNK_BYTES, chunks, write_tensor

CHUNK_BYTES = 512 * 1024 * 1024  # save_checkpoint splits a tensor's bytes into records of at most this size
CRC_MAGIC = b"crc_num"
RELEASE_STRIDE = 16 * 1024 * 1024  # whole-file passes (record walk, CRC) let mapped pages go every this many bytes
CRC_TRAILER_BYTES = len(CRC_MAGIC) + 10

# First 4 bytes (little-endian uint32) of a file written by save_checkpoint(enc_key=..., enc_mode=...);
# the magic numbers of mindspore/core/utils/crypto.h.
ENCRYPTION_MAGIC: dict[int, str] = {0x7F3A5ED8: "AES-GCM", 0x7F3A5ED9: "AES-CBC", 0x7F3A5EDA: "SM4-CBC"}

# Leading bytes of files that get handed over instead of a MindSpore checkpoint.
FOREIGN_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "this is a PyTorch checkpoint (zip archive), not a MindSpore one"),
    (b"\x80\x02", "this is a PyTorch checkpoint (pickle), not a MindSpore one"),
    (b"\x80\x03", "this is a PyTorch checkpoint (pickle), not a MindSpore one"),
    (b"\x80\x04", "this is a PyTorch checkpoint (pickle), not a MindSpore one"),
    (b"\x80\x05", "this is a PyTorch checkpoint (pickle), not a MindSpore one"),
)

# ---------------------------------------------------------------- the Checkpoint messages (protobuf_wire schemas)

_RECORD_KEY = 0x0A  # Checkpoint field 1 (value), length-delimited

# Message schemas: field number -> (name, kind). "bytes" fields are length-delimited and singular;
# "varints" fields are repeated integers, plain or packed. Unknown fields are skipped, as protobuf does.
_VALUE_FIELDS = {1: ("tag", "bytes"), 2: ("tensor", "bytes"), 3: ("maptensor", "bytes")}
_TENSOR_FIELDS = {1: ("dims", "varints"), 2: ("tensor_type", "bytes"), 3: ("tensor_content", "bytes")}


# ---------------------------------------------------------------- records


class _Record(NamedTuple):  # tuples, not frozen dataclasses: one of each per tensor, ~2.7x cheaper to make
    offset: int
    tag: str
    tensor_type: str
    dims: tuple[int, ...]
    content: tuple[int, int]


class _Unlike(Exception):
    """The record is not laid out as ``save_checkpoint`` lays one out: :func:`_record_by_fields` decides."""


def _expect(condition: bool) -> None:
    if not condition:
        raise _Unlike


def _text_followed_by(buf, pos: int, stop: int, key: int) -> tuple[str, int]:
    """The length-prefixed UTF-8 text at ``pos`` and the offset just past it, where the next field's ``key``
    is, before ``stop``."""
    length, at = varint(buf, pos, stop)
    end = at + length
    _expect(end < stop and buf[end] == key)
    return bytes(buf[at:end]).decode("utf-8"), end


def _record_as_saved(buf, pos: int, end: int) -> tuple[_Record, int] | None:
    """The record at ``pos`` if it is laid out exactly as ``save_checkpoint`` writes one, else None.

    Why: the generic walk (:func:`protobuf_wire.parse_message`, twice per record) is most of the cost
    of reading a small LoRA's ~1,000 records. MindSpore writes the fields of a record in one order,
    each once: ``0a len | 0a len tag | 12 len | (08 dim)* 12 len type 1a len content``. This reads that
    order with direct byte tests; anything else (other order, packed dims, unknown or repeated fields,
    a bad length, a negative dim, bad UTF-8) returns None and :func:`_record_by_fields` decides, with its
    errors. Where both read a record, they agree (tested on random and damaged records).
    """
    try:
        _expect(buf[pos] == _RECORD_KEY)
        length, body = varint(buf, pos + 1, end)
        stop = body + length
        _expect(stop <= end and buf[body] == 0x0A)
        tag, at = _text_followed_by(buf, body + 1, stop, 0x12)
        tensor_len, at = varint(buf, at + 1, stop)
        _expect(at + tensor_len == stop)
        dims = []
        while buf[at] == 0x08:
            dim, at = varint(buf, at + 1, stop)
            _expect(not dim >> 63)  # negative as int64: the by-fields parser names it
            dims.append(dim)
        _expect(buf[at] == 0x12)
        tensor_type, at = _text_followed_by(buf, at + 1, stop, 0x1A)
        content_len, at = varint(buf, at + 1, stop)
        _expect(at + content_len == stop)
        return _Record(pos, tag, tensor_type, tuple(dims), (at, stop)), stop
    except (_Unlike, Malformed, IndexError, UnicodeDecodeError):
        return None


def _parse_record(buf, pos: int, end: int) -> tuple[_Record, int]:
    """Parse the record at ``pos``; return it and the offset just past it. Content is not touched."""
    return _record_as_saved(buf, pos, end) or _record_by_fields(buf, pos, end)


def _record_by_fields(buf, pos: int, end: int) -> tuple[_Record, int]:
    """:func:`_parse_record` for any valid layout, by the protobuf schemas; every problem a :class:`Malformed`."""
    if buf[pos] != _RECORD_KEY:
        raise Malformed(f"expected a checkpoint record (byte 0x0a), found 0x{buf[pos]:02x}", pos)
    length, body = varint(buf, pos + 1, end)
    if length > end - body:
        raise Malformed(f"record claims {length} bytes but only {end - body} remain (truncated file?)", pos)
    stop = body + length
    value = parse_message(buf, body, stop, _VALUE_FIELDS, "Value")
    if "tag" not in value:
        raise Malformed("record has no tag", pos)
    tag = text(buf, value["tag"], "tag", pos)
    if "maptensor" in value:
        raise Malformed(f"{tag!r} is a map tensor (MapParameter, a hash-table embedding), not supported", pos)
    if "tensor" not in value:
        raise Malformed(f"record {tag!r} holds no tensor", pos)
    span: tuple[int, int] = value["tensor"]
    tensor = parse_message(buf, *span, _TENSOR_FIELDS, "TensorProto")
    for required in ("tensor_type", "tensor_content"):
        if required not in tensor:
            raise Malformed(f"record {tag!r} has no {required}", pos)
    dims = tuple(d - (1 << 64) if d >> 63 else d for d in tensor.get("dims", ()))
    if any(d < 0 for d in dims):
        raise Malformed(f"record {tag!r} has a negative dimension in {list(dims)}", pos)
    tensor_type = text(buf, tensor["tensor_type"], "tensor_type", pos)
    return _Record(pos, tag, tensor_type, dims, tensor["tensor_content"]), stop


def _human(nbytes: float) -> str:
    """A byte count for a message, in decimal units up to PB.

    Example:
        >>> _human(999), _human(1500), _human(2.5e15), _human(3e18)
        ('999 bytes', '1.5 KB', '2.5 PB', '3000.0 PB')
    """
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} PB"


def _needed_bytes(dims: tuple[int, ...], itemsize: int, limit: int) -> int | None:
    """dims product times itemsize, or None as soon as it exceeds ``limit`` (never builds a huge number)."""
    if 0 in dims:
        return 0
    need = itemsize
    for dim in dims:
        need *= dim
        if need > limit:
            return None
    return need


class _Entry(NamedTuple):
    """One tensor or text entry: its records' content spans, joined in order."""

    tag: str
    tensor_type: str
    shape: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    offset: int


def _entry(group: list[_Record], file_size: int) -> _Entry:
    """Check a run of same-tag records (one tensor, possibly chunked) and describe it."""
    first = group[0]
    where = f"{first.tag!r}"
    for record in group[1:]:
        if (record.tensor_type, record.dims) != (first.tensor_type, first.dims):
            raise Malformed(f"chunks of {where} disagree: {first.tensor_type}{list(first.dims)} then "
                             f"{record.tensor_type}{list(record.dims)}", record.offset)
    spans = tuple(record.content for record in group)
    held = spans[0][1] - spans[0][0] if len(spans) == 1 else sum(end - begin for begin, end in spans)
    if first.tensor_type == MS_STR_TYPE:
        return _Entry(first.tag, MS_STR_TYPE, (), spans, first.offset)
    if first.tensor_type in MS_UNSUPPORTED:
        reason = MS_UNSUPPORTED[first.tensor_type]
        raise Malformed(f"{where} has tensor_type {first.tensor_type}: {reason}", first.offset)
    if first.tensor_type not in MS_TO_SAFETENSORS:
        raise Malformed(f"{where} has unknown tensor_type {first.tensor_type!r}", first.offset)
    dtype = MS_TO_SAFETENSORS[first.tensor_type]
    itemsize = DTYPES[dtype][0]
    shape = first.dims
    if shape == (0,) and held == itemsize:  # MindSpore reads dims [0] with one element as a scalar
        shape = ()
    need = _needed_bytes(shape, itemsize, file_size)
    if need is None:
        wanted = _human(math.prod(float(d) for d in shape) * itemsize)
        raise Malformed(f"{where}: dims {list(shape)} ({first.tensor_type}) need {wanted}, more than the whole "
                         f"file ({file_size} bytes)", first.offset)
    if need != held:
        chunks = f" in {len(group)} records" if len(group) > 1 else ""
        raise Malformed(f"{where}: dims {list(shape)} ({first.tensor_type}) need {need} bytes but the content "
                         f"holds {held}{chunks}", first.offset)
    return _Entry(first.tag, dtype, shape, spans, first.offset)


def _scan(buf, size: int) -> tuple[list[_Entry], int | None]:
    """All entries in file order, and the offset of the CRC trailer (None without one)."""
    groups: list[list[_Record]] = []
    pos = released = 0
    while pos < size:
        if size - pos == CRC_TRAILER_BYTES and buf[pos:pos + len(CRC_MAGIC)] == CRC_MAGIC:
            return [_entry(group, size) for group in groups], pos
        record, pos = _parse_record(buf, pos, size)
        if pos - released >= RELEASE_STRIDE:  # reading a record's head maps the pages around it
            release_pages(memoryview(buf)[released:pos])
            released = pos
        if groups and groups[-1][0].tag == record.tag:
            groups[-1].append(record)
        else:
            groups.append([record])
    return [_entry(group, size) for group in groups], None


def _refuse_foreign(buf, size: int, path: Path) -> None:
    """Name the format of files that are clearly not plain MindSpore checkpoints."""
    head = bytes(buf[:8])
    if size >= 4 and struct.unpack("<I", head[:4])[0] in ENCRYPTION_MAGIC:
        mode = ENCRYPTION_MAGIC[struct.unpack("<I", head[:4])[0]]
        raise LoraBridgeError(f"this MindSpore checkpoint is encrypted ({mode}); decrypt it with MindSpore "
                              "(load_checkpoint with dec_key and dec_mode) and save it unencrypted first", path)
    for signature, message in FOREIGN_SIGNATURES:
        if head.startswith(signature):
            raise LoraBridgeError(message, path)
    if size >= 10 and struct.unpack("<Q", head)[0] <= size - 8 and buf[8] == ord("{"):
        raise LoraBridgeError("this is a safetensors file, not a MindSpore .ckpt (use read_ms_safetensors)", path)


class MsCheckpointFile:
    """A memory-mapped MindSpore ``.ckpt``: tensors by tag (file order) and text entries as ``metadata``.

    Opening checks the whole structure (every record, dtype and size, and the CRC
    trailer if there is one) before any tensor is handed out; tensors are then
    zero-copy views into the mapping.

    Example:
        >>> ckpt = MsCheckpointFile("lora.ckpt")   # doctest: +SKIP
        >>> ckpt.header_entry(ckpt.keys()[0]), ckpt.has_crc   # doctest: +SKIP
        (('F32', (4, 640)), False)
    """

    def __init__(self, path: str | os.PathLike):
        self.path, mapped, size = map_input(path)
        if mapped is None:
            raise LoraBridgeError("empty file (0 bytes), not a MindSpore checkpoint", self.path)
        self._map = mapped
        self._source = source_of(mapped)
        _refuse_foreign(self._map, size, self.path)
        try:
            entries, trailer = _scan(self._map, size)
        except Malformed as exc:
            raise LoraBridgeError(f"{exc} (at byte {exc.offset})", self.path) from None
        self.has_crc = trailer is not None
        if trailer is not None:
            self._check_crc(trailer)
        release_pages(memoryview(self._map))  # the walk (and CRC) touched every record: let those pages go
        self._entries: dict[str, _Entry] = {}
        self.metadata: dict[str, str] = {}
        for entry in entries:
            if entry.tag in self._entries or entry.tag in self.metadata:
                raise LoraBridgeError(f"tag {entry.tag!r} appears twice, the second time at byte {entry.offset}",
                                      self.path)
            if entry.tensor_type == MS_STR_TYPE:
                self.metadata[entry.tag] = self._decode_text(entry)
            else:
                self._entries[entry.tag] = entry

    def _check_crc(self, trailer: int) -> None:
        stored = int.from_bytes(self._map[trailer + len(CRC_MAGIC):trailer + CRC_TRAILER_BYTES], "big")
        view, actual = memoryview(self._map), 0
        for start in range(0, trailer, RELEASE_STRIDE):
            piece = view[start:min(start + RELEASE_STRIDE, trailer)]
            actual = zlib.crc32(piece, actual)
            release_pages(piece)
        if stored != actual:
            raise LoraBridgeError(f"CRC mismatch: the trailer says {stored:#010x} but the records hash to "
                                  f"{actual:#010x}; the file is damaged", self.path)

    def _decode_text(self, entry: _Entry) -> str:
        raw = b"".join(self._map[begin:end] for begin, end in entry.spans)
        try:
            if len(raw) % 4:
                raise UnicodeDecodeError("utf-32-le", raw, 0, len(raw), "length is not a multiple of 4")
            return raw.decode("utf-32-le").rstrip("\x00")  # numpy's str dtype, which MindSpore uses, drops NULs
        except UnicodeDecodeError:
            raise LoraBridgeError(f"text entry {entry.tag!r} is not valid UTF-32 (at byte {entry.offset})",
                                  self.path) from None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, tag: str) -> bool:
        return tag in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def header_entry(self, tag: str) -> tuple[str, tuple[int, ...]]:
        """(dtype, shape) of a tensor without touching its data."""
        entry = self._entries[tag]
        return entry.tensor_type, entry.shape

    def tensor(self, tag: str) -> Tensor:
        """A zero-copy view of one tensor (a chunked tensor is joined, its only copy)."""
        entry = self._entries[tag]
        view = memoryview(self._map)
        if len(entry.spans) == 1:  # with where it lies in the file, for a copy in the kernel (:mod:`.zero_copy`)
            begin, end = entry.spans[0]
            return Tensor(entry.tensor_type, entry.shape, view[begin:end], FileSpan(self._source, begin) if self._source else None)
        return Tensor(entry.tensor_type, entry.shape, b"".join(view[begin:end] for begin, end in entry.spans))

    def items(self) -> Iterator[tuple[str, Tensor]]:
        """(tag, tensor) in file order, one tensor at a time."""
        for tag in self._entries:
            yield tag, self.tensor(tag)


def iter_ms_tags(path: str | os.PathLike) -> Iterator[str]:
    """Tags of a ``.ckpt`` in file order (text entries too), each record parsed only when asked for.

    For cheap detection: a caller that stops after the first LoRA tag reads one record, not the
    file; nothing after the records read is checked (no CRC). A malformed record raises
    :class:`LoraBridgeError` when reached.

    Example:
        >>> next(iter_ms_tags("lora.ckpt"))   # doctest: +SKIP
        'model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_A.weight'
    """
    path, buf, size = map_input(path)
    pos = 0
    while buf is not None and pos < size:
        if size - pos == CRC_TRAILER_BYTES and buf[pos:pos + len(CRC_MAGIC)] == CRC_MAGIC:
            return
        try:
            record, pos = _parse_record(buf, pos, size)
        except Malformed as exc:
            raise LoraBridgeError(f"{exc} (at byte {exc.offset})", path) from None
        yield record.tag


def iter_ms_checkpoint(path: str | os.PathLike) -> Iterator[tuple[str, Tensor]]:
    """Stream (tag, tensor) pairs of a ``.ckpt`` in file order; text entries are skipped
    (see :class:`MsCheckpointFile` ``.metadata`` or :func:`read_ms_checkpoint`).

    The file is checked completely (structure and CRC) before the first pair is produced.

    Example:
        >>> for tag, tensor in iter_ms_checkpoint("lora.ckpt"):   # doctest: +SKIP
        ...     print(tag, tensor.dtype, tensor.shape)
    """
    yield from MsCheckpointFile(path).items()


def read_ms_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors by tag (file order, zero-copy views) and the text entries as metadata.

    Example:
        >>> tensors, metadata = read_ms_checkpoint("lora.ckpt")   # doctest: +SKIP
    """
    ckpt = MsCheckpointFile(path)
    return dict(ckpt.items()), dict(ckpt.metadata)


def is_ms_checkpoint(path: str | os.PathLike) -> bool:
    """Cheap sniff: the first record parses as a Checkpoint Value, or the file carries MindSpore's
    encryption magic (so that reading it says "encrypted" rather than "unknown format").

    Example:
        >>> is_ms_checkpoint("lora.ckpt")   # doctest: +SKIP
        True
    """
    try:
        _, buf, size = map_input(path)
    except LoraBridgeError:
        return False
    if buf is None:
        return False
    if size >= 4 and struct.unpack("<I", buf[:4])[0] in ENCRYPTION_MAGIC:
        return True
    try:
        _parse_record(buf, 0, size)
    except Malformed:
        return False
    return True


def _text_content(value: str) -> bytes:
    """UTF-32 code units as numpy stores a str array, which is what save_checkpoint writes ("" is one NUL)."""
    return value.encode("utf-32-le") or b"\x00\x00\x00\x00"


def _record_head(tag: bytes, dims: tuple[int, ...], tensor_type: bytes, content_len: int) -> bytes:
    """Everything of a record up to its content, which is the record's last field."""
    tensor = b"".join(b"\x08" + encode_varint(d) for d in dims)
    tensor += len_field(2, len(tensor_type)) + tensor_type + len_field(3, content_len)
    tensor_len = len(tensor) + content_len
    value = len_field(1, len(tag)) + tag + len_field(2, tensor_len)
    return len_field(1, len(value) + tensor_len) + value + tensor


def _encoded_records(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Iterator[tuple[bytes, Tensor]]:
    """(record head, content as U8 bytes) pairs in file order: tensors in chunks of CHUNK_BYTES, then text
    entries. A chunk of a tensor lying unchanged in an input file keeps its place there (:mod:`.zero_copy`)."""
    for name, tensor in tensors.items():
        data = memoryview(tensor.data).cast("B")
        tensor_type = SAFETENSORS_TO_MS[tensor.dtype].encode("ascii")
        for start in range(0, max(len(data), 1), CHUNK_BYTES):
            chunk = data[start:start + CHUNK_BYTES]
            span = FileSpan(tensor.source.file, tensor.source.offset + start) if tensor.source else None
            yield _record_head(name.encode("utf-8"), tensor.shape, tensor_type, len(chunk)), Tensor("U8", (len(chunk),), chunk, span)
    for key, value in metadata.items():
        content = _text_content(value)
        yield _record_head(key.encode("utf-8"), (0,), MS_STR_TYPE.encode("ascii"), len(content)), Tensor("U8", (len(content),), content)


def _check_writable(path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    if not tensors and not metadata:
        raise LoraBridgeError("refusing to write an empty checkpoint (no tensors, no metadata)", path)
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_TO_MS:
            raise LoraBridgeError(f"tensor {name!r}: MindSpore checkpoints cannot hold {tensor.dtype} tensors", path)
        if tensor.shape == (0,):
            raise LoraBridgeError(f"tensor {name!r} has shape (0,), which MindSpore reads back as a scalar", path)
        if name in metadata:
            raise LoraBridgeError(f"{name!r} is both a tensor and a metadata key", path)
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise LoraBridgeError(f"metadata {key!r} must be a string, got {type(value).__name__}", path)
        if value.endswith("\x00"):
            raise LoraBridgeError(f"metadata {key!r} ends with a NUL character, which MindSpore drops", path)
    for name in [*tensors, *metadata]:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise LoraBridgeError(f"name {name!r} cannot be encoded as UTF-8", path) from None


def write_ms_checkpoint(path: str | os.PathLike, tensors: Mapping[str, Tensor],
                        metadata: Mapping[str, str] | None = None, crc: bool = False,
                        progress: Callable[[int], object] | None = None) -> None:
    """Write tensors (in the given order), then metadata as text entries, atomically.

    The bytes are those ``mindspore.save_checkpoint`` writes for the same parameters
    (tensors over 512 MiB split into same-tag records; with ``crc=True`` the
    ``crc_num`` trailer). One difference: MindSpore drops tensors with no elements,
    this writes them (``load_checkpoint`` reads them back). ``progress``, if given,
    is called with the byte count of each record's content.

    Example:
        >>> write_ms_checkpoint("lora.ckpt", {"w": Tensor.from_numpy(np.zeros(3, "f4"))}, crc=True)   # doctest: +SKIP
    """
    metadata = dict(metadata or {})
    _check_writable(path, tensors, metadata)
    checksum, buffer = 0, bytearray(READ_CHUNK_BYTES if crc else 0)
    with atomic_write(path) as out:
        for head, content in _encoded_records(tensors, metadata):
            out.write(head)
            if crc:
                checksum = zlib.crc32(head, checksum)
                for piece in chunks(content, buffer):
                    checksum = zlib.crc32(piece, checksum)
            write_tensor(out, content)
            if progress is not None:
                progress(content.nbytes)
        if crc:
            out.write(CRC_MAGIC + checksum.to_bytes(10, "big"))


