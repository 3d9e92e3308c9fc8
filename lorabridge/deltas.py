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
    flat = b.reshape(b.shape[0], rank).astype(np.float32, copy=False) @ a.reshape(rank, -1).astype(np.float32, copy=False)
    return (scale * flat).reshape((b.shape[0], *a.shape[1:])).astype(np.float32, copy=False)


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
        return (w1 * w2 * module.scale).astype(np.float32, copy=False)
    if module.kind == "lokr":
        w1 = _factor(t, "lokr_w1", "lokr_w1_a", "lokr_w1_b")
        if "lokr_t2" in t:  # Tucker: w2_a (r, out2), w2_b (r, in2) around a (r, r, kh, kw) core
            w2 = np.einsum("ijkl,ip,jr->prkl", t["lokr_t2"].to_float32(), t["lokr_w2_a"].to_float32(), t["lokr_w2_b"].to_float32())
        else:
            w2 = _factor(t, "lokr_w2", "lokr_w2_a", "lokr_w2_b")
        if w2.ndim == 4 and w1.ndim == 2:
            w1 = w1[:, :, None, None]
        return (np.kron(w1, w2) * module.scale).astype(np.float32, copy=False)
    if module.kind == "full":
        return t["diff"].to_float32()
    raise ValueError(f"unknown LoRA kind {module.kind!r}")


def dora_weight(weight: np.ndarray, delta: np.ndarray, magnitude: np.ndarray, axis: str, eps: float = 0.0) -> np.ndarray:
    """The DoRA weight ``m * V / ||V||`` with ``V = W + delta``, in float32.

    ``axis`` says which norms ``magnitude`` holds: ``"out"`` one per output row (shape (out, 1, ...),
    PEFT and LyCORIS' default), ``"in"`` one per input column (shape (1, in, ...), LyCORIS
    ``wd_on_output=False``). LyCORIS and ComfyUI add float32 epsilon to the norm (``eps``); PEFT does not.

    Example:
        >>> w = np.eye(2, dtype=np.float32); m = np.array([[2.0], [3.0]], np.float32)
        >>> dora_weight(w, np.zeros_like(w), m, "out").tolist()
        [[2.0, 0.0], [0.0, 3.0]]
    """
    v = np.asarray(weight, np.float32) + np.asarray(delta, np.float32)
    if axis == "out":
        norm = np.linalg.norm(v.reshape(v.shape[0], -1), axis=1).reshape(v.shape[0], *[1] * (v.ndim - 1))
    elif axis == "in":
        per_in = np.swapaxes(v, 0, 1).reshape(v.shape[1], -1)
        norm = np.linalg.norm(per_in, axis=1).reshape(1, v.shape[1], *[1] * (v.ndim - 2))
    else:
        raise ValueError(f"dora axis must be 'out' or 'in', not {axis!r}")
    return (np.asarray(magnitude, np.float32).reshape(norm.shape) * v / (norm + eps)).astype(np.float32)
