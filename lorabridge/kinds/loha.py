"""LoHa (LyCORIS): delta W = alpha/r * (w1a @ w1b) * (w2a @ w2b), a Hadamard product of two low-rank factors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..deltas import Svd, loha_delta, svd_of_product
from ..tensor import Tensor, row_blocks
from .base import Finding, Kind, Shapes, Tensors, matrix64, same_rank, wrong_ndim
from .dora import DORA_ROLE

if TYPE_CHECKING:
    import numpy as np

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHa(Kind):
    """Plain: w_a (out, r), w_b (r, in[, kh, kw]); Tucker (convs): w_a (r, out), w_b (r, in), t (r, r, kh, kw).

    Example:
        >>> from lorabridge.tensor import Tensor
        >>> f = lambda *shape: Tensor.from_numpy(np.ones(shape, "f4"))
        >>> t = {"hada_w1_a": f(4, 2), "hada_w1_b": f(2, 3), "hada_w2_a": f(4, 2), "hada_w2_b": f(2, 3)}
        >>> LoHa.rank(t), LoHa.weight_shape(t), LoHa.delta(t, 0.5).tolist()[0]
        (2, (4, 3), [2.0, 2.0, 2.0])
    """

    name = "loha"
    required = FACTORS
    optional = ("hada_t1", "hada_t2", DORA_ROLE)
    prefix = "hada_"

    @staticmethod
    def rank(t: Tensors) -> int:
        return t["hada_w1_b"].shape[0]

    @staticmethod
    def weight_shape(t: Tensors) -> tuple[int, ...]:
        if "hada_t1" in t:  # Tucker: w_a (r, out), w_b (r, in), kernel in t (r, r, kh, kw)
            return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1], *t["hada_t1"].shape[2:])
        return (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1], *t["hada_w1_b"].shape[2:])

    @staticmethod
    def delta(t: Tensors, scale: float) -> np.ndarray:
        w1a, w1b, w2a, w2b = (t[r].to_float32() for r in FACTORS)
        t1, t2 = (t[r].to_float32() if r in t else None for r in ("hada_t1", "hada_t2"))
        return loha_delta(w1a, w1b, w2a, w2b, scale, t1, t2)

    @staticmethod
    def shape_findings(t: Shapes) -> list[Finding]:
        if ("hada_t1" in t) != ("hada_t2" in t):
            return [("missing-tensor", "hada_t2" if "hada_t1" in t else "hada_t1", "a Tucker LoHa needs both hada_t1 and hada_t2")]
        if "hada_t1" in t:
            problems = wrong_ndim(t, {"hada_w1_a": (2,), "hada_w2_a": (2,), "hada_w1_b": (2,), "hada_w2_b": (2,),
                                      "hada_t1": (4,), "hada_t2": (4,)})
            rank_axes = [("hada_w1_b", 0, "hada_w1_a", 0), ("hada_w1_b", 0, "hada_t1", 0), ("hada_w1_b", 0, "hada_t1", 1),
                         ("hada_w1_b", 0, "hada_w2_a", 0), ("hada_w1_b", 0, "hada_w2_b", 0), ("hada_w1_b", 0, "hada_t2", 0),
                         ("hada_w1_b", 0, "hada_t2", 1)]
            w1: tuple[tuple[int, ...], ...] = (t["hada_w1_a"][1:], t["hada_w1_b"][1:], t["hada_t1"][2:])
            w2: tuple[tuple[int, ...], ...] = (t["hada_w2_a"][1:], t["hada_w2_b"][1:], t["hada_t2"][2:])
        else:
            problems = wrong_ndim(t, {"hada_w1_a": (2,), "hada_w2_a": (2,), "hada_w1_b": (2, 4), "hada_w2_b": (2, 4)})
            rank_axes = [("hada_w1_a", 1, "hada_w1_b", 0), ("hada_w2_a", 1, "hada_w2_b", 0), ("hada_w1_b", 0, "hada_w2_b", 0)]
            w1 = (t["hada_w1_a"][:1], t["hada_w1_b"][1:])
            w2 = (t["hada_w2_a"][:1], t["hada_w2_b"][1:])
        problems = problems or same_rank(t, rank_axes)
        if not problems and w1 != w2:
            problems = [("shape", "hada_w2_a", f"the Hadamard factors differ in shape: w1 is {[d for part in w1 for d in part]}, "
                                      f"w2 is {[d for part in w2 for d in part]}")]
        return problems

    @staticmethod
    def svd(t: Tensors, keep: int) -> Svd | None:
        if "hada_t1" in t:
            return None
        a1, b1, a2, b2 = (matrix64(t[r]) for r in FACTORS)
        # (a1 b1) * (a2 b2) = sum_ij (a1_i * a2_j)(b1_i * b2_j)^T: a rank <= r1*r2 product
        p = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
        q = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
        return svd_of_product(p, q.T)

    @staticmethod
    def split_rows(t: Tensors, rows: Sequence[int]) -> list[dict[str, Tensor]] | None:
        """Rows of ``hada_w1_a`` and ``hada_w2_a``, the ``_b`` factors shared: row i of (w1a w1b) * (w2a w2b) is
        (w1a[i] w1b) * (w2a[i] w2b). A Tucker LoHa (a conv's: its ``_a`` factors are (rank, out)) is not split."""
        if "hada_t1" in t:
            return None
        halves = zip(row_blocks(t["hada_w1_a"], rows), row_blocks(t["hada_w2_a"], rows))
        return [{**t, "hada_w1_a": w1a, "hada_w2_a": w2a} for w1a, w2a in halves]
