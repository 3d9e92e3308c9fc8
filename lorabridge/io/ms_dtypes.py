"""MindSpore ``tensor_type`` strings and their safetensors dtype names, as data.

A MindSpore ``.ckpt`` record names its element type with ``str(mindspore dtype)``
(``"Float32"``, ``"BFloat16"``, ...). These tables are the single place that
knows the spelling on both sides; readers and writers only look names up here.
"""

from __future__ import annotations

# tensor_type written by mindspore.save_checkpoint -> safetensors dtype name (both directions are exact)
MS_TO_SAFETENSORS: dict[str, str] = {
    "Float64": "F64",
    "Float32": "F32",
    "Float16": "F16",
    "BFloat16": "BF16",
    "Int64": "I64",
    "Int32": "I32",
    "Int16": "I16",
    "Int8": "I8",
    "UInt64": "U64",
    "UInt32": "U32",
    "UInt16": "U16",
    "UInt8": "U8",
    "Bool": "BOOL",
}

SAFETENSORS_TO_MS: dict[str, str] = {st: ms for ms, st in MS_TO_SAFETENSORS.items()}

# tensor_type of a text entry (save_checkpoint's append_dict strings): UTF-32 code units, not a tensor
MS_STR_TYPE = "str"

# tensor_type strings MindSpore 2.10 can write that lorabridge does not read, and why
MS_UNSUPPORTED: dict[str, str] = {
    "Complex64": "complex tensors are not supported (mindspore.load_checkpoint cannot read them either)",
    "Complex128": "complex tensors are not supported (mindspore.load_checkpoint cannot read them either)",
    "Int4": "packed 4-bit integers (qint4x2) have no safetensors dtype",
    "Float8E4M3FN": "float8 tensors are not supported (mindspore.load_checkpoint cannot read them either)",
    "Float8E5M2": "float8 tensors are not supported (mindspore.load_checkpoint cannot read them either)",
    "HiFloat8": "HiFloat8 tensors have no safetensors dtype",
}
