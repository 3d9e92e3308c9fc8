"""SGM (original SDXL, MindONE, kohya) <-> diffusers UNet module paths, as tables plus block arithmetic.

SGM numbers the UNet as flat ``input_blocks.i`` / ``output_blocks.i`` lists
whose entries hold a resnet (``.0``), an attention (``.1``) and maybe a resampler;
diffusers nests them as ``down_blocks[level].resnets[j]`` / ``.attentions[j]``.
The index arithmetic below follows the SDXL-base layout (three entries per level:
``input_blocks.i`` (i >= 1) -> ``down_blocks[(i-1)//3]``, ``output_blocks.i`` -> ``up_blocks[i//3]``),
and every answer is checked against the real module tree, so a path that names
no SDXL-base module maps to None instead of to a plausible-looking guess.
Paths have no ``model.diffusion_model.`` / ``unet.`` prefix.
"""

from __future__ import annotations

from .sdxl_tree import sdxl_modules

# SDXL-base layout: resnets per down level (up levels have one more), and which up levels hold attentions
# (an up level's upsampler comes after its attention, so this decides the upsampler's slot).
LAYERS_PER_BLOCK = 2
UP_HAS_ATTENTION = (True, True, False)

# Modules outside the blocks: diffusers path -> SGM path.
TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

# Layers inside a resnet: diffusers name -> SGM name. Attention internals are spelled alike on both sides.
RESNET_LAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# Resampler convolutions: diffusers name (after ``downsamplers.0`` / ``upsamplers.0``) -> SGM name.
DOWNSAMPLER_LAYER = ("conv", "op")
UPSAMPLER_LAYER = ("conv", "conv")

_TOP_LEVEL_SGM = {v: k for k, v in TOP_LEVEL.items()}
_RESNET_LAYERS_SGM = {v: k for k, v in RESNET_LAYERS.items()}
_PER_LEVEL = LAYERS_PER_BLOCK + 1  # SGM blocks per down level (resnets + downsampler) and per up level


def _upsampler_slot(level: int) -> int:
    """Position of the upsampler inside an SGM output block: after the resnet and the attention if any."""
    return 2 if UP_HAS_ATTENTION[level] else 1


def _inner_to_sgm(kind: str, rest: str) -> tuple[int, str] | None:
    """(slot, SGM suffix) of a resnet or attention sub-path inside an SGM block."""
    if kind == "resnets":
        return (0, RESNET_LAYERS[rest]) if rest in RESNET_LAYERS else None
    if kind == "attentions":
        return 1, rest
    return None


def _diffusers_to_sgm(path: str) -> str | None:
    if path in TOP_LEVEL:
        return TOP_LEVEL[path]
    parts = path.split(".")
    if parts[0] == "mid_block" and len(parts) > 3 and parts[2].isdigit():
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * j}.{RESNET_LAYERS[rest]}" if rest in RESNET_LAYERS else None
        return f"middle_block.1.{rest}" if kind == "attentions" and j == 0 else None
    if parts[0] not in ("down_blocks", "up_blocks") or len(parts) < 5 or not (parts[1].isdigit() and parts[3].isdigit()):
        return None
    level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            ok = j == 0 and rest == DOWNSAMPLER_LAYER[0]
            return f"input_blocks.{level * _PER_LEVEL + _PER_LEVEL}.0.{DOWNSAMPLER_LAYER[1]}" if ok else None
        inner = _inner_to_sgm(kind, rest)
        return f"input_blocks.{level * _PER_LEVEL + 1 + j}.{inner[0]}.{inner[1]}" if inner else None
    if kind == "upsamplers":
        ok = j == 0 and rest == UPSAMPLER_LAYER[0]
        block = level * _PER_LEVEL + LAYERS_PER_BLOCK
        return f"output_blocks.{block}.{_upsampler_slot(level)}.{UPSAMPLER_LAYER[1]}" if ok else None
    inner = _inner_to_sgm(kind, rest)
    return f"output_blocks.{level * _PER_LEVEL + j}.{inner[0]}.{inner[1]}" if inner else None


def _sgm_inner(block: str, pos: int, slot: str, rest: str) -> str | None:
    """diffusers path of slot ``.0`` (resnet) or ``.1`` (attention) of an SGM block, ``block`` its diffusers parent."""
    if slot == "0":
        return f"{block}.resnets.{pos}.{_RESNET_LAYERS_SGM[rest]}" if rest in _RESNET_LAYERS_SGM else None
    if slot == "1":
        return f"{block}.attentions.{pos}.{rest}"
    return None


def _sgm_to_diffusers(path: str) -> str | None:
    if path in _TOP_LEVEL_SGM:
        return _TOP_LEVEL_SGM[path]
    parts = path.split(".")
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    block, rest = int(parts[1]), ".".join(parts[3:]) if len(parts) > 3 else ""
    if parts[0] == "middle_block":
        if block in (0, 2):
            layer = _RESNET_LAYERS_SGM.get(".".join(parts[2:]))
            return f"mid_block.resnets.{block // 2}.{layer}" if layer else None
        return f"mid_block.attentions.0.{'.'.join(parts[2:])}" if block == 1 else None
    slot = parts[2]
    if parts[0] == "input_blocks" and block >= 1:
        level, pos = divmod(block - 1, _PER_LEVEL)
        if pos == LAYERS_PER_BLOCK:
            ok = slot == "0" and rest == DOWNSAMPLER_LAYER[1]
            return f"down_blocks.{level}.downsamplers.0.{DOWNSAMPLER_LAYER[0]}" if ok else None
        return _sgm_inner(f"down_blocks.{level}", pos, slot, rest)
    if parts[0] == "output_blocks":
        level, pos = divmod(block, _PER_LEVEL)
        if level >= len(UP_HAS_ATTENTION):
            return None
        if pos == LAYERS_PER_BLOCK and slot == str(_upsampler_slot(level)) and rest == UPSAMPLER_LAYER[1]:
            return f"up_blocks.{level}.upsamplers.0.{UPSAMPLER_LAYER[0]}"
        return _sgm_inner(f"up_blocks.{level}", pos, slot, rest)
    return None


def diffusers_to_sgm(path: str) -> str | None:
    """The SGM path of a diffusers UNet module path, or None if it names no SDXL-base module.

    Example:
        >>> diffusers_to_sgm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        'input_blocks.4.1.transformer_blocks.0.attn1.to_q'
        >>> diffusers_to_sgm("up_blocks.0.upsamplers.0.conv")
        'output_blocks.2.2.conv'
    """
    if path not in sdxl_modules("unet"):
        return None
    return _diffusers_to_sgm(path)


def sgm_to_diffusers(path: str) -> str | None:
    """The diffusers path of an SGM UNet module path, or None if it names no SDXL-base module.

    Example:
        >>> sgm_to_diffusers("output_blocks.3.0.skip_connection")
        'up_blocks.1.resnets.0.conv_shortcut'
        >>> sgm_to_diffusers("input_blocks.1.1.proj_in") is None  # the first level has no attention
        True
    """
    result = _sgm_to_diffusers(path)
    return result if result in sdxl_modules("unet") else None
