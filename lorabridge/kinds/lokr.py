"""LoKr (LyCORIS): delta W = scale * kron(w1, w2), each factor stored whole or decomposed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..deltas import Svd, dense_svd, factor_product, lokr_delta, lokr_tucker, svd_of_kron, svd_of_product
from ..tensor import Tensor, row_blocks
from .base import MISSING, Finding, Kind, Shapes, Tensors, matrix64, same_rank, wrong_ndim
from .dora import DORA_ROLE

if TYPE_CHECKING:
    import numpy as np


def _factor(t: Tensors, name: str) -> np.ndarray:
    if name in t:
        return t[name].to_float32()
    return factor_product(t[name + "_a"].to_float32(), t[name + "_b"].to_float32())


def _factor_svd(t: Tensors, name: str) -> Svd:
    if name in t:
        return dense_svd(matrix64(t[name]))
    return svd_of_product(matrix64(t[name + "_a"]), matrix64(t[name + "_b"]).T)


def _factor_findings(t: Shapes, name: str) -> list[Finding]:
    """A Kronecker factor stored whole (``name``) or decomposed (``name_a``, ``name_b``), not both, not neither."""
    whole, parts = name in t, [p for p in (f"{name}_a", f"{name}_b") if p in t]
    if whole and parts:
        return [("roles", parts[0], f"{name} is stored both whole and decomposed")]
    if not whole and len(parts) < 2:
        return [("missing-tensor", f"{name}_a" if not parts or parts[0] != f"{name}_a" else f"{name}_b", MISSING)]
    return []


class LoKr(Kind):
    """w1 (o1, i1) or w1_a (o1, r) @ w1_b (r, i1); w2 (o2, i2[, kh, kw]) or w2_a @ w2_b, or Tucker around t2.

    Every role is optional: which ones a module has says how each factor is stored. With both
    factors whole there is no rank and the scale is 1 (LyCORIS' convention).

    Example:
        >>> from lorabridge.tensor import Tensor
        >>> t = {"lokr_w1": Tensor.from_numpy(np.eye(2, dtype="f4")), "lokr_w2": Tensor.from_numpy(np.ones((1, 3), "f4"))}
        >>> LoKr.rank(t), LoKr.weight_shape(t), LoKr.delta(t, 1.0).tolist()
        (0, (2, 6), [[1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    """

    name = "lokr"
    required = ()
    optional = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", DORA_ROLE)
    prefix = "lokr_"

    @staticmethod
    def rank(t: Tensors) -> int:
        if "lokr_w2_b" in t:
            return t["lokr_w2_b"].shape[0]
        if "lokr_w1_b" in t:
            return t["lokr_w1_b"].shape[0]
        return 0  # both Kronecker factors full: no rank, scale 1 by LyCORIS' convention

    @staticmethod
    def weight_shape(t: Tensors) -> tuple[int, ...]:
        w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            w2 = t["lokr_w2"].shape
        elif "lokr_t2" in t:  # Tucker: w2_a (r, out2), w2_b (r, in2), kernel in t2 (r, r, kh, kw)
            w2 = (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1], *t["lokr_t2"].shape[2:])
        else:
            w2 = (t["lokr_w2_a"].shape[0], *t["lokr_w2_b"].shape[1:])
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])  # kron(w1, w2), computed from shapes only

    @staticmethod
    def delta(t: Tensors, scale: float) -> np.ndarray:
        w1 = _factor(t, "lokr_w1")
        if "lokr_t2" in t:  # Tucker: w2_a (r, out2), w2_b (r, in2) around a (r, r, kh, kw) core
            w2 = lokr_tucker(t["lokr_t2"].to_float32(), t["lokr_w2_a"].to_float32(), t["lokr_w2_b"].to_float32())
        else:
            w2 = _factor(t, "lokr_w2")
        return lokr_delta(w1, w2, scale)

    @staticmethod
    def shape_findings(t: Shapes) -> list[Finding]:
        problems = _factor_findings(t, "lokr_w1") + _factor_findings(t, "lokr_w2")
        if problems:
            return problems
        tucker = "lokr_t2" in t
        if tucker and "lokr_w2" in t:
            return [("roles", "lokr_t2", "a Tucker lokr_t2 needs a decomposed w2 (lokr_w2_a, lokr_w2_b), not lokr_w2")]
        problems = wrong_ndim(t, {"lokr_w1": (2,), "lokr_w1_a": (2,), "lokr_w1_b": (2,), "lokr_w2": (2, 4), "lokr_w2_a": (2,),
                                  "lokr_w2_b": (2,) if tucker else (2, 4), "lokr_t2": (4,)})
        pairs = [("lokr_w1_a", 1, "lokr_w1_b", 0)] if "lokr_w1_a" in t else []
        if tucker:
            pairs += [("lokr_w2_b", 0, "lokr_w2_a", 0), ("lokr_w2_b", 0, "lokr_t2", 0), ("lokr_w2_b", 0, "lokr_t2", 1)]
        elif "lokr_w2_a" in t:
            pairs += [("lokr_w2_a", 1, "lokr_w2_b", 0)]
        if "lokr_w1_b" in t and "lokr_w2_b" in t:
            pairs += [("lokr_w1_b", 0, "lokr_w2_b", 0)]
        return problems or same_rank(t, pairs)

    @staticmethod
    def svd(t: Tensors, keep: int) -> Svd | None:
        if "lokr_t2" in t:
            return None
        return svd_of_kron(_factor_svd(t, "lokr_w1"), _factor_svd(t, "lokr_w2"), keep)

    @staticmethod
    def split_rows(t: Tensors, rows: Sequence[int]) -> list[dict[str, Tensor]] | None:
        """Rows of w1 (of ``lokr_w1_a`` when w1 is decomposed), w2 shared, where every block is whole rows of w1.

        Row ``i * o2 + j`` of kron(w1, w2) (w2 has o2 rows) is kron(w1[i], w2[j]), so rows [s, s + n)
        are kron(w1[s / o2 : (s + n) / o2], w2) when o2 divides every block. Otherwise a block cuts
        through a row of w1 and is no Kronecker product: None. So is a Tucker LoKr (a conv's).
        """
        w1 = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"
        per_row = LoKr.weight_shape(t)[0] // t[w1].shape[0]  # o2: delta W's rows per row of w1
        if "lokr_t2" in t or any(n % per_row for n in rows):
            return None
        return [{**t, w1: block} for block in row_blocks(t[w1], [n // per_row for n in rows])]
