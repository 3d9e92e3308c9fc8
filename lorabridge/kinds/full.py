"""A full-weight delta (ComfyUI LoraSave, A1111 and LyCORIS "full"): delta W itself, no factors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..deltas import Svd
from ..tensor import Tensor, row_blocks
from .base import Finding, Kind, Shapes, Tensors

if TYPE_CHECKING:
    import numpy as np


class Full(Kind):
    """``diff`` has the weight's shape, ``diff_b`` (optional) the bias's; no rank, so alpha has no effect.

    Example:
        >>> from lorabridge.tensor import Tensor
        >>> t = {"diff": Tensor.from_numpy(np.full((2, 3), 0.5, "f4"))}
        >>> Full.rank(t), Full.weight_shape(t), Full.delta(t, 7.0).tolist()[0]
        (0, (2, 3), [0.5, 0.5, 0.5])
    """

    name = "full"
    required = ("diff",)
    optional = ("diff_b",)
    prefix = "diff"

    @staticmethod
    def rank(t: Tensors) -> int:
        return 0  # no factors: no rank, scale 1

    @staticmethod
    def weight_shape(t: Tensors) -> tuple[int, ...]:
        return t["diff"].shape

    @staticmethod
    def delta(t: Tensors, scale: float) -> np.ndarray:
        return t["diff"].to_float32()

    @staticmethod
    def shape_findings(t: Shapes) -> list[Finding]:
        """``diff`` is a Linear (out, in) or Conv2d (out, in, kh, kw) weight delta: a 1-D delta (a norm
        layer's scale) has no in/out features to describe it by. ``diff_b``, the bias delta, is (out,)."""
        diff, bias = t["diff"], t.get("diff_b")
        if len(diff) not in (2, 4):
            return [("shape", "diff", f"diff is {list(diff)}: a full delta is kept for a Linear (out, in) or Conv2d (out, in, kh, kw) weight only")]
        if bias is not None and tuple(bias) != (diff[0],):
            return [("shape", "diff_b", f"diff_b is {list(bias)}, the bias of a {list(diff)} weight is [{diff[0]}]")]
        return []

    @staticmethod
    def svd(t: Tensors, keep: int) -> Svd | None:
        return None  # delta W is dense

    @staticmethod
    def split_rows(t: Tensors, rows: Sequence[int]) -> list[dict[str, Tensor]] | None:
        """Rows of ``diff`` (delta W itself) and of ``diff_b`` (one value per row)."""
        parts = {role: row_blocks(t[role], rows) for role in ("diff", "diff_b") if role in t}
        return [{role: blocks[i] for role, blocks in parts.items()} for i in range(len(rows))]
