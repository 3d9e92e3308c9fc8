"""Framework-free tensors: dtype name, shape and raw little-endian bytes.

Conversions must be bit-exact and must work for bfloat16, which numpy cannot
represent, so tensors travel as bytes (usually a zero-copy view into a
memory-mapped file) and are turned into numpy arrays only when math is needed.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable, Mapping, MutableMapping, Protocol, Sequence

from .errors import LoraBridgeError, listed

if TYPE_CHECKING:
    import numpy as np

# safetensors dtype name -> (bytes per element, numpy dtype or None when numpy has none)
DTYPES: dict[str, tuple[int, str | None]] = {
    "F64": (8, "<f8"),
    "F32": (4, "<f4"),
    "F16": (2, "<f2"),
    "BF16": (2, None),
    "F8_E4M3": (1, None),
    "F8_E5M2": (1, None),
    "I64": (8, "<i8"),
    "I32": (4, "<i4"),
    "I16": (2, "<i2"),
    "I8": (1, "i1"),
    "U64": (8, "<u8"),
    "U32": (4, "<u4"),
    "U16": (2, "<u2"),
    "U8": (1, "u1"),
    "BOOL": (1, "?"),
}
# The dtypes a LoRA's tensors may hold (neutral spec 2): floating point. An integer or boolean factor is no LoRA
# factor (no loader multiplies one in), so readers refuse it (rules.module_findings); alphas may be integers.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
# dtype -> struct format of one little-endian element: how :func:`scalar_value` reads a single number without numpy.
SCALAR_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b",
                  "U64": "<Q", "U32": "<I", "U16": "<H", "U8": "<B", "BOOL": "<?"}
# Dtypes numpy has no type for and lorabridge no arithmetic for (to_numpy refuses them): carried bit-exactly where a
# conversion only moves bytes, refused (math_refusal) where it would compute.
NO_MATH_DTYPES = ("F8_E4M3", "F8_E5M2")
# Bytes compared per piece by Tensor.same_as: under the C library's threshold for mapping an allocation afresh.
COMPARED_BYTES = 64 * 1024


def _dtype_of_numpy(array: np.ndarray) -> str:
    import numpy as np
    wanted = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    for name, (_, np_name) in DTYPES.items():
        if np_name is not None and np.dtype(np_name) == wanted:
            return name
    raise TypeError(f"numpy dtype {array.dtype} has no safetensors name")


class FileHandle(Protocol):
    """What a :class:`FileSpan` needs of the file it points into: its name (for messages) and a readable descriptor."""

    @property
    def path(self) -> os.PathLike: ...

    def fileno(self) -> int: ...


@dataclass(frozen=True)
class FileSpan:
    """Where a tensor's bytes lie, unchanged, in an input file: the open file and the byte offset.

    A writer given a tensor with a span can have the kernel copy the bytes from file to file
    (``lorabridge/io/zero_copy.py``) instead of passing them through this process. Only readers set
    it, on views of a memory-mapped input; every transform (a cast, a merge) makes a tensor without one.
    """

    file: FileHandle
    offset: int


@dataclass(frozen=True)
class Tensor:
    """A tensor as stored on disk: ``dtype`` (safetensors name), ``shape`` and ``data`` bytes.

    Example:
        >>> t = Tensor.from_numpy(np.ones((2, 3), dtype=np.float32))
        >>> t.dtype, t.shape, t.nbytes
        ('F32', (2, 3), 24)
    """

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview
    source: FileSpan | None = field(default=None, compare=False, repr=False)  # where ``data`` lies in a file

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        expected = self.numel * DTYPES[self.dtype][0]
        if len(self.data) != expected:
            raise ValueError(f"{self.dtype}{list(self.shape)} needs {expected} bytes, got {len(self.data)}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @classmethod
    def from_numpy(cls, array: np.ndarray, dtype: str | None = None) -> "Tensor":
        """Wrap a numpy array; ``dtype="BF16"`` rounds float32 to bfloat16 (round-to-nearest-even)."""
        import numpy as np
        if dtype == "BF16":
            return cls("BF16", tuple(array.shape), float32_to_bf16_bytes(np.asarray(array, np.float32)))
        if dtype is not None:
            if DTYPES[dtype][1] is None:  # FP8: asarray(array, None) would keep the array's own dtype, unasked
                raise TypeError(f"{dtype} tensors cannot be made from numpy arrays")
            array = np.asarray(array, DTYPES[dtype][1])
        shape = tuple(np.shape(array))  # before ascontiguousarray, which turns a 0-d array into 1-d
        array = np.ascontiguousarray(array)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        return cls(_dtype_of_numpy(array), shape, array.tobytes())

    def to_numpy(self) -> np.ndarray:
        """A read-only numpy view; BF16 is widened to float32 (exactly), FP8 is refused."""
        import numpy as np
        if self.dtype == "BF16":
            raw = np.frombuffer(self.data, dtype="<u2").astype("<u4") << 16
            return raw.view("<f4").reshape(self.shape)
        np_name = DTYPES[self.dtype][1]
        if np_name is None:
            raise TypeError(f"{self.dtype} tensors cannot be turned into numpy arrays")
        return np.frombuffer(self.data, dtype=np_name).reshape(self.shape)

    def to_float32(self) -> np.ndarray:
        """The values as a float32 array, for math (merging, splitting, checks)."""
        import numpy as np
        return np.asarray(self.to_numpy(), dtype=np.float32)

    def cast(self, dtype: str) -> "Tensor":
        """The same values in another float dtype (no-op, no copy, when already that dtype)."""
        import numpy as np
        if dtype == self.dtype:
            return self
        with np.errstate(over="ignore"):  # values beyond the target's range become Inf: formats.checks.cast_model names them
            return Tensor.from_numpy(self.to_float32(), dtype)

    def reshaped(self, shape: tuple[int, ...]) -> "Tensor":
        """The same bytes seen with another shape (same element count), from the same place in a file."""
        return Tensor(self.dtype, tuple(shape), self.data, self.source)

    def same_as(self, other: "Tensor") -> bool:
        """Bit-exact equality: dtype, shape and bytes.

        The bytes are compared :data:`COMPARED_BYTES` at a time: a copy larger than the C library's threshold for
        mapping a fresh allocation (128 KiB by default) is made in new pages from the kernel each time, ten times
        slower (two 320 KiB bigG A matrices: 0.50 ms whole against 0.04 ms in pieces).

        Example:
            >>> Tensor("U8", (3,), b"abc").same_as(Tensor("U8", (3,), memoryview(b"abc"))), Tensor("U8", (1,), b"a").same_as(Tensor("I8", (1,), b"a"))
            (True, False)
        """
        if self.dtype != other.dtype or self.shape != other.shape:
            return False
        mine, theirs = memoryview(self.data).cast("B"), memoryview(other.data).cast("B")
        return all(bytes(mine[at:at + COMPARED_BYTES]) == bytes(theirs[at:at + COMPARED_BYTES])
                   for at in range(0, len(mine), COMPARED_BYTES))


class LateTensor(Tensor):
    """A :class:`Tensor` whose dtype and shape are known now and whose bytes ``data_of()`` makes each time they
    are read: merged layers (:func:`made_late`), fused base weights, random real-size weights, so a writer holds
    only the tensor it is writing (:func:`~lorabridge.io.zero_copy.write_tensor` reads ``data`` once).

    Example:
        >>> t = LateTensor("U8", (2,), lambda: b"ab")
        >>> t.nbytes, bytes(t.data), t.source is None
        (2, b'ab', True)
    """

    _data_of: Callable[[], bytes | memoryview]

    def __init__(self, dtype: str, shape: tuple[int, ...], data_of: Callable[[], bytes | memoryview]):
        for name, value in (("dtype", dtype), ("shape", shape), ("source", None), ("_data_of", data_of)):
            object.__setattr__(self, name, value)

    @property
    def data(self) -> bytes | memoryview:
        return self._data_of()

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][0]


def made_late(make: Callable[[], Mapping[str, Tensor]], made: MutableMapping,
              specs: Mapping[str, tuple[str, tuple[int, ...]]] | None = None) -> dict[str, Tensor]:
    """``make()``'s tensors (the factors of one merged LoRA, say) with their dtypes and shapes now and their bytes
    made again when a writer reads them, so a file's merged tensors are not all in memory before its first write.

    ``made``, one dict shared by a writer's groups, keeps the group made last: the tensors of a group, written
    one after another, are made once, and at most one group is held. ``make`` must give the same tensors each time.
    ``specs``, each tensor's (dtype, shape) by key, spares a ``make()`` here where the caller has made the group
    once already (a merge costs a copy of its tensors).

    Example:
        >>> calls = []
        >>> def make():
        ...     calls.append(1)
        ...     return {"a": Tensor("U8", (2,), b"ab"), "b": Tensor("U8", (1,), b"c")}
        >>> late = made_late(make, {})
        >>> late["a"].shape, late["b"].nbytes, len(calls)
        ((2,), 1, 1)
        >>> bytes(late["a"].data), bytes(late["b"].data), len(calls)
        (b'ab', b'c', 2)
    """
    specs = specs if specs is not None else {key: (t.dtype, t.shape) for key, t in make().items()}

    def data_of(key: str) -> bytes | memoryview:
        if made.get("make") is not make:
            made.clear()  # the previous group's tensors go before this one's are made
            made["tensors"], made["make"] = make(), make
        return made["tensors"][key].data

    return {key: LateTensor(dtype, shape, partial(data_of, key)) for key, (dtype, shape) in specs.items()}


def scalar_value(dtype: str, raw: bytes) -> float:
    """The number a one-element tensor of ``dtype`` holds in ``raw``, exactly: floats widened to a Python float, integers
    to double precision (through float32, as ``to_float32`` goes, 16,777,217 would become 16,777,216).

    Why not ``Tensor.to_float32``: a kohya file holds an alpha per module (560 in a rank-4 SDXL LoRA), and a numpy
    array per alpha cost ~6 ms of a file's conversion; ``struct`` reads one in a fraction of a microsecond.
    FP8 has no struct format and, as in ``to_numpy``, is refused with TypeError.

    Example:
        >>> scalar_value("F16", b"\\x00\\x3c"), scalar_value("BF16", b"\\x80\\x3f"), scalar_value("I64", (2**24 + 1).to_bytes(8, "little"))
        (1.0, 1.0, 16777217.0)
    """
    if dtype == "BF16":
        return struct.unpack("<f", b"\0\0" + raw)[0]
    form = SCALAR_FORMATS.get(dtype)
    if form is None:
        raise TypeError(f"{dtype} tensors cannot be turned into numbers")
    return float(struct.unpack(form, raw)[0])


def math_refusal(tensors: Mapping[str, Tensor], operation: str) -> str | None:
    """Why ``operation`` cannot compute with ``tensors`` (name -> tensor), as one line for a refusal that names the
    file: those in a dtype numpy has no type for (FP8); None when it can.

    Why ask first: ``to_numpy`` refuses FP8 with a TypeError, a traceback wherever math reaches it. An operation
    asks before its math, with the tensors that math reads only, so FP8 tensors a conversion just moves (a rename,
    a split by rows, an alpha stored beside them) still go through bit-exactly.

    Example:
        >>> math_refusal({"unet.x.lora_B.weight": Tensor("F8_E4M3", (1,), b"8")}, "folding alpha/rank into lora_B")
        'unet.x.lora_B.weight is F8_E4M3, which folding alpha/rank into lora_B cannot compute with (numpy has no FP8 type)'
        >>> math_refusal({"unet.x.lora_B.weight": Tensor("F16", (1,), b"\\0<")}, "folding") is None
        True
    """
    found = [f"{name} is {t.dtype}" for name, t in tensors.items() if t.dtype in NO_MATH_DTYPES]
    if not found:
        return None
    what = found[0] if len(found) == 1 else f"{len(found)} tensors are FP8 ({listed(found)})"
    return f"{what}, which {operation} cannot compute with (numpy has no FP8 type)"


def refuse_math(tensors: Mapping[str, Tensor], operation: str, path: str | os.PathLike | None = None) -> None:
    """Raise :func:`math_refusal`'s reason as a one-line :class:`~lorabridge.errors.LoraBridgeError` naming ``path``
    (the file the operation reads or writes); return when ``operation`` can compute with ``tensors``.

    Example:
        >>> refuse_math({"unet.x.lora_B.weight": Tensor("F16", (1,), b"\\0<")}, "merging", "a.safetensors")
    """
    refusal = math_refusal(tensors, operation)
    if refusal:
        raise LoraBridgeError(refusal, path)


def zeros(dtype: str, shape: tuple[int, ...]) -> Tensor:
    """A tensor of zeros in any dtype, made without numpy: all-zero bits are +0 in every float format and 0 in every
    integer one, so a zero block beside FP8 rows is FP8 too (numpy has no such type to make it in).

    Example:
        >>> zeros("F8_E4M3", (2, 3)).nbytes, zeros("BF16", (2,)).to_numpy().tolist()
        (6, [0.0, 0.0])
    """
    return Tensor(dtype, tuple(shape), bytes(math.prod(shape) * DTYPES[dtype][0]))


def float32_to_bf16_bytes(array: np.ndarray) -> bytes:
    """Round float32 to bfloat16 with round-to-nearest-even, as torch does; NaN stays NaN."""
    import numpy as np
    bits = np.ascontiguousarray(array, dtype="<f4").view("<u4")
    rounding = ((bits >> 16) & 1) + 0x7FFF
    out = ((bits + rounding) >> 16).astype("<u2")
    nan = np.isnan(array)
    out[nan] = 0x7FC0
    return out.tobytes()


def row_blocks(t: Tensor, rows: Sequence[int]) -> list[Tensor]:
    """Split a tensor into row blocks of ``rows`` rows each, as zero-copy views of its bytes (bit-exact).

    Example:
        >>> [b.to_numpy().tolist() for b in row_blocks(Tensor.from_numpy(np.arange(3, dtype="f4")), [1, 2])]
        [[0.0], [1.0, 2.0]]
    """
    row_bytes = len(t.data) // t.shape[0]
    data, start, out = memoryview(t.data), 0, []
    for count in rows:
        out.append(Tensor(t.dtype, (count, *t.shape[1:]), data[start:start + count * row_bytes]))
        start += count * row_bytes
    return out
