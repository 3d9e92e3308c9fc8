"""What a LoRA kind is: the interface every entry of :data:`lorabridge.kinds.KINDS` fills in.

In the spirit of PEFT's ``LoraVariant``, a kind is a small object of static facts and functions:
its tensor roles, its rank and the shape of the weight it adapts (from tensor shapes alone), its
float32 delta W (the formulas are in :mod:`lorabridge.deltas`), the shape rules its tensors follow
(the per-kind part of :mod:`lorabridge.rules`) and, for baking, the SVD of its delta W where its
structure makes that cheap. Nothing here knows modules or files, so the model, the rules, baking
and every format can look kinds up without importing one another.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Literal

from ..deltas import Svd
from ..tensor import Tensor

if TYPE_CHECKING:
    import numpy as np

KindName = Literal["lora", "loha", "lokr", "full"]
AlphaSource = Literal["stored", "user", "assumed"]  # read from the file, given (--alpha), or = rank: the source has none
DoraAxis = Literal["out", "in"]  # a DoRA magnitude per output row (PEFT/LyCORIS default) or per input column

Tensors = Mapping[str, Tensor]  # role -> tensor; a role is the key suffix after the module name
Shapes = dict[str, tuple[int, ...]]  # role -> shape
Finding = tuple[str, str, str]  # (reason class of spec section 8, role, what is wrong)
MISSING = "missing"  # what a Finding says of a required role that is absent


class Kind(ABC):
    """One LoRA kind. The functions see a module's tensors only after :meth:`shape_findings` found
    nothing wrong with them (the rules run before any math), except :meth:`shape_findings` itself."""

    name: ClassVar[KindName]
    required: ClassVar[tuple[str, ...]]  # tensor roles every module of the kind has
    optional: ClassVar[tuple[str, ...]]  # roles it may have besides
    prefix: ClassVar[str]  # every role of the kind but the DoRA magnitude starts with it (LyCORIS tells kinds apart by it)

    @property
    def roles(self) -> tuple[str, ...]:
        return self.required + self.optional

    @staticmethod
    @abstractmethod
    def rank(t: Tensors) -> int:
        """The rank alpha is divided by; 0 when there are no factors to have one (scale 1)."""

    @staticmethod
    @abstractmethod
    def weight_shape(t: Tensors) -> tuple[int, ...]:
        """Shape of the adapted weight: (out, in) for a linear, (out, in, kh, kw) for a conv."""

    @staticmethod
    @abstractmethod
    def delta(t: Tensors, scale: float) -> np.ndarray:
        """The float32 weight update, ``scale`` (alpha / rank, or 1) applied; DoRA magnitude not applied."""

    @staticmethod
    @abstractmethod
    def shape_findings(t: Shapes) -> list[Finding]:
        """What is wrong with the shapes of the kind's tensors (all required roles present, none empty)."""

    @staticmethod
    @abstractmethod
    def svd(t: Tensors, keep: int) -> Svd | None:
        """At least the ``keep`` leading singular triplets of the unscaled delta W, flattened to
        (out, in*kh*kw), computed from the factors; None where only a dense SVD of :meth:`delta` will do."""

    @staticmethod
    @abstractmethod
    def split_rows(t: Tensors, rows: Sequence[int]) -> list[dict[str, Tensor]] | None:
        """The tensors of one module per block of ``rows`` output rows of a linear layer (a fused layer's
        parts, :func:`lorabridge.architectures.fused.split_fused`), each of this kind with the same rank,
        so that at the same scale its delta W is exactly those rows of delta W: views of the same bytes,
        no arithmetic. None where this kind's structure does not split at those rows. ``t`` holds the
        factors only (a DoRA magnitude, one value per row, is split by the caller)."""


def matrix64(tensor: Tensor) -> np.ndarray:
    """A factor as a float64 matrix, trailing (kernel) axes flattened into the columns."""
    import numpy as np
    x = tensor.to_float32().astype(np.float64)
    return x.reshape(x.shape[0], -1)


def mismatch(t: Shapes, left: str, right: str) -> Finding:
    shown = {role: role.removesuffix(".weight") for role in (left, right)}
    return "rank-mismatch", right, f"rank mismatch, {shown[left]} is {list(t[left])} but {shown[right]} is {list(t[right])}"


def wrong_ndim(t: Shapes, allowed: dict[str, tuple[int, ...]]) -> list[Finding]:
    """Roles whose number of axes is not one of those allowed for them."""
    return [("shape", role, f"{role} is {list(t[role])}, expected {' or '.join(f'{n}-d' for n in dims)}")
            for role, dims in allowed.items() if role in t and len(t[role]) not in dims]


def same_rank(t: Shapes, pairs: list[tuple[str, int, str, int]]) -> list[Finding]:
    """The first pair (role, axis, role, axis) whose rank axes disagree, if any."""
    for left, i, right, j in pairs:
        if t[left][i] != t[right][j]:
            return [mismatch(t, left, right)]
    return []
