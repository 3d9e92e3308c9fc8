"""XLabs' (x-flux) Flux.1 LoRA key grammar, as data: attention-processor LoRAs on BFL blocks.

x-flux (``XLabs-AI/x-flux@47495425``) trains ``DoubleStreamBlockLoraProcessor`` and
``SingleStreamBlockLoraProcessor`` (``src/flux/modules/layers.py``) and saves every state-dict key holding
``_lora`` (``train_flux_lora_deepspeed.py``), so a key is
``[diffusion_model.]<double_blocks|single_blocks>.N.processor.<layer>.<down|up>.weight``: ``down`` is
``nn.Linear(in, rank)`` (lora_A), ``up`` ``nn.Linear(rank, out)`` (lora_B). Each processor layer adds to
the output of BFL layers that diffusers keeps apart: ``qkv_lora1`` to the image stream's fused ``qkv``
(diffusers' to_q, to_k, to_v), a single block's ``qkv_lora`` to the q, k, v rows of ``linear1`` only
(not its MLP rows). :data:`TARGETS` lists, per layer, the diffusers layers it adds to, in row order; the
reader splits a LoRA on several exactly (shared A, B's row blocks). The ``diffusion_model.`` prefix is
what ``xflux_pipeline.update_model_with_lora`` tolerates (it matches keys by substring) and diffusers'
``_convert_xlabs_flux_lora_to_diffusers`` strips.
"""

from __future__ import annotations

import re
from typing import NamedTuple

COMPONENT = "transformer"
PREFIX = "diffusion_model."
SUFFIXES = {"down.weight": "lora_A.weight", "up.weight": "lora_B.weight"}
# x-flux processor layer -> the diffusers layers (under the block) whose output it adds to, in row order.
DOUBLE_BLOCK = {
    "qkv_lora1": ("attn.to_q", "attn.to_k", "attn.to_v"),  # img_attn.qkv(x) + qkv_lora1(x)
    "qkv_lora2": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),  # txt_attn.qkv
    "proj_lora1": ("attn.to_out.0",),  # img_attn.proj
    "proj_lora2": ("attn.to_add_out",),  # txt_attn.proj
}
SINGLE_BLOCK = {
    "qkv_lora": ("attn.to_q", "attn.to_k", "attn.to_v"),  # the 3 * hidden q, k, v rows of linear1
    "proj_lora": ("proj_out",),  # linear2 (15360 -> 3072)
}
# BFL block list -> (diffusers block list, processor layers).
BLOCKS = {"double_blocks": ("transformer_blocks", DOUBLE_BLOCK), "single_blocks": ("single_transformer_blocks", SINGLE_BLOCK)}
_KEY = re.compile(r"^(?:diffusion_model\.)?(?P<blocks>double_blocks|single_blocks)\.(?P<n>\d+)\.processor\."
                  r"(?P<layer>[a-z0-9_]+)\.(?P<suffix>down\.weight|up\.weight)$")


class XLabsKey(NamedTuple):
    """One x-flux key: the processor LoRA it belongs to (``double_blocks.0.processor.qkv_lora1``), the neutral
    role of its tensor and the canonical names of the diffusers layers it adds to."""

    stem: str
    role: str
    targets: tuple[str, ...]


def parse(key: str) -> XLabsKey | None:
    """The parts of an x-flux LoRA key, or None when it is none (or names no x-flux processor layer).

    Example:
        >>> parse("double_blocks.3.processor.qkv_lora2.up.weight")
        XLabsKey(stem='double_blocks.3.processor.qkv_lora2', role='lora_B.weight', targets=('transformer.transformer_blocks.3.attn.add_q_proj', 'transformer.transformer_blocks.3.attn.add_k_proj', 'transformer.transformer_blocks.3.attn.add_v_proj'))
        >>> parse("diffusion_model.single_blocks.0.processor.proj_lora.down.weight").targets
        ('transformer.single_transformer_blocks.0.proj_out',)
    """
    match = _KEY.match(key)
    if match is None:
        return None
    blocks, table = BLOCKS[match["blocks"]]
    paths = table.get(match["layer"])
    if paths is None:
        return None
    stem = f"{match['blocks']}.{match['n']}.processor.{match['layer']}"
    return XLabsKey(stem, SUFFIXES[match["suffix"]], tuple(f"{COMPONENT}.{blocks}.{match['n']}.{p}" for p in paths))
