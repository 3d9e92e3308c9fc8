"""Read and write MindSpore's safetensors checkpoints (``save_checkpoint(..., format="safetensors")``).

The container is plain safetensors (``io/safetensors_file.py``); MindSpore adds
``{"format": "ms"}`` to the metadata, optionally a ``crc_num`` (a decimal CRC-32 over
the tensors' names and bytes, by name), and lays the tensors out in the safetensors
library's dtype order. Byte-identity with MindSpore's own output is tested in
``tests/test_ms_ckpt_mindspore.py``.
"""

from __future__ import annotations

import os
import zlib
from typing import Callable, Mapping

from ..errors import LoraBridgeError
from ..tensor import Tensor
from .safetensors_file import SafetensorsFile, write_safetensors
from .zero_copy import READ_CHUNK_BYTES, chunks

# safetensors metadata that mindspore.save_checkpoint(..., format="safetensors") writes
MS_SAFETENSORS_METADATA = {"format": "ms"}

# MindSpore writes safetensors through the safetensors library, which lays tensors out by dtype in this
# order (then by name); following it makes our files byte-identical to MindSpore's.
SAFETENSORS_LAYOUT_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
                            "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")


def _safetensors_crc(tensors: Mapping[str, Tensor]) -> int:
    """The ``crc_num`` save_checkpoint(format="safetensors", crc_check=True) stores: names and bytes, by name."""
    checksum, buffer = 0, bytearray(READ_CHUNK_BYTES)
    for name in sorted(tensors):
        checksum = zlib.crc32(name.encode("utf-8"), checksum)
        for piece in chunks(tensors[name], buffer):
            checksum = zlib.crc32(piece, checksum)
    return checksum


def _is_crc_text(text: str) -> bool:
    """A decimal CRC-32 as MindSpore writes it: ASCII digits only (``str.isdigit`` also accepts '²' or '٣',
    which ``int`` refuses), and few enough of them that ``int`` cannot hit its digit limit."""
    return text.isascii() and text.isdigit() and len(text) <= 20


def read_ms_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors checkpoint written by MindSpore, its ``crc_num`` checked.

    Metadata is returned as stored (MindSpore writes ``{"format": "ms"}``, plus ``crc_num`` with crc_check).

    Example:
        >>> tensors, metadata = read_ms_safetensors("lora.safetensors")   # doctest: +SKIP
    """
    handle = SafetensorsFile(path)
    metadata = handle.metadata
    for name in handle.keys():
        if name in metadata:  # MindSpore marks qint4x2 tensors, stored as bytes, by their name in metadata
            raise LoraBridgeError(f"tensor {name!r} is marked {metadata[name]!r} in the metadata "
                                  "(MindSpore's packed 4-bit integers), not supported", handle.path)
    tensors = handle.tensors()
    if "crc_num" in metadata:
        if not _is_crc_text(metadata["crc_num"]):
            raise LoraBridgeError(f"crc_num {metadata['crc_num']!r} in the metadata is not a number", handle.path)
        actual = _safetensors_crc(tensors)
        if int(metadata["crc_num"]) != actual:
            raise LoraBridgeError(f"CRC mismatch: the metadata says crc_num {metadata['crc_num']} but the tensors "
                                  f"hash to {actual}; the file is damaged", handle.path)
    return tensors, metadata


def write_ms_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor],
                         metadata: Mapping[str, str] | None = None, crc: bool = False,
                         progress: Callable[[int], object] | None = None) -> None:
    """Write a safetensors checkpoint as ``save_checkpoint(..., format="safetensors")`` does, atomically.

    Metadata gets ``{"format": "ms"}`` and, with ``crc=True``, MindSpore's ``crc_num``; tensors are
    laid out in the safetensors library's order, so the bytes match MindSpore's own file.
    A metadata key equal to a tensor name is refused: MindSpore's loader reads such a
    key as a dtype override for that tensor.

    Example:
        >>> write_ms_safetensors("lora.safetensors", tensors, crc=True)   # doctest: +SKIP
    """
    merged = {**MS_SAFETENSORS_METADATA, **(metadata or {})}
    for key in merged:
        if key in tensors:
            raise LoraBridgeError(f"{key!r} is both a tensor and a metadata key", path)
    if "crc_num" in merged:
        raise LoraBridgeError("metadata key 'crc_num' is reserved; pass crc=True to store a checksum", path)
    if crc:
        merged["crc_num"] = str(_safetensors_crc(tensors))
    layout = sorted(tensors, key=lambda name: (SAFETENSORS_LAYOUT_ORDER.index(tensors[name].dtype), name))
    write_safetensors(path, {name: tensors[name] for name in layout}, merged, progress)
