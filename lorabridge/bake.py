"""Baking: turn modules of kinds a target format cannot hold (LoHa, LoKr) into plain LoRA.

diffusers, PEFT and kohya-LoRA files hold only ``B @ A``. A LoHa or LoKr delta W
usually has a higher rank than its factors suggest (a Hadamard product of two
rank-r matrices has rank up to r*r), so the best rank-k LoRA for it is the
truncated SVD of delta W (Eckart-Young). The error is not zero in general: it is
measured on the factors as they are stored (after the cast to the module's dtype)
and reported per module, so a user can pick a rank that is good enough.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np

from .errors import LoraBridgeError
from .model import LoraModel, LoraModule
from .tensor import Tensor

SHOWN = 5  # modules named in a refusal


@dataclass(frozen=True)
class BakedModule:
    """What baking did to one module: its former kind, the rank kept, the error left."""

    name: str
    from_kind: str
    rank: int
    relative_error: float  # ||dW - B A||_F / ||dW||_F, B and A as stored

    def line(self) -> str:
        return f"{self.name}: {self.from_kind} baked to LoRA rank {self.rank}, relative error {self.relative_error:.3g}"


def bake_module(module: LoraModule, rank: int) -> tuple[LoraModule, BakedModule]:
    """The best rank-``rank`` LoRA for one module's delta W, and how far from it that is.

    alpha is set to the rank kept (scale 1), so ``B @ A`` is delta W itself; the singular
    values are split evenly (``sqrt(s)`` on each side) to keep both factors in fp16 range.
    A DoRA magnitude is kept as is: it applies to W + delta W whatever delta W is made of.

    Example:
        >>> lora, report = bake_module(loha_module, 8)   # doctest: +SKIP
        >>> report.relative_error
    """
    delta = module.delta_weight()
    out, rest = delta.shape[0], delta.shape[1:]
    flat = delta.reshape(out, -1).astype(np.float64)
    u, s, vt = np.linalg.svd(flat, full_matrices=False)
    kept = max(1, min(rank, len(s)))
    root = np.sqrt(s[:kept])
    dtype = module.dtype
    a = Tensor.from_numpy((root[:, None] * vt[:kept]).astype(np.float32).reshape(kept, *rest), dtype)
    b = Tensor.from_numpy((u[:, :kept] * root).astype(np.float32).reshape(out, kept, *[1] * (len(rest) - 1)), dtype)
    tensors = {"lora_A.weight": a, "lora_B.weight": b}
    if "dora_scale" in module.tensors:
        tensors["dora_scale"] = module.tensors["dora_scale"]
    baked = replace(module, kind="lora", tensors=tensors, alpha=float(kept), alpha_source="stored")
    approx = b.to_float32().reshape(out, kept).astype(np.float64) @ a.to_float32().reshape(kept, -1).astype(np.float64)
    norm = float(np.linalg.norm(flat))
    error = float(np.linalg.norm(flat - approx)) / norm if norm else 0.0
    return baked, BakedModule(module.name, module.kind, kept, error)


def bake_to_lora(model: LoraModel, rank: int) -> tuple[LoraModel, list[BakedModule]]:
    """A copy of ``model`` with every non-LoRA module replaced by its rank-``rank`` truncated SVD.

    LoRA modules are kept as they are (same tensor objects, bit-exact). Returns the new
    model and one :class:`BakedModule` per module baked, in model order.

    Example:
        >>> lora_model, report = bake_to_lora(loha_model, rank=16)   # doctest: +SKIP
        >>> max(r.relative_error for r in report)
    """
    if rank < 1:
        raise LoraBridgeError(f"--bake-to-lora needs a rank of at least 1, got {rank}")
    modules, report = {}, []
    for name, module in model.modules.items():
        if module.kind == "lora":
            modules[name] = module
            continue
        modules[name], baked = bake_module(module, rank)
        report.append(baked)
    return replace(model, modules=modules), report


def summary_line(report: list[BakedModule]) -> str:
    """One line over all baked modules: how many, and the median and worst relative error."""
    errors = sorted(r.relative_error for r in report)
    worst = max(report, key=lambda r: r.relative_error)
    median = errors[len(errors) // 2] if len(errors) % 2 else (errors[len(errors) // 2 - 1] + errors[len(errors) // 2]) / 2
    return (f"baked {len(report)} module(s) to plain LoRA by truncated SVD: relative error median {median:.3g}, "
            f"max {worst.relative_error:.3g} ({worst.name})")


def lora_only(model: LoraModel, target: str, bake_rank: int | None, path: str | os.PathLike | None) -> tuple[LoraModel, list[str]]:
    """What a writer of a LoRA-only format calls first: the model as plain LoRA, and warnings to return.

    Without ``bake_rank`` a model holding other kinds is refused with the modules listed;
    with it they are baked and the reconstruction error of each becomes a warning line.

    Example:
        >>> model, warnings = lora_only(model, "kohya", bake_rank=None, path="out.safetensors")   # doctest: +SKIP
    """
    others = [m for m in model.modules.values() if m.kind != "lora"]
    if not others:
        return model, []
    if bake_rank is None:
        shown = ", ".join(f"{m.name} ({m.kind})" for m in others[:SHOWN])
        more = f" (+{len(others) - SHOWN} more)" if len(others) > SHOWN else ""
        kinds = "/".join(sorted({m.kind for m in others}))
        raise LoraBridgeError(f"the {target} format holds only plain LoRA, {len(others)} module(s) are {kinds}: "
                              f"{shown}{more}; pass --bake-to-lora RANK to convert them by truncated SVD, "
                              "or write the lycoris format", path)
    baked, report = bake_to_lora(model, int(bake_rank))
    return baked, [summary_line(report), *(r.line() for r in report)]

