"""Fuse a LoRA into its base model: the base with ``W + scale * delta W`` written in the base's own layout.

Streamed tensor by tensor: each output tensor is computed when the writer reaches it (one base tensor read,
the deltas of the modules on it added in float32, cast back to the base's dtype) and let go once written;
tensors no module targets are copied as the base's bytes, never decoded. A diffusers directory keeps every
file (all weight variants fused, untouched files copied); a single-file checkpoint or MindONE ``.ckpt`` is
written as one file of the same container. A LoRA that does not fit the base is refused first
(:func:`lorabridge.toolbox.check.refuse_misfit`, what ``check --base`` checks), and so is a directory with
weights fuse cannot rewrite (pickled ``.bin`` beside the safetensors: a copy would hold the base unfused).
A part of a fused layer (Flux.1's ``qkv``/``linear1`` in a BFL file, bigG's ``in_proj``) is fused into its
own rows, exactly as into diffusers' separate layer; a DoRA part is normalised on those rows alone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import numpy as np

from ..deltas import dora_weight
from ..errors import LoraBridgeError
from ..io.atomic import atomic_directory, check_output_path, replacing
from ..io.ms_ckpt import MsCheckpointFile, write_ms_checkpoint
from ..io.safetensors_file import write_safetensors
from ..io.streaming import release_pages
from ..model import LoraModel, LoraModule
from ..tensor import LateTensor, Tensor, refuse_math
from .base_index import BaseIndex, WeightFile, module_of, open_weights, single_file_modules
from .check import read_lora, refuse_misfit

FUSABLE_DTYPES = ("F64", "F32", "F16", "BF16")
Targets = dict[str, list[tuple[LoraModule, "tuple[int, int] | None"]]]  # tensor key -> modules on it (rows of it)


@dataclass
class FuseResult:
    output: Path
    fused_modules: int
    fused_tensors: int
    copied_files: int


def fused_weight(weight: np.ndarray, module: LoraModule, scale: float) -> np.ndarray:
    """``weight`` (float32, the module's shape) with the module's update applied: ``W + scale * delta W``, or
    DoRA's ``m * V / ||V||`` with ``V = W + scale * delta W`` when the module has a magnitude.

    Example:
        >>> from lorabridge.tensor import Tensor
        >>> a = Tensor.from_numpy(np.ones((1, 2), "f4")); b = Tensor.from_numpy(np.ones((2, 1), "f4"))
        >>> m = LoraModule("unet.x", "lora", {"lora_A.weight": a, "lora_B.weight": b}, alpha=1.0)
        >>> fused_weight(np.zeros((2, 2), "f4"), m, 0.5).tolist()
        [[0.5, 0.5], [0.5, 0.5]]
    """
    delta = np.asarray(module.delta_weight(), np.float32).reshape(weight.shape) * np.float32(scale)
    if "dora_scale" in module.tensors:
        return dora_weight(weight, delta, module.tensors["dora_scale"].to_float32(), module.dora_axis or "out")
    return weight + delta


def _fused_tensor(base: Tensor, modules: list[tuple[LoraModule, tuple[int, int] | None]], scale: float) -> LateTensor:
    """A fused output tensor whose bytes are computed when first read (once: the writers read a tensor's ``data``
    once, the checks again), so the header pass of a writer costs nothing and only the tensor being written is held."""
    return LateTensor(base.dtype, base.shape, cache(partial(_fused_bytes, base, modules, scale)))


def _fused_bytes(base: Tensor, modules: list[tuple[LoraModule, tuple[int, int] | None]], scale: float) -> bytes:
    weight = np.array(base.to_float32())  # a copy: the base's mapped pages can go
    release_pages(base.data)
    for module, rows in modules:
        if rows is None:
            weight = fused_weight(weight, module, scale)
        else:
            weight[rows[0]:rows[1]] = fused_weight(weight[rows[0]:rows[1]], module, scale)
    return bytes(Tensor.from_numpy(weight, base.dtype).data)


class FusedTensors(Mapping):
    """A weights file's tensors with the LoRA fused in, in file order, each computed when it is asked for.

    ``items()`` and ``values()`` make a new tensor each time: the writer holds one at a time.
    """

    def __init__(self, weights: WeightFile, targets: Targets, scale: float):
        self._weights, self._targets, self._scale = weights, targets, scale

    def __getitem__(self, key: str):
        base = self._weights.tensor(key)
        modules = self._targets.get(key)
        return base if not modules else _fused_tensor(base, modules, self._scale)

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights.keys())

    def __len__(self) -> int:
        return len(self._weights.keys())


def _targets(weights: WeightFile, model: LoraModel, index: BaseIndex, component: str | None) -> Targets:
    """Which modules act on which tensor of one weights file (``component``: a diffusers folder's; None: a single file)."""
    targets: Targets = {}
    for key in weights.keys():
        module = module_of(key)
        if module is None:
            continue
        placed: list[tuple[str, str, tuple[int, int] | None]]
        if component is not None:
            placed = [(component, module, None)]
        else:
            placed = [(c, p, rows) for name, c, p, rows in single_file_modules(module, weights.header_entry(key)[1])
                      if name == index.architecture]
        for c, path, rows in placed:
            found = model.modules.get(f"{c}.{path}")
            if found is not None:
                targets.setdefault(key, []).append((found, rows))
    for key in targets:
        dtype = weights.header_entry(key)[0]
        if dtype not in FUSABLE_DTYPES:
            raise LoraBridgeError(f"tensor {key!r} is {dtype}; fuse computes in float and writes F64/F32/F16/BF16 only",
                                  weights.path)
    return targets


def refuse_unread(index: BaseIndex) -> None:
    """Refuse a diffusers directory holding weights fuse cannot rewrite (pickled ``.bin``...): copied, they would
    sit unfused beside the fused safetensors, and a loader preferring them would load the stale base.

    Example:
        >>> refuse_unread(BaseIndex(Path("base"), "diffusers", unread=[Path("base/unet/diffusion_pytorch_model.bin")]))
        Traceback (most recent call last):
        lorabridge.errors.LoraBridgeError: base/unet/diffusion_pytorch_model.bin: fuse rewrites *.safetensors weights only; these would be copied unfused (stale): remove them from (a copy of) the base, or convert them to safetensors
    """
    if index.unread:
        more = f" (and {len(index.unread) - 1} more such file(s))" if len(index.unread) > 1 else ""
        raise LoraBridgeError(f"fuse rewrites *.safetensors weights only; these would be copied unfused (stale){more}: "
                              "remove them from (a copy of) the base, or convert them to safetensors", index.unread[0])


def _write(weights: WeightFile, out: Path, targets: Targets, scale: float) -> None:
    tensors = FusedTensors(weights, targets, scale)
    if isinstance(weights, MsCheckpointFile):
        write_ms_checkpoint(out, tensors, weights.metadata)
    else:
        write_safetensors(out, tensors, weights.metadata)


def fuse(lora: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, *, scale: float = 1.0,
         force: bool = False) -> FuseResult:
    """Write ``base`` with ``lora`` fused in (``scale`` times its delta W) to ``out``, in the base's layout.

    Example:
        >>> fuse("lora.safetensors", "sdxl-base", "sdxl-fused").fused_modules   # doctest: +SKIP
        722
    """
    base, lora = Path(base), Path(lora)
    model, _ = read_lora(lora)
    refuse_math(model.tensors(), "fusing", lora)  # before any output: the sums run as the writer reaches each tensor
    index = refuse_misfit(model, base, lora)
    refuse_unread(index)
    directory = index.layout == "diffusers"
    out = check_output_path(out, force, inputs=(base, lora), directory=directory)
    fused_keys, files = 0, 0
    used: set[str] = set()
    if directory:
        with atomic_directory(out, force) as staging:
            for source in sorted(base.rglob("*")):
                target = staging / source.relative_to(base)
                if source.is_dir():
                    target.mkdir(exist_ok=True)
                    continue
                targets = _targets(open_weights(source), model, index, source.parent.name) \
                    if source in index.files else {}
                if targets:
                    _write(open_weights(source), target, targets, scale)
                    fused_keys += len(targets)
                    used.update(m.name for mods in targets.values() for m, _ in mods)
                else:
                    shutil.copy2(source, target)
                    files += 1
    else:
        weights = open_weights(base)
        targets = _targets(weights, model, index, None)
        with replacing(force):
            _write(weights, out, targets, scale)
        fused_keys = len(targets)
        used.update(m.name for mods in targets.values() for m, _ in mods)
    return FuseResult(out, len(used), fused_keys, files)
