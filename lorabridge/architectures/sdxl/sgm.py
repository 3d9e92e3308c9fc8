"""SGM (original SDXL, MindONE, kohya) <-> diffusers UNet module paths, as tables plus block arithmetic.

SGM numbers the UNet as flat ``input_blocks.i`` / ``output_blocks.i`` lists
whose entries hold a resnet (``.0``), an attention (``.1``) and maybe a resampler;
diffusers nests them as ``down_blocks[level].resnets[j]`` / ``.attentions[j]``.
The index arithmetic below follows the SDXL-base layout (three entries per level:
``input_blocks.i`` (i >= 1) -> ``down_blocks[(i-1)//3]``, ``output_blocks.i`` -> ``up_blocks[i//3]``),
and the architecture record checks every answer against the real module tree, so a path that
names no SDXL-base module maps to None instead of to a plausible-looking guess. The reverse
direction is this table inverted (:meth:`Architecture.from_original`), never separate arithmetic.
Paths have no ``model.diffusion_model.`` / ``unet.`` prefix.
"""

from __future__ import annotations

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


def unet_path_to_sgm(path: str) -> str | None:
    """The SGM path of a diffusers UNet path by SDXL-base's block layout (not checked against the tree).

    Example:
        >>> unet_path_to_sgm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        'input_blocks.4.1.transformer_blocks.0.attn1.to_q'
        >>> unet_path_to_sgm("up_blocks.0.upsamplers.0.conv")
        'output_blocks.2.2.conv'
    """
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
