"""The DoRA magnitude: one optional tensor role of the factored kinds, with an axis.

``dora_scale`` holds one norm per output row (axis ``"out"``: PEFT, LyCORIS' default) or per
input column (axis ``"in"``: OneTrainer, LyCORIS ``wd_on_output=False``), in the one shape of
:func:`dora_shape`. Files that do not say the axis give it by the shape (:func:`dora_axis_of`).
"""

from __future__ import annotations

from ..tensor import Tensor
from .base import DoraAxis, Finding

DORA_ROLE = "dora_scale"
DORA_AXES: tuple[DoraAxis, ...] = ("out", "in")


def dora_shape(axis: str, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The one shape a ``dora_scale`` has for ``axis`` on a weight of ``weight_shape`` (spec 3.3):
    (out, 1[, 1, 1]) per output row, (1, in[, 1, 1]) per input column. Readers of files that spell
    it otherwise (PEFT's (out,), kohya/LyCORIS files) reshape to it: same bytes.

    Example:
        >>> dora_shape("out", (320, 640, 3, 3)), dora_shape("in", (16, 8))
        ((320, 1, 1, 1), (1, 8))
    """
    ones = (1,) * (len(weight_shape) - 2)
    return (weight_shape[0], 1, *ones) if axis == "out" else (1, weight_shape[1], *ones)


def dora_axis_of(shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> DoraAxis | None:
    """Which norms a magnitude of ``shape`` holds: ``"out"`` for (out, 1, ...), ``"in"`` for (1, in, ...), None for neither.

    Example:
        >>> dora_axis_of((1, 8), (16, 8)), dora_axis_of((16,), (16, 8)), dora_axis_of((8,), (16, 8))
        ('in', 'out', None)
    """
    out, inp = weight_shape[:2]
    if shape and shape[0] == out and all(d == 1 for d in shape[1:]):
        return "out"
    if len(shape) >= 2 and shape[0] == 1 and shape[1] == inp and all(d == 1 for d in shape[2:]):
        return "in"
    return None


def dora_findings(axis: str | None, scale: Tensor, weight: tuple[int, ...]) -> list[Finding]:
    """A DoRA magnitude: one value per output row (axis "out") or input column (axis "in"), in :func:`dora_shape`."""
    shape = tuple(scale.shape)
    if axis not in DORA_AXES:
        return [("dora", DORA_ROLE, "a DoRA magnitude needs dora_axis 'out' or 'in'")]
    numel = scale.numel
    size, expected = (weight[0] if axis == "out" else weight[1]), dora_shape(axis, weight)
    if shape == expected:
        return []
    other = "in" if axis == "out" else "out"
    hint = f" (that is the {other} axis' shape)" if shape == dora_shape(other, weight) else ""
    if numel != size and not hint:
        return [("dora", DORA_ROLE, f"DoRA magnitude has {numel} values, expected {size} (axis {axis})")]
    return [("dora", DORA_ROLE, f"DoRA magnitude is {list(shape)}, dora_axis {axis!r} on a {list(weight)} "
                                f"weight needs {list(expected)}{hint}")]
