"""Plain LoRA (LoCon for convs): delta W = alpha/r * B @ A."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..deltas import Svd, lora_delta, svd_of_product
from ..tensor import Tensor, row_blocks
from .base import Finding, Kind, Shapes, Tensors, matrix64, same_rank
from .dora import DORA_ROLE

if TYPE_CHECKING:
    import numpy as np


class Lora(Kind):
    """A (r, in[, kh, kw]) and B (out, r[, 1, 1]); a conv multiplies over the flattened in*kh*kw axis.

    Example:
        >>> from lorabridge.tensor import Tensor
        >>> t = {"lora_A.weight": Tensor.from_numpy(np.ones((2, 3), "f4")), "lora_B.weight": Tensor.from_numpy(np.ones((4, 2), "f4"))}
        >>> Lora.rank(t), Lora.weight_shape(t), Lora.delta(t, 0.5).tolist()[0]
        (2, (4, 3), [1.0, 1.0, 1.0])
    """

    name = "lora"
    required = ("lora_A.weight", "lora_B.weight")
    optional = (DORA_ROLE,)
    prefix = "lora_"

    @staticmethod
    def rank(t: Tensors) -> int:
        return t["lora_A.weight"].shape[0]

    @staticmethod
    def weight_shape(t: Tensors) -> tuple[int, ...]:
        a, b = t["lora_A.weight"].shape, t["lora_B.weight"].shape
        return (b[0], a[1], *a[2:])

    @staticmethod
    def delta(t: Tensors, scale: float) -> np.ndarray:
        return lora_delta(t["lora_A.weight"].to_float32(), t["lora_B.weight"].to_float32(), scale)

    @staticmethod
    def shape_findings(t: Shapes) -> list[Finding]:
        a, b = t["lora_A.weight"], t["lora_B.weight"]
        if len(a) not in (2, 4) or len(b) != len(a) or b[2:] not in ((), (1, 1)):
            return [("shape", "lora_B.weight", f"shapes lora_A {list(a)} / lora_B {list(b)} are neither a linear LoRA "
                                      "nor a conv LoRA (conv lora_B is (out, rank, 1, 1))")]
        return same_rank(t, [("lora_A.weight", 0, "lora_B.weight", 1)])

    @staticmethod
    def svd(t: Tensors, keep: int) -> Svd | None:
        return svd_of_product(matrix64(t["lora_B.weight"]), matrix64(t["lora_A.weight"]).T)

    @staticmethod
    def split_rows(t: Tensors, rows: Sequence[int]) -> list[dict[str, Tensor]] | None:
        """Rows of B, the whole A (shared): B's rows are delta W's."""
        return [{"lora_A.weight": t["lora_A.weight"], "lora_B.weight": b} for b in row_blocks(t["lora_B.weight"], rows)]
