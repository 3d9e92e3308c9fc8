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

from .errors import LoraBridgeError, listed
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


Svd = tuple[np.ndarray, np.ndarray, np.ndarray]  # U (m, k), singular values (k,) descending, Vt (k, n)


def svd_of_product(p: np.ndarray, q: np.ndarray) -> Svd:
    """Thin SVD of ``p @ q.T`` through QR of both factors: exact, and cheap when they are thin.

    Example:
        >>> u, s, vt = svd_of_product(np.ones((4, 1)), np.ones((3, 1)))
        >>> np.round(s, 6).tolist()
        [3.464102]
    """
    qp, rp = np.linalg.qr(p)
    qq, rq = np.linalg.qr(q)
    u, s, vt = np.linalg.svd(rp @ rq.T, full_matrices=False)
    return qp @ u, s, vt @ qq.T


def svd_of_kron(first: Svd, second: Svd, keep: int) -> Svd:
    """The ``keep`` leading singular triplets of ``kron(X, Y)`` from the SVDs of X and Y.

    kron(U1 S1 V1t, U2 S2 V2t) = kron(U1, U2) kron(S1, S2) kron(V1t, V2t): the singular values are the
    products s1_i * s2_j, their vectors the Kronecker products of the factors' vectors.
    """
    (u1, s1, v1), (u2, s2, v2) = first, second
    products = np.outer(s1, s2).ravel()
    order = np.argsort(-products, kind="stable")[:keep]
    i, j = np.divmod(order, len(s2))
    u = (u1[:, i][:, None, :] * u2[:, j][None, :, :]).reshape(u1.shape[0] * u2.shape[0], len(order))
    vt = (v1[i][:, :, None] * v2[j][:, None, :]).reshape(len(order), v1.shape[1] * v2.shape[1])
    return u, products[order], vt


def _matrix(tensor: Tensor) -> np.ndarray:
    """A factor as a float64 matrix, trailing (kernel) axes flattened into the columns."""
    x = tensor.to_float32().astype(np.float64)
    return x.reshape(x.shape[0], -1)


def _dense_svd(matrix: np.ndarray) -> Svd:
    return np.linalg.svd(matrix, full_matrices=False)


def _lokr_factor(t: dict[str, Tensor], name: str) -> Svd:
    if name in t:
        return _dense_svd(_matrix(t[name]))
    return svd_of_product(_matrix(t[name + "_a"]), _matrix(t[name + "_b"]).T)


def delta_svd(module: LoraModule, keep: int) -> Svd:
    """The ``keep`` leading singular triplets of a module's delta W, flattened to (out, in*kh*kw).

    Computed from the factors where their structure allows (LoRA and LoHa: delta W = P Q^T with a
    thin P and Q; LoKr: a Kronecker product), so a full-size SDXL module takes milliseconds, not the
    seconds a dense SVD of a 10240 x 1280 matrix takes. Tucker modules (convs only) go dense.
    """
    t = module.tensors
    if module.kind == "lora":
        u, s, vt = svd_of_product(_matrix(t["lora_B.weight"]), _matrix(t["lora_A.weight"]).T)
    elif module.kind == "loha" and "hada_t1" not in t:
        a1, b1, a2, b2 = (_matrix(t[r]) for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        # (a1 b1) * (a2 b2) = sum_ij (a1_i * a2_j)(b1_i * b2_j)^T: a rank <= r1*r2 product
        p = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
        q = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
        u, s, vt = svd_of_product(p, q.T)
    elif module.kind == "lokr" and "lokr_t2" not in t:
        u, s, vt = svd_of_kron(_lokr_factor(t, "lokr_w1"), _lokr_factor(t, "lokr_w2"), keep)
    else:  # delta_weight() is scaled already
        u, s, vt = _dense_svd(module.delta_weight().reshape(module.out_features, -1).astype(np.float64))
        return u[:, :keep], s[:keep], vt[:keep]
    scale = module.scale
    return (u[:, :keep] if scale >= 0 else -u[:, :keep]), s[:keep] * abs(scale), vt[:keep]


def bake_module(module: LoraModule, rank: int) -> tuple[LoraModule, BakedModule]:
    """The best rank-``rank`` LoRA for one module's delta W, and how far from it that is.

    alpha is set to the rank kept (scale 1), so ``B @ A`` is delta W itself; the singular
    values are split evenly (``sqrt(s)`` on each side) to keep both factors in fp16 range.
    A DoRA magnitude is kept as is: it applies to W + delta W whatever delta W is made of.
    The error is measured against delta W computed by :mod:`lorabridge.deltas`, with the
    factors as stored (after the cast to the module's dtype).

    Example:
        >>> lora, report = bake_module(loha_module, 8)   # doctest: +SKIP
        >>> report.relative_error   # doctest: +SKIP
    """
    out, rest = module.weight_shape[0], module.weight_shape[1:]
    u, s, vt = delta_svd(module, max(1, rank))
    kept = len(s)
    root = np.sqrt(s)
    dtype = module.dtype
    a = Tensor.from_numpy((root[:, None] * vt).astype(np.float32).reshape(kept, *rest), dtype)
    b = Tensor.from_numpy((u * root).astype(np.float32).reshape(out, kept, *[1] * (len(rest) - 1)), dtype)
    tensors = {"lora_A.weight": a, "lora_B.weight": b}
    if "dora_scale" in module.tensors:
        tensors["dora_scale"] = module.tensors["dora_scale"]
    baked = replace(module, kind="lora", tensors=tensors, alpha=float(kept), alpha_source="stored")
    delta = module.delta_weight().reshape(out, -1)
    norm = float(np.linalg.norm(delta))
    residual = delta - b.to_float32().reshape(out, kept) @ a.to_float32().reshape(kept, -1)
    error = float(np.linalg.norm(residual)) / norm if norm else 0.0
    return baked, BakedModule(module.name, module.kind, kept, error)


def bake_to_lora(model: LoraModel, rank: int, keeps: tuple[str, ...] = ("lora",)) -> tuple[LoraModel, list[BakedModule]]:
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
              keeps: tuple[str, ...] = ("lora",)) -> tuple[LoraModel, list[str]]:
    """What a writer of a LoRA-only format calls first: the model as plain LoRA, and warnings to return.

    ``keeps`` are the kinds the target holds besides (kohya files hold ``full`` deltas too). Without
    ``bake_rank`` a model holding other kinds is refused with the modules listed; with it they are
    baked and the reconstruction error of each becomes a warning line. Baking a ``full`` module
    keeps its weight delta only: a dropped bias delta (``diff_b``) is a warning line too.

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
    baked, report = bake_to_lora(model, int(bake_rank), keeps)
    biased = [m.name for m in others if "diff_b" in m.tensors]
    dropped = [f"dropped the bias delta (diff_b) of {len(biased)} baked full module(s), a LoRA has none: "
               f"{', '.join(biased[:SHOWN])}{' ...' if len(biased) > SHOWN else ''}"] if biased else []
    return baked, [summary_line(report), *dropped, *(r.line() for r in report)]
