"""The architecture registry: every diffusion architecture lorabridge converts, as data.

An architecture is an :class:`Architecture` record (module tree with shapes, original-checkpoint
spelling, fused layers, tiny pipeline, pipeline classes). Formats never name a model: they ask the
registry. Which architecture a LoRA is for is decided from its module names and shapes
(:func:`lorabridge.formats.checks.check_model`), with a "looks like X" refusal when none fits.

Example:
    >>> get_architecture("stable-diffusion-xl-v1-base").label
    'SDXL'
"""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import LoraBridgeError
from .architecture import Architecture
from .flux1 import FLUX1
from .sdxl import SDXL

# name -> record, in detection order (the first that fits a LoRA wins).
ARCHITECTURES: dict[str, Architecture] = {SDXL.name: SDXL, FLUX1.name: FLUX1}
DEFAULT = SDXL  # what a LoRA without an architecture (old MindONE files, tiny test LoRAs) is taken for


def register(architecture: Architecture) -> Architecture:
    """Add an architecture to the registry (tests register toy ones; it stays for the process)."""
    if architecture.name in ARCHITECTURES and ARCHITECTURES[architecture.name] is not architecture:
        raise ValueError(f"architecture {architecture.name!r} is already registered")
    ARCHITECTURES[architecture.name] = architecture
    return architecture


def unregister(name: str) -> None:
    """Remove a registered architecture (for tests that register a toy one)."""
    if ARCHITECTURES.get(name) is DEFAULT:
        raise ValueError(f"{name!r} is the default architecture")
    ARCHITECTURES.pop(name, None)


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise LoraBridgeError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


def architectures() -> Iterator[Architecture]:
    """The registered architectures, in detection order."""
    return iter(list(ARCHITECTURES.values()))


def registered_components() -> tuple[str, ...]:
    """Every registered architecture's components, each once, in registration order.

    Example:
        >>> registered_components()
        ('unet', 'text_encoder', 'text_encoder_2', 'transformer')
    """
    return tuple(dict.fromkeys(c for architecture in architectures() for c in architecture.components))


def module_shape(component: str, path: str) -> tuple[int, ...] | None:
    """The weight shape of ``component.path`` in the first architecture that has it, or None."""
    for architecture in architectures():
        if component in architecture.components:
            shape = architecture.modules(component).get(path)
            if shape is not None:
                return shape
    return None
