"""What a written file holds, read back from its headers: tensor count, dtypes, tensor bytes, file bytes.

A conversion summary describes the file written, not the model it came from: writers cast
(``--dtype``), add tensors (kohya's ``.alpha``) or merge them (bigG's fused q/k/v), so only the
output itself says what it holds. Reading back costs a header (safetensors), a walk over the
records (MindSpore ``.ckpt``) or a memory-mapped load (torch pickles): never a pass over the data
beyond a ``.ckpt``'s CRC check.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..tensor import DTYPES


@dataclass
class FileContents:
    """Tensors of one output (a file, or every safetensors file under a directory such as a PEFT adapter)."""

    tensors: int = 0
    tensor_bytes: int = 0
    file_bytes: int = 0
    dtypes: Counter = field(default_factory=Counter)  # dtype (safetensors name) -> tensor count

    def add(self, dtype: str, shape: tuple[int, ...]) -> None:
        self.tensors += 1
        self.tensor_bytes += math.prod(shape) * DTYPES[dtype][0]
        self.dtypes[dtype] += 1


def _headers(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of every tensor in one file, from whichever container it is."""
    from .ms_ckpt import MsCheckpointFile, is_ms_checkpoint
    from .safetensors_file import SafetensorsFile
    from .torch_file import container_of, read_torch_file

    container = container_of(path)
    if container == "safetensors":  # MindSpore's safetensors files too
        handle = SafetensorsFile(path)
        return [handle.header_entry(name) for name in handle.keys()]
    if container in ("torch-zip", "torch-legacy"):
        return [(t.dtype, t.shape) for t in read_torch_file(path)[0].values()]
    if is_ms_checkpoint(path):
        ckpt = MsCheckpointFile(path)
        return [ckpt.header_entry(tag) for tag in ckpt.keys()]
    return []


def file_contents(path: str | os.PathLike) -> FileContents:
    """What the file (or directory of files) at ``path`` holds; files that hold no tensors count only in bytes.

    Example:
        >>> file_contents("lora_kohya.safetensors")   # doctest: +SKIP
        FileContents(tensors=1680, tensor_bytes=11624448, file_bytes=11820213, dtypes=Counter({'F16': 1680}))
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    contents = FileContents()
    for file in files:
        contents.file_bytes += file.stat().st_size
        for dtype, shape in _headers(file):
            contents.add(dtype, shape)
    return contents
