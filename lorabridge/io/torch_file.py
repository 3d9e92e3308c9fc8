"""PyTorch-world state-dict files: ``.safetensors`` and torch pickles (``.bin``/``.pt``/``.ckpt``).

A torch pickle can run arbitrary code when loaded, so this module reads one
only through ``torch.load(weights_only=True)``: PyTorch's restricted unpickler
accepts tensors and plain containers and refuses any other global *before*
calling it. A refused pickle becomes a one-line :class:`LoraBridgeError`;
nothing in the file runs. Zip-format files (everything ``torch.save`` wrote
since PyTorch 1.6) are memory-mapped, so tensors are views, not copies.
Which container a file is comes from its first bytes, never its extension
(MindSpore also writes ``.ckpt`` files).
"""

from __future__ import annotations

import os
import pickle
import struct
import warnings
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from ..errors import LoraBridgeError
from ..tensor import Tensor
from .atomic import atomic_write
from .input_file import check_regular, hold, holding_inputs, open_regular
from .json_safe import is_unicode as _is_unicode
from .safetensors_file import SafetensorsFile, write_safetensors

# torch dtype name (str(torch.float32) without "torch.") -> safetensors dtype name
TORCH_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
TORCH_DTYPE_NAMES = {name: torch_name for torch_name, name in TORCH_DTYPES.items()}
# Containers whose tensors would otherwise hide one level down.
NESTED_STATE_DICT_KEYS = ("state_dict", "module")
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def container_of(path: str | os.PathLike) -> str | None:
    """``"safetensors"``, ``"torch-zip"``, ``"torch-legacy"`` or None, from the file's first bytes.

    Example:
        >>> container_of("pytorch_lora_weights.safetensors")   # doctest: +SKIP
        'safetensors'
    """
    try:
        fd = open_regular(path)
    except LoraBridgeError:
        return None
    try:
        head = os.pread(fd, 9, 0) if hasattr(os, "pread") else os.read(fd, 9)
        size = os.fstat(fd).st_size
    except OSError:
        return None
    finally:
        os.close(fd)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    header = struct.unpack("<Q", head[:8])[0] if len(head) == 9 and head[8:9] == b"{" else 0
    # A safetensors header of 0x0280 bytes (and the like) begins with a pickle's protocol marker; its
    # length fits the file, which a pickle's first 8 bytes read as a length never do.
    if header > 0 and not (pickled and header > size - 8):
        return "safetensors"
    if pickled:
        return "torch-legacy"  # a pickle: torch.save(..., _use_new_zipfile_serialization=False)
    return None


def _to_tensor(value) -> Tensor:
    """A lorabridge Tensor sharing memory with a CPU torch tensor (bf16/fp8 seen as raw integers)."""
    import torch

    if value.is_nested or value.layout != torch.strided:
        raise TypeError(f"a {'nested' if value.is_nested else str(value.layout).removeprefix('torch.')} tensor; "
                        "only dense (strided) tensors are LoRA weights")
    if value.device.type != "cpu":
        raise TypeError(f"a tensor on device {value.device.type!r}, not in the file's data")
    dtype = TORCH_DTYPES.get(str(value.dtype).removeprefix("torch."))
    if dtype is None:
        raise TypeError(f"unsupported tensor dtype {value.dtype}")
    value = value.detach().contiguous()
    if dtype == "BF16":
        value = value.view(torch.int16)
    elif dtype.startswith("F8"):
        value = value.view(torch.uint8)
    array = value.numpy()
    return Tensor(dtype, tuple(array.shape), memoryview(array.reshape(-1)).cast("B"))


def _refusal_reason(exc: Exception) -> str:
    """The informative part of torch's weights-only refusal (e.g. ``Unsupported global: GLOBAL os.system``)."""
    text = str(exc)
    _, found, detail = text.partition("WeightsUnpickler error:")
    detail = " ".join((detail if found else text).split("Check the documentation")[0].split(" was not an allowed")[0].split())
    return detail[:200] or type(exc).__name__


def _mappable(path: Path) -> bool:
    """Whether ``torch.load(mmap=True)`` reads the file right: a zip whose members are all stored.

    torch maps member data at its offset in the file; a deflate-compressed member (a zip rewritten by
    a zip tool, which ``torch.load(mmap=False)`` reads fine) would be mapped as compressed bytes and
    come back as garbage tensors, or fail, depending on sizes.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    except Exception:  # noqa: BLE001 - not a readable zip: torch.load (unmapped) gives the reason
        return False


def _torch_load(path: Path):
    """torch.load, weights only; memory-mapped where that is both correct (:func:`_mappable`) and safe
    (outside :func:`held_inputs`, or with the file leased there: see :mod:`.input_file`)."""
    import torch

    fd = open_regular(path)
    try:
        leased = hold(fd, path)
    finally:
        os.close(fd)
    mmap = _mappable(path) and (leased or not holding_inputs())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise LoraBridgeError("refused to load: the pickle asks for more than tensors and plain containers, "
                              f"so it could run code; nothing was executed ({_refusal_reason(exc)})", path) from None
    except Exception as exc:  # noqa: BLE001 - a malformed pickle fails in many ways (IndexError on a short stack...)
        detail = " ".join(str(exc).split())[:200] or "no detail"
        raise LoraBridgeError(f"not a readable torch file ({type(exc).__name__}: {detail})", path) from None


def _text(value, what: str, path: Path) -> str:
    """``str(value)`` for a key or scalar of the pickle, refusing what no writer could store."""
    text = str(value)  # ints are short: torch's weights-only unpickler refuses LONG4, the opcode of huge ones
    if not _is_unicode(text):
        raise LoraBridgeError(f"{what} {ascii(text)[:80]} is not valid Unicode (a lone surrogate)", path)
    return text


def _flatten(obj, path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    import torch

    if not isinstance(obj, Mapping):
        raise LoraBridgeError(f"holds a {type(obj).__name__}, expected a dict of tensors", path)
    for key in NESTED_STATE_DICT_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    tensors: dict[str, Tensor] = {}
    metadata: dict[str, str] = {}
    for key, value in obj.items():
        name = _text(key, "a key", path)
        if isinstance(value, torch.Tensor):
            try:
                tensors[name] = _to_tensor(value)
            except (TypeError, RuntimeError) as exc:
                raise LoraBridgeError(f"tensor {name!r}: {' '.join(str(exc).split())[:200]}", path) from None
        elif isinstance(value, (str, int, float, bool)):
            metadata[name] = _text(value, f"entry {name!r}", path)
    return tensors, metadata


def read_torch_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors (zero-copy where the file is memory-mapped) and scalar entries of a torch pickle.

    Only ``torch.load(weights_only=True)`` is used: a pickle that would call anything but
    PyTorch's tensor rebuilders is refused with :class:`LoraBridgeError` and runs nothing.
    A dict nested under ``state_dict`` is unwrapped; non-tensor scalars become metadata strings.

    Example:
        >>> tensors, metadata = read_torch_file("sdxl_lora_pt.ckpt")   # doctest: +SKIP
    """
    path = check_regular(path)
    if container_of(path) not in ("torch-zip", "torch-legacy"):
        raise LoraBridgeError("not a torch file (neither a torch zip archive nor a pickle)", path)
    return _flatten(_torch_load(path), path)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file or a torch pickle, whichever ``path`` is.

    Example:
        >>> tensors, metadata = read_state_dict("pytorch_lora_weights.safetensors")   # doctest: +SKIP
    """
    path = check_regular(path)
    if path.stat().st_size == 0:
        raise LoraBridgeError("empty file (0 bytes)", path)
    if container_of(path) == "safetensors":
        handle = SafetensorsFile(path)
        return handle.tensors(), handle.metadata
    return read_torch_file(path)


@lru_cache(maxsize=8)
def _cached_keys(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    if size and container_of(path) == "safetensors":  # names from the checked header: no tensor made (1,680: ~8 ms)
        handle = SafetensorsFile(check_regular(path))
        return tuple(handle.keys()), tuple(handle.metadata.items())
    tensors, metadata = read_state_dict(path)
    return tuple(tensors), tuple(metadata.items())


def state_dict_keys(path: str | os.PathLike) -> tuple[list[str], dict[str, str]] | None:
    """Tensor names and metadata of a state-dict file, or None if it is not one (for detection).

    Results are cached per (path, mtime, size): several formats' ``detect`` ask about the same file.
    """
    path = Path(path)
    if not path.is_file() or container_of(path) is None:
        return None
    stat = path.stat()
    try:
        keys, metadata = _cached_keys(os.fspath(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except LoraBridgeError:
        return None
    return list(keys), dict(metadata)


def _to_torch(tensor: Tensor):
    """A torch tensor over the same bytes, no copy (torch.save only reads it; torch warns that the
    memory-mapped buffer is read-only, which is the point)."""
    import torch

    dtype = getattr(torch, TORCH_DTYPE_NAMES[tensor.dtype])
    if not tensor.numel:
        return torch.empty(tensor.shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)


def write_torch_file(path: str | os.PathLike, tensors: Mapping[str, Tensor]) -> None:
    """``torch.save`` a plain dict of tensors (what old diffusers scripts wrote), atomically.

    Example:
        >>> write_torch_file("lora_pt.ckpt", {"w": Tensor.from_numpy(numpy.zeros(3, "f4"))})   # doctest: +SKIP
    """
    import torch

    state = {name: _to_torch(t) for name, t in tensors.items()}
    with atomic_write(path) as out:
        torch.save(state, out)


def write_state_dict(path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None,
                     progress=None) -> None:
    """Write safetensors, or a torch pickle when ``path`` ends in .bin/.pt/.pth/.ckpt (metadata then dropped)."""
    if Path(path).suffix.lower() in TORCH_SUFFIXES:
        write_torch_file(path, tensors)
        if progress is not None:
            progress(sum(t.nbytes for t in tensors.values()))
    else:
        write_safetensors(path, tensors, metadata, progress=progress)
