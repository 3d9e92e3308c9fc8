"""A component's base weights one tensor at a time, for loaders that fill a model built without weights.

diffusers and mindone.diffusers load a component by reading its whole weight file and then filling the
model's parameters from it: at real size the file's fp16 tensors (SDXL's UNet: 5.1 GB) and the fp32
parameters (10.3 GB) are resident together, over the memory a 16 GB machine has. Streamed, the transient
is one tensor: each is copied out of the memory-mapped file into a fresh array and the map's pages are
handed back (:func:`~lorabridge.io.streaming.release_pages`) before the next.

Example:
    >>> for name, array in streamed_arrays(files_to_stream(base, "unet")):   # doctest: +SKIP
    ...     model_param(name).copy_(array)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..errors import LoraBridgeError
from ..io.safetensors_file import SafetensorsFile
from ..io.streaming import release_pages
from ..tensor import DTYPES
from .base_model import WEIGHT_FILE, BaseModel, weight_files


def files_to_stream(base: BaseModel, component: str) -> tuple[Path, ...] | None:
    """The safetensors files (all shards) holding ``component``'s weights in the base's variant, else plain;
    None where it has none to stream: a single-file base, weights only a pickle holds, or tensors numpy cannot
    hold (FP8: a quantized checkpoint): its library's loader reads those, or refuses them.
    """
    if base.single_file:
        return None
    by_variant = weight_files(base.path, {component: None}).get(component, {})
    files = by_variant.get(base.variant) or by_variant.get(None) or []
    if not files or any((match := WEIGHT_FILE.fullmatch(f.name)) is None or match["format"] != "safetensors" for f in files):
        return None
    for path in files:
        checkpoint = SafetensorsFile(path)
        dtypes = {checkpoint.header_entry(name)[0] for name in checkpoint.keys()}
        if any(DTYPES[dtype][1] is None and dtype != "BF16" for dtype in dtypes):
            return None
    return tuple(files)


def streamed_arrays(files: Sequence[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of ``files`` by name, each a fresh array the caller may keep (BF16 widened to float32,
    exactly: numpy has no bfloat16); the mapped pages it came from are let go after each."""
    for path in files:
        checkpoint = SafetensorsFile(path)
        for name in checkpoint.keys():
            tensor = checkpoint.tensor(name)
            array = np.array(tensor.to_numpy(), copy=True)
            release_pages(tensor.data)
            yield name, array


def fixed_names(model: Any, files: Sequence[Path]) -> dict[str, str]:
    """Name in the file -> name in the model, where the model renames the keys of older files on load (diffusers'
    and mindone's ``_fix_state_dict_keys_on_load``: attention blocks' ``query`` -> ``to_q``...), run once on the names."""
    renamed: dict[str, str] = {}
    for path in files:
        names = {name: name for name in SafetensorsFile(path).keys()}
        model._fix_state_dict_keys_on_load(names)
        renamed.update({old: new for new, old in names.items() if new != old})
    return renamed


def named_arrays(model: Any, files: Sequence[Path], shapes: Mapping[str, tuple[int, ...] | None]) -> Iterator[tuple[str, np.ndarray]]:
    """:func:`streamed_arrays` by the model's names (:func:`fixed_names`), each checked against ``shapes`` (the
    model's tensor shapes by name; None where the framework stores the tensor in another shape and checks it
    itself): a tensor the model lacks or of another shape is refused, naming the file."""
    renamed = fixed_names(model, files)
    for path in files:
        for name, array in streamed_arrays([path]):
            model_name = renamed.get(name, name)
            if model_name not in shapes:
                raise LoraBridgeError(f"holds {name!r}, which {type(model).__name__} has not", path)
            expected = shapes[model_name]
            if expected is not None and tuple(array.shape) != tuple(expected):
                raise LoraBridgeError(f"{name!r} is {'x'.join(map(str, array.shape))}, {type(model).__name__} expects "
                                      f"{'x'.join(map(str, expected))}", path)
            yield model_name, array


def kept_in_fp32(model: Any, name: str) -> bool:
    """Whether the model keeps the tensor ``name`` in fp32 whatever the dtype asked (its ``_keep_in_fp32_modules``,
    matched by path part as diffusers and mindone match them)."""
    return any(module in name.split(".") for module in getattr(model, "_keep_in_fp32_modules", None) or ())


def check_complete(base: BaseModel, component: str, missing: Sequence[str]) -> None:
    """Refuse a component whose weight files left some of the model's tensors unset (they would be random)."""
    if missing:
        raise LoraBridgeError(f"{component}'s weight files lack {len(missing)} of its tensors: {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}", base.path / component)
