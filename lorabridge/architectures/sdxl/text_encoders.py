"""SDXL text encoders: MindONE/SGM names <-> diffusers (transformers) names.

SDXL has two text towers. CLIP-L (``text_encoder``) is a transformers
``CLIPTextModel`` on both sides: only the prefix changes. OpenCLIP bigG
(``text_encoder_2``) is spelled the OpenCLIP way in SGM/MindONE
(``resblocks.N.attn.in_proj``, ``mlp.c_fc``...) and the transformers way in
diffusers (``layers.N.self_attn.q_proj``, ``mlp.fc1``...). OpenCLIP computes
q, k and v with one fused ``in_proj`` (rows ordered q, k, v), so a LoRA on it
is split into three diffusers modules and three are merged back into one, with
delta W kept exactly (the ``fused`` layer of the SDXL record; see :mod:`lorabridge.architectures.fused`).
SGM names here are full checkpoint paths, ``conditioner.embedders.N...`` included.

What MindONE's SDXL code does (examples/stable_diffusion_xl, gm/modules/embedders):
its CLIP-L is a port of transformers' ``CLIPTextModel`` with the same module
names, and its LoRA variant adapts ``self_attn.{q,k,v,out}_proj``. Its OpenCLIP
attention keeps q/k/v as a bare ``in_proj_weight`` parameter (3*width, width),
not a layer, so its LoRA variant adapts only ``attn.out_proj``; a LoRA on the
fused projection is spelled ``attn.in_proj`` here, the name the
``in_proj_weight`` parameter implies.
"""

from __future__ import annotations

from .tree import TREE

# component -> SGM prefix in front of the path that stays unchanged / the OpenCLIP model root.
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPENCLIP_PREFIX = "conditioner.embedders.1.model."

# OpenCLIP bigG, per layer: SGM name under ``transformer.resblocks.N.`` -> diffusers name under
# ``text_model.encoder.layers.N.``.
OPENCLIP_LAYER = {
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
}
# OpenCLIP modules outside the layers (``positional_embedding`` and ``text_projection`` are bare
# parameters there, not modules, so no LoRA can target them).
OPENCLIP_TOP = {
    "token_embedding": "text_model.embeddings.token_embedding",
    "ln_final": "text_model.final_layer_norm",
}
OPENCLIP_LAYERS = "transformer.resblocks."
DIFFUSERS_LAYERS = "text_model.encoder.layers."

_OPENCLIP_LAYER_INV = {v: k for k, v in OPENCLIP_LAYER.items()}
_OPENCLIP_TOP_INV = {v: k for k, v in OPENCLIP_TOP.items()}


def _split_layer(path: str, prefix: str) -> tuple[str, str] | None:
    """("N", rest) of ``<prefix>N.<rest>``, or None."""
    if not path.startswith(prefix):
        return None
    index, _, rest = path[len(prefix):].partition(".")
    return (index, rest) if index.isdigit() and rest else None


def _openclip_to_diffusers(path: str) -> str | None:
    if path in OPENCLIP_TOP:
        return OPENCLIP_TOP[path]
    layer = _split_layer(path, OPENCLIP_LAYERS)
    if layer and layer[1] in OPENCLIP_LAYER:
        return f"{DIFFUSERS_LAYERS}{layer[0]}.{OPENCLIP_LAYER[layer[1]]}"
    return None


def sgm_text_to_diffusers(name: str) -> tuple[str, str] | None:
    """(component, diffusers path) of an SGM/MindONE text-encoder module name, or None.

    The fused bigG ``attn.in_proj`` has no single diffusers module: see :meth:`Architecture.fused_parts`.

    Example:
        >>> sgm_text_to_diffusers("conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_fc")
        ('text_encoder_2', 'text_model.encoder.layers.3.mlp.fc1')
        >>> sgm_text_to_diffusers("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj")
        ('text_encoder', 'text_model.encoder.layers.0.self_attn.q_proj')
    """
    path: str | None
    if name.startswith(CLIP_L_PREFIX):
        component, path = "text_encoder", name[len(CLIP_L_PREFIX):]
    elif name.startswith(OPENCLIP_PREFIX):
        component, path = "text_encoder_2", _openclip_to_diffusers(name[len(OPENCLIP_PREFIX):])
    else:
        return None
    return (component, path) if path is not None and path in TREE.modules(component) else None


def diffusers_text_to_sgm(component: str, path: str) -> str | None:
    """The SGM/MindONE name of a diffusers text-encoder module, or None.

    bigG q/k/v projections have no own SGM module (they live in the fused
    ``in_proj``): see :meth:`Architecture.fused_name`.

    Example:
        >>> diffusers_text_to_sgm("text_encoder_2", "text_model.encoder.layers.3.self_attn.out_proj")
        'conditioner.embedders.1.model.transformer.resblocks.3.attn.out_proj'
    """
    if component not in ("text_encoder", "text_encoder_2") or path not in TREE.modules(component):
        return None
    if component == "text_encoder":
        return CLIP_L_PREFIX + path
    if path in _OPENCLIP_TOP_INV:
        return OPENCLIP_PREFIX + _OPENCLIP_TOP_INV[path]
    layer = _split_layer(path, DIFFUSERS_LAYERS)
    if layer and layer[1] in _OPENCLIP_LAYER_INV:
        return f"{OPENCLIP_PREFIX}{OPENCLIP_LAYERS}{layer[0]}.{_OPENCLIP_LAYER_INV[layer[1]]}"
    return None
