"""What lorabridge knows about one diffusion architecture, as one record of data.

Formats and checks ask an :class:`Architecture` (never a model name) for module shapes, the
original-checkpoint spelling of a path, fused layers and pipeline classes, so adding an
architecture is adding a record (see ``docs/adding-an-architecture.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import importlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..errors import LoraBridgeError
from .fused import FusedLayer
from .tree import ModuleTree

@dataclass(frozen=True)
class Inference:
    """How ``infer`` runs an architecture's pipeline: data the adapters read (they name no architecture).

    ``pipeline_classes`` are the ``model_index.json`` ``_class_name`` values of a base directory of this
    architecture; ``denoiser`` the pipeline component that denoises (its dtype is the latents'); ``lora_components`` those
    its ``load_lora_weights`` loads (diffusers' and mindone's FluxPipeline: no T5 LoRA); ``required``
    config values of the denoiser that tell the architecture apart (SDXL's ``text_time`` conditioning);
    ``schedulers`` the key of the scheduler table it samples with (``adapters.options.SCHEDULER_TABLES``:
    denoising diffusion or flow matching); ``guidance_scale`` the ``--guidance-scale`` default;
    ``negative_prompt`` whether the pipeline takes one; ``patch`` the side of the latent patches the
    denoiser reads as one token (Flux.1 packs 2x2); ``native_size`` the default image side, None when the
    denoiser's ``sample_size`` times the VAE's scale gives it; ``text_encoders`` the components that only
    encode the prompt (``infer`` loads, runs and frees them before the denoiser loads: ``adapters.staging``).
    """

    pipeline_classes: tuple[str, ...]
    denoiser: str
    lora_components: tuple[str, ...]  # the components the pipeline's load_lora_weights loads
    schedulers: str
    guidance_scale: float
    negative_prompt: bool = True
    required: Mapping[str, Any] = field(default_factory=dict)
    patch: int = 1
    native_size: int | None = None
    text_encoders: tuple[str, ...] = ("text_encoder", "text_encoder_2")


PathSpelling = Callable[[str], "str | None"]  # diffusers path -> another spelling of it (None: it has none)


def underscored(path: str) -> str:
    """The kohya/LyCORIS spelling of a module path: dots become underscores.

    Example:
        >>> underscored("down_blocks.1.attentions.0.proj_in")
        'down_blocks_1_attentions_0_proj_in'
    """
    return path.replace(".", "_")


@dataclass(frozen=True, eq=False)
class Architecture:
    """One registered architecture.

    ``name`` is what the neutral manifest's ``architecture`` field says; ``label`` is how messages
    name it ("not an SDXL LoRA", with ``article``), ``reference`` the model whose shapes ``tree`` holds. ``tree`` holds every weight-bearing module with its shape, per
    component, in diffusers spelling (the canonical one). ``original_paths`` gives, per component,
    the path's spelling in the original checkpoint (SGM/LDM for SD, BFL for Flux) where it differs:
    kohya names may use either, and kohya writes it. ``fused`` lists the layers the original
    checkpoint computes as one matrix. ``short`` is the name commands take (``make-tiny --arch sdxl``).
    ``tiny`` names the module that builds its tiny pipeline for tests and demos (each such module has
    ``build_tiny``, ``write_tiny_lora`` and ``lora_file_format``); ``real`` the module whose ``base_parts()`` gives
    the reference model's pipeline components at real size on the meta device (``make-base``); ``inference`` says how ``infer`` runs it; ``pipelines`` the pipeline class per framework, as ``module:Class``; ``modelspec``
    the ``modelspec.*`` metadata a kohya-style file written for it carries. ``kohya_prefixes`` gives,
    per component, the prefix of its kohya/LyCORIS underscored keys (``lora_unet`` is SDXL's UNet but
    Flux's transformer); ``comfyui_prefixes`` the prefix of ComfyUI's generic dotted names
    (``diffusion_model``, ``text_encoders.clip_l.transformer``).

    Example:
        >>> toy = Architecture("toy", "Toy", ModuleTree(entries={"unet": {"blocks.0.proj": ("Linear", (8, 4))}}))
        >>> toy.components, toy.resolve_underscored("unet", "blocks_0_proj")
        (('unet',), 'blocks.0.proj')
    """

    name: str
    label: str
    tree: ModuleTree
    reference: str = ""
    article: str = "a"
    original_paths: Mapping[str, PathSpelling] = field(default_factory=dict)
    fused: tuple[FusedLayer, ...] = ()
    short: str = ""
    tiny: str | None = None
    real: str | None = None
    inference: Inference | None = None
    pipelines: Mapping[str, str] = field(default_factory=dict)
    modelspec: Mapping[str, str] = field(default_factory=dict)  # Stability's modelspec fields kohya-style files carry
    kohya_prefixes: Mapping[str, str] = field(default_factory=dict)  # component -> kohya key prefix
    comfyui_prefixes: Mapping[str, str] = field(default_factory=dict)  # component -> ComfyUI generic dotted prefix
    variants: Mapping[str, Mapping[str, tuple[tuple[int, ...], ...]]] = field(default_factory=dict)

    @property
    def a_label(self) -> str:
        """The label with its article, for messages ("an SDXL")."""
        return f"{self.article} {self.label}"

    @property
    def components(self) -> tuple[str, ...]:
        return self.tree.components

    def modules(self, component: str) -> Mapping[str, tuple[int, ...]]:
        """Weight shape by diffusers path (see :meth:`ModuleTree.modules`)."""
        return self.tree.modules(component)

    def module_types(self, component: str) -> Mapping[str, str]:
        return self.tree.module_types(component)

    def is_lora_target(self, component: str, path: str) -> bool:
        return self.tree.is_lora_target(component, path)

    def variant_shapes(self, component: str, path: str) -> tuple[tuple[int, ...], ...]:
        """The module's weight shapes in variants of the reference model, besides the tree's (usually none)."""
        return self.variants.get(component, {}).get(path, ())

    def original_path(self, component: str, path: str) -> str | None:
        """The original checkpoint's spelling of a module path (the path itself where they agree), or None."""
        if path not in self.tree.modules(component):
            return None
        spell = self.original_paths.get(component)
        return path if spell is None else spell(path)

    def pipeline_class(self, framework: str) -> Any:
        """The pipeline class ``infer`` runs in ``framework`` ("torch" or "mindspore"), imported on demand."""
        module, _, name = self.pipelines[framework].partition(":")
        return getattr(importlib.import_module(module), name)

    def tiny_builder(self) -> Any:
        """The module that builds this architecture's tiny pipeline (see ``tiny``), imported on demand."""
        if self.tiny is None:
            raise LoraBridgeError(f"lorabridge has no tiny {self.label} pipeline")
        return importlib.import_module(self.tiny)

    def real_parts(self) -> dict[str, Any]:
        """The reference model's pipeline components at real size (weight-bearing ones on the meta device; see ``real``)."""
        if self.real is None:
            raise LoraBridgeError(f"lorabridge has no real-size {self.label} base")
        return importlib.import_module(self.real).base_parts()

    @cached_property
    def _from_original(self) -> dict[str, dict[str, str]]:
        """component -> original path -> diffusers path: the inverse of :meth:`original_path`."""
        out: dict[str, dict[str, str]] = {}
        for component in self.original_paths:
            table = out.setdefault(component, {})
            for path in self.tree.modules(component):
                original = self.original_path(component, path)
                if original is not None:
                    table[original] = path
        return out

    def from_original(self, component: str, original: str) -> str | None:
        """The diffusers path of an original-checkpoint path, or None if it names no module of the tree."""
        if component not in self.original_paths:
            return original if original in self.tree.modules(component) else None
        return self._from_original[component].get(original)

    @cached_property
    def _underscored(self) -> dict[str, dict[str, str]]:
        """component -> underscored name -> diffusers path, in diffusers and the original spelling."""
        tables = {}
        for component in self.components:
            table = {underscored(p): p for p in self.tree.modules(component)}
            table.update({underscored(o): p for o, p in self._from_original.get(component, {}).items()})
            tables[component] = table
        return tables

    def resolve_underscored(self, component: str, name: str) -> str | None:
        """The diffusers module path a kohya/LyCORIS underscored name stands for, or None if none.

        Names may be in diffusers spelling (LyCORIS, diffusers-style kohya) or the original one
        (kohya sd-scripts and A1111 spell SDXL's UNet the SGM way); the answer is the diffusers path.
        """
        return self._underscored.get(component, {}).get(name)

    @cached_property
    def _fused_underscored(self) -> dict[str, dict[str, tuple[str, tuple[str, ...]]]]:
        """component -> underscored fused name -> (original fused name, part paths), for the fused layers
        spelled in the component's original spelling: those whose parts have no original name of their own
        (Flux's ``qkv``; not bigG's ``in_proj``, whose parts kohya names one by one)."""
        tables: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {}
        for layer in self.fused:
            modules = self.tree.modules(layer.component)
            for path in modules:
                found = layer.fused_of(path)
                if found is None or found[1] != 0 or self.original_path(layer.component, path) is not None:
                    continue
                parts = self.fused_parts(found[0])
                if parts is not None:
                    tables.setdefault(layer.component, {})[underscored(found[0])] = (found[0], parts[1])
        return tables

    def resolve_fused_underscored(self, component: str, name: str) -> tuple[str, tuple[str, ...]] | None:
        """(original fused name, part paths) when a kohya underscored name stands for a fused layer of the
        original spelling (its parts have no original name of their own), else None.

        Example:
            >>> toy = Architecture("toy", "Toy", ModuleTree(entries={"t": {f"b.0.{p}": ("Linear", (4, 4)) for p in "qkv"}}),
            ...                    original_paths={"t": {}.get}, fused=(FusedLayer("t", "b.{n}.qkv", ("b.{n}.q", "b.{n}.k", "b.{n}.v")),))
            >>> toy.resolve_fused_underscored("t", "b_0_qkv")
            ('b.0.qkv', ('b.0.q', 'b.0.k', 'b.0.v'))
        """
        return self._fused_underscored.get(component, {}).get(name)

    def original_spelling(self, component: str, path: str) -> tuple[str, int | None] | None:
        """(original name, None) of a module, or (fused layer's original name, row block) when the original
        spelling has no name for the module but computes it as a part of a fused layer; None if neither."""
        original = self.original_path(component, path)
        if original is not None:
            return original, None
        fused = self.fused_name(component, path)
        return fused if fused is not None and self.fused_parts(fused[0]) is not None else None

    def fused_sizes(self, original: str) -> tuple[int, ...]:
        """The output sizes of a fused layer's parts in the full-size model (the ratio its rows split in),
        () when ``original`` names no fused layer whose parts are all in the tree."""
        found = self.fused_parts(original)
        return () if found is None else self.part_sizes(*found)

    def fused_parts(self, original: str) -> tuple[str, tuple[str, ...]] | None:
        """(component, part paths) of a fused layer's original name when every part is in the tree, else None."""
        for layer in self.fused:
            parts = layer.parts_of(original)
            if parts is not None:
                modules = self.tree.modules(layer.component)
                return (layer.component, parts) if all(p in modules for p in parts) else None
        return None

    def part_sizes(self, component: str, parts: tuple[str, ...]) -> tuple[int, ...]:
        """The output sizes of a fused layer's parts in the reference model, for :func:`~.fused.split_fused`
        (Flux.1's ``linear1``: 3072, 3072, 3072 and 12288)."""
        modules = self.tree.modules(component)
        return tuple(modules[part][0] for part in parts)

    def fused_name(self, component: str, path: str) -> tuple[str, int] | None:
        """(fused layer's original name, row block) when ``path`` is a part of a fused layer, else None."""
        if path not in self.tree.modules(component):
            return None
        for layer in self.fused:
            found = layer.fused_of(path) if layer.component == component else None
            if found is not None:
                return found
        return None
