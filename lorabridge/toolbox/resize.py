"""Resize a LoRA: each module replaced by the truncated SVD of its delta W, at a rank chosen per module.

The convention (the same as baking, :func:`lorabridge.bake.lora_from_svd`): a resized module
stores ``B' = U_k sqrt(S_k)`` and ``A' = sqrt(S_k) V_k^T`` with **alpha = its new rank k**, so its
scale alpha/k is 1 and delta W' = B' A' is the best rank-k approximation of the old
delta W = (alpha/r) B A (Eckart-Young), whatever the old alpha was. Keeping the old alpha/rank
ratio instead would need the singular values rescaled by it; alpha = rank needs nothing and
loads the same in every tool, including those that assume alpha = rank when a file has none.

A plain LoRA whose rank is already at or below the target is kept as it is (same tensors,
error 0). LoHa and LoKr modules go through the bake (they become plain LoRA), full deltas
through a dense SVD. A DoRA magnitude is kept unchanged: it normalises W + delta W whatever
delta W is made of, so only the direction update is approximated, and the error reported is
that of delta W. The error is measured with the new factors as stored (after the cast to the
module's dtype), from the factors (see :mod:`.svd`).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from ..bake import lora_from_svd
from ..io.input_file import held_inputs
from ..kinds import DORA_ROLE
from ..model import LoraModel, LoraModule, named_tensors
from ..tensor import refuse_math
from .files import check_output, read_lora, write_lora
from .report import ModuleError, ToolReport
from .svd import RankTarget, delta_norm, residual_norm, spectrum


def resize_module(module: LoraModule, target: RankTarget) -> tuple[LoraModule, ModuleError]:
    """``module`` at the rank ``target`` chooses for it, and the error that leaves.

    Example:
        >>> import numpy as np
        >>> from lorabridge.tensor import Tensor
        >>> rng = np.random.default_rng(0)
        >>> t = {"lora_A.weight": Tensor.from_numpy(rng.standard_normal((8, 40)).astype("f4")),
        ...      "lora_B.weight": Tensor.from_numpy(rng.standard_normal((30, 8)).astype("f4"))}
        >>> small, err = resize_module(LoraModule("unet.x", "lora", t, alpha=4.0), RankTarget(rank=3))
        >>> small.rank, small.alpha, err.rank_before, round(err.relative_error, 2)
        (3, 3.0, 8, 0.55)
    """
    u, s, vt = spectrum(module)
    rank = target.choose(s)
    norm = delta_norm(module)
    if module.kind == "lora" and rank >= module.rank:
        return module, ModuleError(module.name, module.kind, module.rank, module.rank, norm, 0.0)
    resized = lora_from_svd(module, (u[:, :rank], s[:rank], vt[:rank]))
    return resized, ModuleError(module.name, module.kind, module.rank, rank, norm, residual_norm(module, resized))


def resize_model(model: LoraModel, target: RankTarget) -> tuple[LoraModel, list[ModuleError]]:
    """A copy of ``model`` with every module resized (:func:`resize_module`), and one error per module in model order.

    Example:
        >>> small, errors = resize_model(model, RankTarget(energy=0.95))   # doctest: +SKIP
    """
    modules, errors = {}, []
    for name, module in model.modules.items():
        modules[name], error = resize_module(module, target)
        errors.append(error)
    return replace(model, modules=modules, provenance=dict(model.provenance)), errors


@held_inputs()  # the input stays as read while its tensors are resized and written
def resize_file(src: str | os.PathLike, out: str | os.PathLike, target: RankTarget, *, to: str = "neutral",
                force: bool = False) -> ToolReport:
    """Read ``src`` (any supported format), resize it to ``target`` and write ``out`` (format ``to``) atomically.

    Every module's spectrum is computed, even one already small enough, so factors in FP8 (no numpy type) are
    refused first, naming ``src``.

    Example:
        >>> report = resize_file("lora_r128.safetensors", "lora_r32.safetensors", RankTarget(rank=32))   # doctest: +SKIP
        >>> print(report.render())   # doctest: +SKIP
    """
    started, src = time.perf_counter(), Path(src)
    out = check_output(out, to, (src,), force)
    model, notes = read_lora(src)
    refuse_math(named_tensors(model.modules.values(), skip=(DORA_ROLE,)), "resize's SVD", src)  # magnitudes are kept
    resized, errors = resize_model(model, target)
    resized.provenance["operation"] = f"resize {target.describe()}"
    notes += write_lora(resized, out, to, src, force)
    return ToolReport("resize", [str(src)], out, to, errors, time.perf_counter() - started,
                      {"target": target.describe()}, notes)
