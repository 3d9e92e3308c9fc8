"""The SDXL-base module tree as data: every weight-bearing layer a LoRA may target, with its shape.

Name mapping must be checked against real modules, never guessed from a
regex or paired by list position, and it must work without torch. So the tree
is generated once from real diffusers/transformers classes (tools/gen_sdxl_tree.py,
on torch's meta device) into ``lorabridge/data/sdxl_modules.json`` and read here
lazily. kohya/LyCORIS names spell dots as underscores, which is ambiguous
(``to_out_0``, ``ff_net_0_proj``, ``time_emb_proj``); :func:`resolve_underscored`
undoes it by lookup in tables built from the real paths.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from importlib import resources
from types import MappingProxyType

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# Layer types a LoRA (or LyCORIS full/norm training) can attach to.
LORA_TARGET_TYPES = ("Linear", "Conv2d")


@cache
def _tree() -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    text = resources.files("lorabridge.data").joinpath("sdxl_modules.json").read_text()
    raw = json.loads(text)
    return {c: {p: (t, tuple(s)) for p, (t, s) in mods.items()} for c, mods in raw.items()}


def _component(component: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    try:
        return _tree()[component]
    except KeyError:
        raise ValueError(f"unknown SDXL component {component!r}; expected one of {', '.join(COMPONENTS)}") from None


@cache
def sdxl_modules(component: str) -> Mapping[str, tuple[int, ...]]:
    """Weight shape of every weight-bearing module of an SDXL-base component, by diffusers path.

    Shapes are PyTorch's: (out, in) for Linear, (out, in, kh, kw) for Conv2d,
    (channels,) for norms, (num, dim) for embeddings. The mapping is read-only (it is shared).

    Example:
        >>> sdxl_modules("unet")["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
        (640, 2048)
    """
    return MappingProxyType({path: shape for path, (_, shape) in _component(component).items()})


@cache
def sdxl_module_types(component: str) -> Mapping[str, str]:
    """Layer type name (``Linear``, ``Conv2d``, ``LayerNorm``, ``GroupNorm``, ``Embedding``) by diffusers path.

    Example:
        >>> sdxl_module_types("unet")["conv_in"]
        'Conv2d'
    """
    return MappingProxyType({path: kind for path, (kind, _) in _component(component).items()})


def is_lora_target(component: str, path: str) -> bool:
    """True when ``path`` is a Linear or Conv2d of the component: a layer a LoRA factorisation can adapt.

    Example:
        >>> is_lora_target("unet", "conv_in"), is_lora_target("unet", "conv_norm_out")
        (True, False)
    """
    return sdxl_module_types(component).get(path) in LORA_TARGET_TYPES


def underscored(path: str) -> str:
    """The kohya/LyCORIS spelling of a module path: dots become underscores.

    Example:
        >>> underscored("down_blocks.1.attentions.0.proj_in")
        'down_blocks_1_attentions_0_proj_in'
    """
    return path.replace(".", "_")


@cache
def _underscored_table(component: str) -> dict[str, str]:
    """underscored name -> diffusers path, in diffusers spelling and (UNet only) SGM spelling."""
    table = {underscored(p): p for p in sdxl_modules(component)}
    if component == "unet":
        from .sgm import diffusers_to_sgm

        for path in sdxl_modules(component):
            sgm = diffusers_to_sgm(path)
            if sgm is not None:
                table[underscored(sgm)] = path
    return table


def resolve_underscored(component: str, name: str) -> str | None:
    """The diffusers module path a kohya/LyCORIS underscored name stands for, or None if none.

    UNet names may be in diffusers spelling (LyCORIS, diffusers-style kohya) or
    SGM spelling (kohya sd-scripts, A1111); the answer is always the diffusers path.
    Text encoder names are in transformers' spelling for both CLIP-L and bigG.

    Example:
        >>> resolve_underscored("unet", "input_blocks_4_1_transformer_blocks_0_attn1_to_out_0")
        'down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0'
        >>> resolve_underscored("text_encoder", "text_model_encoder_layers_0_mlp_fc1")
        'text_model.encoder.layers.0.mlp.fc1'
    """
    return _underscored_table(component).get(name)
