"""An architecture's module tree as data: every weight-bearing layer a LoRA may target, with its shape.

Name mapping must be checked against real modules, never guessed from a regex or paired by list
position, and it must work without torch. So each tree is generated once from the real
diffusers/transformers classes (``tools/gen_module_tree.py``, on torch's meta device) into a JSON file
beside the architecture's data, and read here lazily: ``{component: {path: [layer type, weight shape]}}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cached_property
from importlib import resources
from types import MappingProxyType

# Layer types a LoRA (or LyCORIS full/norm training) can attach to.
LORA_TARGET_TYPES = ("Linear", "Conv2d")

Entries = dict[str, dict[str, tuple[str, tuple[int, ...]]]]


class ModuleTree:
    """The module tree of one architecture, read from a JSON resource on first use.

    ``package``/``resource`` name the JSON file (``importlib.resources``); ``entries`` gives the tree
    inline instead (a toy architecture made from data alone).

    Example:
        >>> tree = ModuleTree(entries={"unet": {"blocks.0.proj": ("Linear", (8, 4))}})
        >>> tree.modules("unet")["blocks.0.proj"], tree.is_lora_target("unet", "blocks.0.proj")
        ((8, 4), True)
    """

    def __init__(self, package: str | None = None, resource: str | None = None, *,
                 entries: Mapping[str, Mapping[str, tuple[str, tuple[int, ...]]]] | None = None) -> None:
        source = (package, resource) if package is not None and resource is not None else None
        if (entries is None) == (source is None):
            raise ValueError("give a JSON resource (package and resource) or the entries, not both")
        self._source = source
        self._entries = entries

    @cached_property
    def _tree(self) -> Entries:
        if self._source is not None:
            package, resource = self._source
            raw = json.loads(resources.files(package).joinpath(resource).read_text())
        else:
            raw = self._entries or {}
        return {c: {p: (t, tuple(s)) for p, (t, s) in mods.items()} for c, mods in raw.items()}

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self._tree)

    def _component(self, component: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        try:
            return self._tree[component]
        except KeyError:
            raise ValueError(f"unknown component {component!r}; expected one of {', '.join(self._tree)}") from None

    @cached_property
    def _shapes(self) -> dict[str, Mapping[str, tuple[int, ...]]]:
        return {c: MappingProxyType({p: shape for p, (_, shape) in mods.items()}) for c, mods in self._tree.items()}

    @cached_property
    def _types(self) -> dict[str, Mapping[str, str]]:
        return {c: MappingProxyType({p: kind for p, (kind, _) in mods.items()}) for c, mods in self._tree.items()}

    def modules(self, component: str) -> Mapping[str, tuple[int, ...]]:
        """Weight shape of every weight-bearing module of a component, by diffusers path (read-only).

        Shapes are PyTorch's: (out, in) for Linear, (out, in, kh, kw) for Conv2d,
        (channels,) for norms, (num, dim) for embeddings.
        """
        self._component(component)
        return self._shapes[component]

    def module_types(self, component: str) -> Mapping[str, str]:
        """Layer type name (``Linear``, ``Conv2d``, ``LayerNorm``, ``GroupNorm``, ``Embedding``) by path."""
        self._component(component)
        return self._types[component]

    def all_modules(self) -> dict[str, Mapping[str, tuple[int, ...]]]:
        """component -> :meth:`modules`, for every component."""
        return dict(self._shapes)

    def is_lora_target(self, component: str, path: str) -> bool:
        """True when ``path`` is a Linear or Conv2d of the component: a layer a LoRA factorisation can adapt."""
        return self.module_types(component).get(path) in LORA_TARGET_TYPES
