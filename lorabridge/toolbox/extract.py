"""Extract a LoRA from two models: per layer, the truncated SVD of tuned - base.

Streamed layer by layer: the two models are indexed from their headers (:mod:`.base_index`, so each may be a
diffusers directory, a single file or a MindONE ``.ckpt``, in any mix), then one weight of each side is read,
differenced, factorised and let go; only the rank-r factors are kept. Peak memory is about two layers and
their SVD, never a model. Layers whose difference is at most ``min_diff`` everywhere are skipped. The
relative Frobenius error of each module is the Eckart-Young optimum at that rank:
``sqrt(sum of the dropped s_i^2) / sqrt(sum of all s_i^2)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..architectures import get_architecture
from ..errors import LoraBridgeError
from ..formats.neutral import write_neutral
from ..io.atomic import check_output_path, replacing
from ..io.streaming import release_pages
from ..model import LoraModel, LoraModule
from ..tensor import Tensor, refuse_math
from .base_index import BaseIndex, Layer, WeightFile, index_base, open_weights


@dataclass
class ExtractResult:
    model: LoraModel
    output: Path
    errors: dict[str, float] = field(default_factory=dict)  # module -> relative Frobenius error
    skipped: int = 0  # unchanged layers

    def summary(self) -> dict:
        errors = list(self.errors.values())
        worst = sorted(self.errors.items(), key=lambda item: -item[1])[:5]
        return {"output": str(self.output), "modules": len(errors), "skipped_unchanged": self.skipped,
                "mean_relative_error": float(np.mean(errors)) if errors else 0.0,
                "max_relative_error": max(errors, default=0.0), "worst": dict(worst)}


GRAM_ROWS = 1024  # rows of the difference turned into float64 at a time


def truncated_svd(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(B, A, relative error) with ``B @ A`` the best rank-``rank`` approximation of ``matrix`` (Eckart-Young),
    the singular values split evenly between the factors; the rank never exceeds what the matrix has.

    Computed from the Gram matrix of the smaller side (n x n, float64, accumulated a block of rows at a
    time): the top singular vectors come from its eigenvectors, ``U_r = M V_r / s_r``. Memory is the matrix
    plus n x n, not the three float64 matrices a dense SVD holds; singular values below ~1e-8 of the largest
    are lost to rounding, far below what a LoRA of that rank keeps. The error is
    ``sqrt(||M||^2 - sum of kept s_i^2) / ||M||``.

    Example:
        >>> b, a, error = truncated_svd(np.diag([3.0, 4.0]), 1)
        >>> (b @ a).round(6).tolist(), round(error, 6)
        ([[0.0, 0.0], [0.0, 4.0]], 0.6)
    """
    if matrix.shape[0] < matrix.shape[1]:
        b, a, error = truncated_svd(matrix.T, rank)
        return a.T, b.T, error
    gram = np.zeros((matrix.shape[1], matrix.shape[1]))
    for start in range(0, matrix.shape[0], GRAM_ROWS):
        block = np.asarray(matrix[start:start + GRAM_ROWS], np.float64)
        gram += block.T @ block
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1]
    total = float(max(np.trace(gram), 0.0))
    keep = [i for i in order[:rank] if values[i] > total * 1e-30]  # zero directions add nothing
    s = np.sqrt(values[keep])
    v = vectors[:, keep]
    u = np.concatenate([np.asarray(matrix[i:i + GRAM_ROWS], np.float64) @ v
                        for i in range(0, matrix.shape[0], GRAM_ROWS)]) / s if keep else np.zeros((matrix.shape[0], 0))
    root = np.sqrt(s)
    error = float(np.sqrt(max(total - float(np.sum(s * s)), 0.0) / total)) if total else 0.0
    return u * root, root[:, None] * v.T, error


def _weight(layer: Layer, files: dict[Path, WeightFile]) -> np.ndarray:
    """One layer's weight as a float32 copy (``files``: the files opened so far, each header parsed once); a weight
    in FP8 (a quantized checkpoint), which numpy has no type for, is refused naming its file."""
    if layer.file not in files:
        files[layer.file] = open_weights(layer.file)
    tensor = files[layer.file].tensor(layer.key)
    refuse_math({f"tensor {layer.key!r}": tensor}, "extract", layer.file)
    values = np.array(tensor.to_float32())  # a copy: the mapped pages can go
    release_pages(tensor.data)
    return values if layer.rows is None else values[layer.rows[0]:layer.rows[1]]


def _candidates(base: BaseIndex, tuned: BaseIndex, conv: bool) -> list[tuple[str, str, Layer, Layer]]:
    """The layers a LoRA can adapt that both models have: Linear, and Conv2d with ``conv``."""
    architecture = get_architecture(base.architecture) if base.architecture else None
    out = []
    for component, modules in base.modules.items():
        for path, layer in modules.items():
            other = tuned.layer(component, path)
            if other is None or architecture is None or component not in architecture.components \
                    or not architecture.is_lora_target(component, path):
                continue
            if len(layer.shape) == 4 and not conv:
                continue
            if other.shape != layer.shape:
                raise LoraBridgeError(f"{component}.{path} is {list(other.shape)} here, {list(layer.shape)} in the base",
                                      tuned.path)
            out.append((component, path, layer, other))
    return out


def extract(base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike, *, rank: int,
            min_diff: float = 0.0, conv: bool = False, force: bool = False) -> ExtractResult:
    """Write a neutral LoRA approximating ``tuned - base`` at ``rank`` per layer (alpha = rank, scale 1).

    Example:
        >>> extract("sdxl-base", "sdxl-tuned", "lora.safetensors", rank=32).summary()["modules"]   # doctest: +SKIP
        722
    """
    if rank < 1:
        raise LoraBridgeError(f"--rank must be at least 1, got {rank}")
    out = check_output_path(out, force, inputs=(base, tuned))
    base_index, tuned_index = index_base(base), index_base(tuned)
    if base_index.architecture is None or base_index.architecture != tuned_index.architecture:
        raise LoraBridgeError(f"the models are for different architectures ({base_index.architecture} and "
                              f"{tuned_index.architecture})", tuned)
    model = LoraModel(architecture=base_index.architecture,
                      provenance={"source_format": "lorabridge.extract", "base": Path(base).name, "tuned": Path(tuned).name})
    result, files = ExtractResult(model, out), dict[Path, WeightFile]()
    for component, path, layer, other in _candidates(base_index, tuned_index, conv):
        diff = _weight(other, files)
        diff -= _weight(layer, files)  # in place: two layers in memory, not three
        if not diff.size or float(np.abs(diff).max()) <= min_diff:
            result.skipped += 1
            continue
        b, a, error = truncated_svd(diff.reshape(diff.shape[0], -1), rank)
        kept = a.shape[0]
        dtype = layer.dtype if layer.dtype in ("F32", "F16", "BF16") else "F32"
        tensors = {"lora_A.weight": Tensor.from_numpy(a.astype(np.float32).reshape(kept, *diff.shape[1:]), dtype),
                   "lora_B.weight": Tensor.from_numpy(b.astype(np.float32).reshape(diff.shape[0], kept,
                                                                                  *([1, 1] if diff.ndim == 4 else [])), dtype)}
        name = f"{component}.{path}"
        model.add(LoraModule(name, "lora", tensors, alpha=float(kept)))
        result.errors[name] = error
    if not model.modules:
        raise LoraBridgeError(f"no layer differs by more than {min_diff:g}: nothing to extract", tuned)
    with replacing(force):
        write_neutral(model, out)
    return result
