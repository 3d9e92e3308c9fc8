"""Merge LoRAs: one module per layer whose delta W is the weighted sum of the inputs' delta Ws.

Exact by default. Where every input's module for a layer is a plain LoRA, the merged module
concatenates them (the ranks add up): A' stacks the A_i, B' puts the c_i B_i side by side with
c_i = w_i * alpha_i / r_i, and alpha' = sum r_i (scale 1), so delta W' = sum_i w_i (alpha_i/r_i)
B_i A_i exactly (PEFT's ``add_weighted_adapter(combination_type="cat")``). Each input keeps its
own alpha, negative weights subtract, and a layer only some inputs adapt is merged from those.
Where a layer has a LoHa, LoKr or full module in any input, the merged module is a full delta,
the weighted sum of dense delta Ws. The sum is formed in float32 and stored in the dtype of the
layer's module in the first input holding it (the one rounding is reported as the error).

With a ``rank``, each merged module is then resized to it (:mod:`.resize`: truncated SVD from
the factors, alpha = rank kept) and the error against the exact merge is reported.
DoRA modules are refused: a DoRA magnitude normalises W + delta W as a whole, so the magnitudes
of two adapters do not combine into the magnitude of their sum.

Memory: the inputs stay as read (``held_inputs``) and the merged model is built whole before it is
written, so an exact merge peaks at about twice the inputs' total size (measured: 3.2 GB for two 748 MiB
inputs). Writing module by module would need tensors computed on demand, which the format writers do
not take (:class:`~lorabridge.tensor.Tensor` holds its bytes, and some writers regroup modules across
layers, such as kohya's fused Flux ``qkv``).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from ..errors import LoraBridgeError, listed
from ..io.input_file import held_inputs
from ..kinds import DORA_ROLE
from ..model import LoraModel, LoraModule
from ..tensor import Tensor, refuse_math
from .files import check_output, read_lora, write_lora
from .report import ModuleError, ToolReport
from .resize import resize_module
from .svd import RankTarget, delta_norm, residual_norm

SHOWN = 3  # modules named in a refusal


def check_weights(weights: list[float], count: int) -> None:
    """One finite weight per input.

    Example:
        >>> check_weights([1.0, float("nan")], 2)
        Traceback (most recent call last):
        lorabridge.errors.LoraBridgeError: --weights: weight 2 is nan, weights must be finite numbers
    """
    if len(weights) != count:
        raise LoraBridgeError(f"--weights: {len(weights)} weight(s) for {count} input(s), give one per input")
    for i, weight in enumerate(weights, 1):
        if not math.isfinite(weight):
            raise LoraBridgeError(f"--weights: weight {i} is {weight}, weights must be finite numbers")


def _concat(name: str, parts: list[tuple[float, LoraModule]]) -> LoraModule:
    """The plain LoRA holding sum w_i (alpha_i/r_i) B_i A_i exactly: A stacked, the scaled B side by side, alpha = total rank."""
    a = np.concatenate([m.tensors["lora_A.weight"].to_float32() for _, m in parts], axis=0)
    b = np.concatenate([m.tensors["lora_B.weight"].to_float32() * np.float32(w * m.scale) for w, m in parts], axis=1)
    tensors = {"lora_A.weight": Tensor.from_numpy(a, "F32"), "lora_B.weight": Tensor.from_numpy(b, "F32")}
    return LoraModule(name, "lora", tensors, alpha=float(a.shape[0]), alpha_source="stored")


def _dense(name: str, parts: list[tuple[float, LoraModule]]) -> LoraModule:
    """The full delta sum w_i delta W_i (and the weighted sum of the bias deltas some full modules have)."""
    diff = sum(np.float32(w) * m.delta_weight() for w, m in parts)
    tensors = {"diff": Tensor.from_numpy(np.asarray(diff, np.float32), "F32")}
    biases = [np.float32(w) * m.tensors["diff_b"].to_float32() for w, m in parts if "diff_b" in m.tensors]
    if biases:
        tensors["diff_b"] = Tensor.from_numpy(np.asarray(sum(biases), np.float32), "F32")
    return LoraModule(name, "full", tensors, alpha=1.0, alpha_source="stored")


def _cast(module: LoraModule, dtype: str) -> LoraModule:
    return LoraModule(module.name, module.kind, {role: t.cast(dtype) for role, t in module.tensors.items()},
                      module.alpha, module.alpha_source)


def _groups(models: list[LoraModel], weights: list[float], names: list[str]) -> dict[str, list[tuple[float, LoraModule]]]:
    """Per layer (in order of first appearance), the (weight, module) of every input adapting it; refuses
    DoRA, FP8 tensors (every tensor is computed with, in numpy, which has no FP8 type) and a layer adapted with
    different weight shapes."""
    groups: dict[str, list[tuple[float, LoraModule]]] = {}
    for model, weight, source in zip(models, weights, names):
        dora = [m.name for m in model.modules.values() if DORA_ROLE in m.tensors]
        if dora:
            raise LoraBridgeError(f"{len(dora)} DoRA module(s) ({listed(dora, SHOWN, ', ')}): merging DoRA is not "
                                  "defined (a magnitude normalises W + delta W as a whole), merge plain LoRAs", source)
        refuse_math(model.tensors(), "merging", source)
        for module in model.modules.values():
            groups.setdefault(module.name, []).append((weight, module))
    for name, parts in groups.items():
        shapes = {tuple(m.weight_shape) for _, m in parts}
        if len(shapes) > 1:
            raise LoraBridgeError(f"layer {name} has different weight shapes in the inputs: "
                                  f"{', '.join(str(list(s)) for s in sorted(shapes))}")
    return groups


def check_architectures(models: list[LoraModel], names: list[str]) -> None:
    """Refuse inputs made for different architectures, in one line naming each file's.

    Example:
        >>> check_architectures([LoraModel(architecture="a"), LoraModel(architecture="b")], ["x.safetensors", "y.safetensors"])
        Traceback (most recent call last):
        lorabridge.errors.LoraBridgeError: the inputs are made for different architectures: x.safetensors is a, y.safetensors is b
    """
    if len({m.architecture for m in models}) > 1:
        raise LoraBridgeError("the inputs are made for different architectures: "
                              + ", ".join(f"{name} is {m.architecture}" for m, name in zip(models, names)))


def merge_models(models: list[LoraModel], weights: list[float], rank: int | None = None,
                 names: list[str] | None = None) -> tuple[LoraModel, list[ModuleError]]:
    """The weighted merge of ``models`` (exact, or resized to ``rank``) and per module the error against the exact merge.

    ``names`` (the input files) are what refusals name. The merged model has the inputs'
    architecture, no training facts (it was trained as none of them) and an empty provenance.

    Example:
        >>> from lorabridge.tensor import Tensor
        >>> def one(x):
        ...     t = {"lora_A.weight": Tensor.from_numpy(np.full((1, 3), x, "f4")), "lora_B.weight": Tensor.from_numpy(np.ones((2, 1), "f4"))}
        ...     return LoraModel({"unet.x": LoraModule("unet.x", "lora", t, alpha=2.0)})
        >>> merged, errors = merge_models([one(1.0), one(3.0)], [1.0, -0.5])
        >>> merged.modules["unet.x"].rank, merged.modules["unet.x"].delta_weight().tolist(), errors[0].relative_error
        (2, [[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]], 0.0)
    """
    names = names or [f"input {i}" for i in range(1, len(models) + 1)]
    if not models:
        raise LoraBridgeError("merge needs at least one input")
    check_weights(weights, len(models))
    check_architectures(models, names)
    target = RankTarget(rank=rank) if rank is not None else None
    modules, errors = {}, []
    for name, parts in _groups(models, weights, names).items():
        exact = _concat(name, parts) if all(m.kind == "lora" for _, m in parts) else _dense(name, parts)
        dtype = parts[0][1].dtype
        merged = resize_module(exact, target)[0] if target else exact
        merged = _cast(merged, dtype) if dtype != "F32" else merged
        modules[name] = merged
        errors.append(ModuleError(name, exact.kind, exact.rank, merged.rank, delta_norm(exact), residual_norm(exact, merged)))
    return LoraModel(modules, models[0].architecture), errors


@held_inputs()  # every input stays as read until the merge is written
def merge_files(srcs: list[str | os.PathLike], out: str | os.PathLike, weights: list[float], *, rank: int | None = None,
                to: str = "neutral", force: bool = False) -> ToolReport:
    """Read ``srcs`` (any supported formats), merge them with ``weights`` (exactly, or to ``rank``) and write ``out``.

    Example:
        >>> report = merge_files(["style.safetensors", "subject.safetensors"], "both.safetensors", [0.8, 1.0])   # doctest: +SKIP
    """
    started, paths = time.perf_counter(), [Path(s) for s in srcs]
    check_weights(weights, len(paths))
    if rank is not None:
        RankTarget(rank=rank)
    out = check_output(out, to, tuple(paths), force)
    models, notes = [], []
    for path in paths:
        model, warned = read_lora(path)
        models.append(model)
        notes += [f"{path.name}: {line}" for line in warned]
    merged, errors = merge_models(models, weights, rank, [str(p) for p in paths])
    merged.provenance = {"source_format": "lorabridge-merge", "source_file": None, "source_sha256": None,
                         "operation": f"merge --weights {','.join(f'{w:g}' for w in weights)}" + (f" --rank {rank}" if rank else ""),
                         "inputs": [{**m.provenance, "weight": w} for m, w in zip(models, weights)]}
    notes += write_lora(merged, out, to, paths[0], force)
    return ToolReport("merge", [str(p) for p in paths], out, to, errors, time.perf_counter() - started,
                      {"weights": list(weights), "rank": rank}, notes)
