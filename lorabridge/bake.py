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

from .deltas import Svd, dense_svd
from .errors import LoraBridgeError, listed
from .kinds import DORA_ROLE, KINDS, KindName
from .model import LoraModel, LoraModule, named_tensors
from .tensor import Tensor, refuse_math

SHOWN = 5  # modules named in a refusal


@dataclass(frozen=True)
class BakedModule:
    """What baking did to one module: its former kind, the rank kept, the error left."""

    name: str
    from_kind: KindName
    rank: int
    relative_error: float  # ||dW - B A||_F / ||dW||_F, B and A as stored

    def line(self) -> str:
        return f"{self.name}: {self.from_kind} baked to LoRA rank {self.rank}, relative error {self.relative_error:.3g}"


def delta_svd(module: LoraModule, keep: int) -> Svd:
    """The ``keep`` leading singular triplets of a module's delta W, flattened to (out, in*kh*kw).

    Computed from the factors where their structure allows (LoRA and LoHa: delta W = P Q^T with a
    thin P and Q; LoKr: a Kronecker product; each kind's ``svd`` in :mod:`lorabridge.kinds`), so a full-size
    SDXL module takes milliseconds, not the seconds a dense SVD of a 10240 x 1280 matrix takes. Tucker
    modules (convs only) and full deltas go dense.
    """
    import numpy as np
    factored = KINDS[module.kind].svd(module.tensors, keep)
    if factored is None:  # delta_weight() is scaled already
        u, s, vt = dense_svd(module.delta_weight().reshape(module.out_features, -1).astype(np.float64))
        return u[:, :keep], s[:keep], vt[:keep]
    u, s, vt = factored
    scale = module.scale
    return (u[:, :keep] if scale >= 0 else -u[:, :keep]), s[:keep] * abs(scale), vt[:keep]


def lora_from_svd(module: LoraModule, svd: Svd) -> LoraModule:
    """``module`` as a plain LoRA holding the singular triplets ``svd`` of its delta W (flattened to (out, in*kh*kw)).

    alpha is set to the rank kept (scale 1), so ``B @ A`` is U diag(s) Vt itself; the singular
    values are split evenly (``sqrt(s)`` on each side) to keep both factors in fp16 range. The
    factors are stored in the module's dtype; a DoRA magnitude is kept as is.

    Example:
        >>> m = LoraModule("unet.x.proj", "full", {"diff": Tensor.from_numpy(np.diag([4.0, 1.0]).astype("f4"))}, 1.0)
        >>> lora = lora_from_svd(m, delta_svd(m, 1))
        >>> lora.kind, lora.rank, lora.alpha, lora.delta_weight().tolist()
        ('lora', 1, 1.0, [[4.0, 0.0], [0.0, 0.0]])
    """
    import numpy as np
    out, rest = module.weight_shape[0], module.weight_shape[1:]
    u, s, vt = svd
    kept = len(s)
    root = np.sqrt(s)
    dtype = module.dtype
    a = Tensor.from_numpy((root[:, None] * vt).astype(np.float32).reshape(kept, *rest), dtype)
    b = Tensor.from_numpy((u * root).astype(np.float32).reshape(out, kept, *[1] * (len(rest) - 1)), dtype)
    tensors = {"lora_A.weight": a, "lora_B.weight": b}
    if DORA_ROLE in module.tensors:
        tensors[DORA_ROLE] = module.tensors[DORA_ROLE]
    return replace(module, kind="lora", tensors=tensors, alpha=float(kept), alpha_source="stored")


def bake_module(module: LoraModule, rank: int) -> tuple[LoraModule, BakedModule]:
    """The best rank-``rank`` LoRA for one module's delta W, and how far from it that is.

    The LoRA is :func:`lora_from_svd` of the leading ``rank`` triplets (alpha = rank kept, scale 1).
    A DoRA magnitude is kept as is: it applies to W + delta W whatever delta W is made of.
    The error is measured against delta W computed by :mod:`lorabridge.deltas`, with the
    factors as stored (after the cast to the module's dtype).

    Example:
        >>> lora, report = bake_module(loha_module, 8)   # doctest: +SKIP
        >>> report.relative_error   # doctest: +SKIP
    """
    import numpy as np
    out = module.weight_shape[0]
    baked = lora_from_svd(module, delta_svd(module, max(1, rank)))
    a, b, kept = baked.tensors["lora_A.weight"], baked.tensors["lora_B.weight"], baked.rank
    delta = module.delta_weight().reshape(out, -1)
    norm = float(np.linalg.norm(delta))
    residual = delta - b.to_float32().reshape(out, kept) @ a.to_float32().reshape(kept, -1)
    error = float(np.linalg.norm(residual)) / norm if norm else 0.0
    return baked, BakedModule(module.name, module.kind, kept, error)


def bake_to_lora(model: LoraModel, rank: int, keeps: tuple[KindName, ...] = ("lora",)) -> tuple[LoraModel, list[BakedModule]]:
    """A copy of ``model`` with every module not of a kind in ``keeps`` replaced by its rank-``rank`` truncated SVD.

    Modules of the kinds kept stay as they are (same tensor objects, bit-exact). Returns the new
    model and one :class:`BakedModule` per module baked, in model order.

    Example:
        >>> lora_model, report = bake_to_lora(loha_model, rank=16)   # doctest: +SKIP
        >>> max(r.relative_error for r in report)   # doctest: +SKIP
    """
    if rank < 1:
        raise LoraBridgeError(f"--bake-to-lora needs a rank of at least 1, got {rank}")
    modules, report = {}, []
    for name, module in model.modules.items():
        if module.kind in keeps:
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


def lora_only(model: LoraModel, target: str, bake_rank: int | None, path: str | os.PathLike | None,
              keeps: tuple[KindName, ...] = ("lora",)) -> tuple[LoraModel, list[str]]:
    """What a writer of a LoRA-only format calls first: the model as plain LoRA, and warnings to return.

    ``keeps`` are the kinds the target holds besides (kohya files hold ``full`` deltas too). Without
    ``bake_rank`` a model holding other kinds is refused with the modules listed; with it they are
    baked and the reconstruction error of each becomes a warning line. Baking a ``full`` module
    keeps its weight delta only: a dropped bias delta (``diff_b``) is a warning line too. Factors to bake
    in FP8 are refused, naming them: numpy, which the SVD runs in, has no FP8 type.

    Example:
        >>> model, warnings = lora_only(model, "kohya", bake_rank=None, path="out.safetensors")   # doctest: +SKIP
    """
    others = [m for m in model.modules.values() if m.kind not in keeps]
    if not others:
        return model, []
    if bake_rank is None:
        shown = listed([f"{m.name} ({m.kind})" for m in others], SHOWN, ", ")
        kinds = "/".join(sorted({m.kind for m in others}))
        holds = " and ".join(["plain LoRA", *(f"{kind} deltas" for kind in keeps if kind != "lora")])
        raise LoraBridgeError(f"the {target} format holds only {holds}, {len(others)} module(s) are {kinds}: "
                              f"{shown}; pass --bake-to-lora RANK to convert them by truncated SVD, "
                              "or write the lycoris format", path)
    refuse_math(named_tensors(others, skip=(DORA_ROLE,)), "--bake-to-lora's SVD", path)  # the magnitude is kept as it is
    baked, report = bake_to_lora(model, int(bake_rank), keeps)
    biased = [m.name for m in others if "diff_b" in m.tensors]
    dropped = [f"dropped the bias delta (diff_b) of {len(biased)} baked full module(s), a LoRA has none: "
               f"{', '.join(biased[:SHOWN])}{' ...' if len(biased) > SHOWN else ''}"] if biased else []
    return baked, [summary_line(report), *dropped, *(r.line() for r in report)]
