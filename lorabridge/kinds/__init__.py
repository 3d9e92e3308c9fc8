"""One home per LoRA kind: :data:`KINDS`, the table the model, the rules, baking and the formats look kinds up in.

Each entry (:class:`~lorabridge.kinds.base.Kind`) holds one kind's tensor roles, rank, adapted
weight shape, float32 delta W, shape rules and SVD for baking; the DoRA magnitude, an optional role
of the factored kinds, has its home in :mod:`lorabridge.kinds.dora`. Adding a kind is adding a
module here and its entry in :data:`KINDS` (and a value of :data:`KindName`).

Example:
    >>> KINDS["lokr"].prefix, KINDS["full"].required
    ('lokr_', ('diff',))
    >>> KINDS["oft"]
    Traceback (most recent call last):
    ...
    ValueError: unknown LoRA kind 'oft' (lorabridge knows lora, loha, lokr, full)
"""

from __future__ import annotations

from .base import MISSING, AlphaSource, DoraAxis, Finding, Kind, KindName, Shapes
from .dora import DORA_AXES, DORA_ROLE, dora_axis_of, dora_findings, dora_shape
from .full import Full
from .loha import LoHa
from .lokr import LoKr
from .lora import Lora

__all__ = ["ALL_ROLES", "DORA_AXES", "DORA_ROLE", "KINDS", "MISSING", "AlphaSource", "DoraAxis", "Finding", "Kind",
           "KindName", "Shapes", "dora_axis_of", "dora_findings", "dora_shape", "kinds_of"]


class KindTable(dict[str, Kind]):
    """Kinds by name; looking up a name that is none of them is a ValueError that lists the kinds."""

    def __missing__(self, name: str) -> Kind:
        raise ValueError(f"unknown LoRA kind {name!r} (lorabridge knows {', '.join(self)})")


KINDS = KindTable((kind.name, kind) for kind in (Lora(), LoHa(), LoKr(), Full()))
# Every role of every kind, longest first, so that a key is split at its longest matching role.
ALL_ROLES = sorted({role for kind in KINDS.values() for role in kind.roles}, key=len, reverse=True)


def kinds_of(roles: list[str]) -> set[KindName]:
    """The kinds whose role prefix the ``roles`` have (a file's own suffixes of a kind, such as
    LyCORIS' ``lora_mid.weight``, share it); the DoRA magnitude belongs to every kind, and to none here.

    Example:
        >>> sorted(kinds_of(["hada_w1_a", "hada_t1", "dora_scale"])), sorted(kinds_of(["lora_mid.weight", "diff"]))
        (['loha'], ['full', 'lora'])
    """
    return {kind.name for role in roles for kind in KINDS.values() if role.startswith(kind.prefix)}
