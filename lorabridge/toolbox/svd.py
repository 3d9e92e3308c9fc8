"""Low-rank math shared by resize and merge: a module's singular spectrum, the rank a target asks
for, and the error a low-rank replacement leaves.

For a plain LoRA, delta W = (alpha/r) B A is never formed: its SVD comes from thin QRs of B and
A^T (:func:`lorabridge.deltas.svd_of_product`, the same path baking takes), and the error of a
replacement B' A' is the Frobenius norm of [sB, -B'] [A; A'], computed from the two small Gram
matrices of its factors (``||L R||^2 = sum((L^T L) * (R R^T))``), so a 1280 x 10240 module costs a
(r + k)-square product, not a dense matrix. Other kinds (LoHa, LoKr, full deltas) take
:func:`lorabridge.bake.delta_svd`, which is as cheap as their structure allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..bake import delta_svd
from ..deltas import Svd
from ..errors import LoraBridgeError
from ..kinds.base import matrix64
from ..model import LoraModule


def spectrum(module: LoraModule) -> Svd:
    """Every singular triplet of ``module``'s delta W (alpha/rank applied), flattened to (out, in*kh*kw).

    A plain LoRA has at most ``rank`` of them: no target can ask for more than its factors hold.

    Example:
        >>> from lorabridge.tensor import Tensor
        >>> t = {"lora_A.weight": Tensor.from_numpy(np.eye(2, 6, dtype="f4")), "lora_B.weight": Tensor.from_numpy(np.eye(5, 2, dtype="f4"))}
        >>> u, s, vt = spectrum(LoraModule("unet.x", "lora", t, alpha=4.0))
        >>> u.shape, s.round(6).tolist(), vt.shape
        ((5, 2), [2.0, 2.0], (2, 6))
    """
    out, *rest = module.weight_shape
    return delta_svd(module, min(out, math.prod(rest)))


@dataclass(frozen=True)
class RankTarget:
    """What a resize keeps per module: a fixed ``rank``, or the fewest singular values whose dropped
    tail leaves at most ``max_error`` relative Frobenius error, or that hold ``energy`` of the squared
    Frobenius norm. Exactly one is given. Never more than the module's spectrum holds, never below 1.

    Example:
        >>> s = np.array([4.0, 2.0, 1.0])
        >>> RankTarget(rank=8).choose(s), RankTarget(max_error=0.3).choose(s), RankTarget(energy=0.9).choose(s)
        (3, 2, 2)
        >>> RankTarget(rank=0)
        Traceback (most recent call last):
        lorabridge.errors.LoraBridgeError: --rank must be at least 1, got 0
    """

    rank: int | None = None
    max_error: float | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("rank", "max_error", "energy") if getattr(self, name) is not None]
        if len(given) != 1:
            raise LoraBridgeError("give exactly one of --rank, --max-error, --energy"
                                  + (f" (got {', '.join('--' + g.replace('_', '-') for g in given)})" if given else ""))
        if self.rank is not None and (isinstance(self.rank, bool) or int(self.rank) != self.rank or self.rank < 1):
            raise LoraBridgeError(f"--rank must be at least 1, got {self.rank}")
        if self.max_error is not None and not 0 <= self.max_error < 1:
            raise LoraBridgeError(f"--max-error must be in [0, 1), got {self.max_error}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise LoraBridgeError(f"--energy must be in (0, 1], got {self.energy}")

    def choose(self, s: np.ndarray) -> int:
        """The rank to keep of singular values ``s`` (descending)."""
        if self.rank is not None:
            return max(1, min(int(self.rank), len(s)))
        power = np.asarray(s, np.float64) ** 2
        total = power.sum()
        if total == 0:
            return 1
        kept = np.cumsum(power) / total  # share of the energy held by the first k+1 values
        if self.energy is not None:
            enough = kept >= self.energy * (1 - 1e-12)
        else:
            enough = np.sqrt(np.clip(1 - kept, 0, None)) <= self.max_error
        return int(np.argmax(enough)) + 1 if enough.any() else len(s)

    def describe(self) -> str:
        """The target as the command line spells it."""
        if self.rank is not None:
            return f"--rank {self.rank}"
        return f"--max-error {self.max_error:g}" if self.max_error is not None else f"--energy {self.energy:g}"


def _lora_factors(module: LoraModule) -> tuple[np.ndarray, np.ndarray]:
    """(scale * B, A) of a plain LoRA as float64 matrices (conv kernels flattened into A's columns)."""
    return matrix64(module.tensors["lora_B.weight"]) * module.scale, matrix64(module.tensors["lora_A.weight"])


def _product_norm(left: np.ndarray, right: np.ndarray) -> float:
    """||left @ right||_F from the Gram matrices of the factors, never forming the product."""
    return math.sqrt(max(float(np.sum((left.T @ left) * (right @ right.T))), 0.0))


def delta_norm(module: LoraModule) -> float:
    """||delta W||_F of ``module`` (from its factors for a plain LoRA).

    Example:
        >>> from lorabridge.tensor import Tensor
        >>> t = {"lora_A.weight": Tensor.from_numpy(np.ones((1, 4), "f4")), "lora_B.weight": Tensor.from_numpy(np.ones((9, 1), "f4"))}
        >>> delta_norm(LoraModule("unet.x", "lora", t, alpha=0.5))
        3.0
    """
    if module.kind == "lora":
        return _product_norm(*_lora_factors(module))
    return float(np.linalg.norm(module.delta_weight().astype(np.float64)))


def residual_norm(module: LoraModule, approx: LoraModule) -> float:
    """||delta W(module) - delta W(approx)||_F, both as stored; from the factors when both are plain LoRA.

    Example:
        >>> from lorabridge.tensor import Tensor
        >>> t = {"lora_A.weight": Tensor.from_numpy(np.eye(2, 3, dtype="f4")), "lora_B.weight": Tensor.from_numpy(np.eye(3, 2, dtype="f4"))}
        >>> m = LoraModule("unet.x", "lora", t, alpha=2.0)
        >>> residual_norm(m, m), round(residual_norm(m, LoraModule("unet.x", "lora", t, alpha=0.0)), 6)
        (0.0, 1.414214)
    """
    if module.kind == approx.kind == "lora":
        (old_b, old_a), (new_b, new_a) = _lora_factors(module), _lora_factors(approx)
        return _product_norm(np.hstack([old_b, -new_b]), np.vstack([old_a, new_a]))
    return float(np.linalg.norm(module.delta_weight().astype(np.float64) - approx.delta_weight()))
