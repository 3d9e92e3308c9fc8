"""Weight-update math shared by checks, fusing and baking: delta W per kind, in float32, and its SVD.

These are the formulas the spec states; tests compare real diffusers/mindone
fused weights against them, computed independently of any loader. They take
numpy arrays and know nothing of modules: :mod:`lorabridge.kinds` says which
tensors of a kind go where.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

Svd = tuple["np.ndarray", "np.ndarray", "np.ndarray"]  # U (m, k), singular values (k,) descending, Vt (k, n)


def lora_delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """scale * B @ A; for conv A is (r, in, kh, kw) and B (out, r, 1, 1), the product reshaped back."""
    import numpy as np
    rank = a.shape[0]
    flat = b.reshape(b.shape[0], rank).astype(np.float32, copy=False) @ a.reshape(rank, -1).astype(np.float32, copy=False)
    return (scale * flat).reshape((b.shape[0], *a.shape[1:])).astype(np.float32, copy=False)


def factor_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A factor stored decomposed, ``a`` (out, r) @ ``b`` (r, in[, kh, kw]), with ``b``'s trailing axes kept."""
    return (a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)).reshape((a.shape[0], *b.shape[1:]))


def loha_delta(w1a: np.ndarray, w1b: np.ndarray, w2a: np.ndarray, w2b: np.ndarray, scale: float,
               t1: np.ndarray | None = None, t2: np.ndarray | None = None) -> np.ndarray:
    """scale * (w1a @ w1b) * (w2a @ w2b); Tucker (``t1``, ``t2`` given): w_a (r, out), w_b (r, in) around t (r, r, kh, kw)."""
    import numpy as np
    if t1 is not None and t2 is not None:
        w1 = np.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
        w2 = np.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
    else:
        w1 = lora_delta(w1b, w1a, 1.0)
        w2 = lora_delta(w2b, w2a, 1.0)
    return (w1 * w2 * scale).astype(np.float32, copy=False)


def lokr_tucker(t2: np.ndarray, w2a: np.ndarray, w2b: np.ndarray) -> np.ndarray:
    """A Tucker LoKr's second factor: w2_a (r, out2), w2_b (r, in2) around a (r, r, kh, kw) core."""
    import numpy as np
    return np.einsum("ijkl,ip,jr->prkl", t2, w2a, w2b)


def lokr_delta(w1: np.ndarray, w2: np.ndarray, scale: float) -> np.ndarray:
    """scale * kron(w1, w2); a 2-d ``w1`` gets kernel axes of size 1 when ``w2`` is a conv factor."""
    import numpy as np
    if w2.ndim == 4 and w1.ndim == 2:
        w1 = w1[:, :, None, None]
    return (np.kron(w1, w2) * scale).astype(np.float32, copy=False)


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
    import numpy as np
    v = np.asarray(weight, np.float32) + np.asarray(delta, np.float32)
    if axis == "out":
        norm = np.linalg.norm(v.reshape(v.shape[0], -1), axis=1).reshape(v.shape[0], *[1] * (v.ndim - 1))
    elif axis == "in":
        per_in = np.swapaxes(v, 0, 1).reshape(v.shape[1], -1)
        norm = np.linalg.norm(per_in, axis=1).reshape(1, v.shape[1], *[1] * (v.ndim - 2))
    else:
        raise ValueError(f"dora axis must be 'out' or 'in', not {axis!r}")
    return (np.asarray(magnitude, np.float32).reshape(norm.shape) * v / (norm + eps)).astype(np.float32)


def dense_svd(matrix: np.ndarray) -> Svd:
    """Thin SVD of a dense matrix."""
    import numpy as np
    return np.linalg.svd(matrix, full_matrices=False)


def svd_of_product(p: np.ndarray, q: np.ndarray) -> Svd:
    """Thin SVD of ``p @ q.T`` through QR of both factors: exact, and cheap when they are thin.

    Example:
        >>> u, s, vt = svd_of_product(np.ones((4, 1)), np.ones((3, 1)))
        >>> np.round(s, 6).tolist()
        [3.464102]
    """
    import numpy as np
    qp, rp = np.linalg.qr(p)
    qq, rq = np.linalg.qr(q)
    u, s, vt = np.linalg.svd(rp @ rq.T, full_matrices=False)
    return qp @ u, s, vt @ qq.T


def svd_of_kron(first: Svd, second: Svd, keep: int) -> Svd:
    """The ``keep`` leading singular triplets of ``kron(X, Y)`` from the SVDs of X and Y.

    kron(U1 S1 V1t, U2 S2 V2t) = kron(U1, U2) kron(S1, S2) kron(V1t, V2t): the singular values are the
    products s1_i * s2_j, their vectors the Kronecker products of the factors' vectors.
    """
    import numpy as np
    (u1, s1, v1), (u2, s2, v2) = first, second
    products = np.outer(s1, s2).ravel()
    order = np.argsort(-products, kind="stable")[:keep]
    i, j = np.divmod(order, len(s2))
    u = (u1[:, i][:, None, :] * u2[:, j][None, :, :]).reshape(u1.shape[0] * u2.shape[0], len(order))
    vt = (v1[i][:, :, None] * v2[j][:, None, :]).reshape(len(order), v1.shape[1] * v2.shape[1])
    return u, products[order], vt
