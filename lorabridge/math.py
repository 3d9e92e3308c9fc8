"""Weight-update math shared by checks, fusing and baking: delta W per kind, in float32.

These are the formulas the spec states; tests compare real diffusers/mindone
fused weights against them, computed independently of any loader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .model import LoraModule


def lora_delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """scale * B @ A; for conv A is (r, in, kh, kw) and B (out, r, 1, 1), the product reshaped back."""
    rank = a.shape[0]
    flat = b.reshape(b.shape[0], rank).astype(np.float32) @ a.reshape(rank, -1).astype(np.float32)
    return (scale * flat).reshape((b.shape[0], *a.shape[1:])).astype(np.float32)


def _factor(t: dict, whole: str, left: str, right: str) -> np.ndarray:
    if whole in t:
        return t[whole].to_float32()
    a, b = t[left].to_float32(), t[right].to_float32()
    return (a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)).reshape((a.shape[0], *b.shape[1:]))


def delta_weight(module: "LoraModule") -> np.ndarray:
    """The float32 delta W of one module (see :meth:`LoraModule.delta_weight`)."""
    t = module.tensors
    if module.kind == "lora":
        return lora_delta(t["lora_A.weight"].to_float32(), t["lora_B.weight"].to_float32(), module.scale)
    if module.kind == "loha":
        if "hada_t1" in t:
            w1 = np.einsum("ijkl,jr,ip->prkl", t["hada_t1"].to_float32(), t["hada_w1_b"].to_float32(), t["hada_w1_a"].to_float32())
            w2 = np.einsum("ijkl,jr,ip->prkl", t["hada_t2"].to_float32(), t["hada_w2_b"].to_float32(), t["hada_w2_a"].to_float32())
        else:
            w1 = lora_delta(t["hada_w1_b"].to_float32(), t["hada_w1_a"].to_float32(), 1.0)
            w2 = lora_delta(t["hada_w2_b"].to_float32(), t["hada_w2_a"].to_float32(), 1.0)
        return (w1 * w2 * module.scale).astype(np.float32)
    if module.kind == "lokr":
        w1 = _factor(t, "lokr_w1", "lokr_w1_a", "lokr_w1_b")
        w2 = _factor(t, "lokr_w2", "lokr_w2_a", "lokr_w2_b")
        if w2.ndim == 4 and w1.ndim == 2:
            w1 = w1[:, :, None, None]
        return (np.kron(w1, w2) * module.scale).astype(np.float32)
    raise ValueError(f"unknown LoRA kind {module.kind!r}")
