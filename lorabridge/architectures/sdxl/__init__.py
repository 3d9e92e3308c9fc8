"""Stable Diffusion XL 1.0 (base): the first registered architecture.

Data only: the module tree (``modules.json``), SGM spelling of the UNet (``sgm.py``, the spelling
kohya sd-scripts and A1111 use), the MindONE/SGM text-encoder names (``text_encoders.py``), bigG's
fused ``attn.in_proj`` and the tiny pipeline (``tiny.py``).
"""

from __future__ import annotations

from ..architecture import Architecture, Inference
from ..fused import FusedLayer
from .sgm import unet_path_to_sgm
from .text_encoders import DIFFUSERS_LAYERS, OPENCLIP_LAYERS
from .tree import TREE

SDXL = Architecture(
    name="stable-diffusion-xl-v1-base",
    label="SDXL",
    tree=TREE,
    reference="SDXL-base",
    article="an",
    original_paths={"unet": unet_path_to_sgm},
    # OpenCLIP bigG computes q, k and v with one in_proj (rows q, k, v); diffusers has three Linear layers.
    # The name is the path inside the OpenCLIP model (SGM puts it under OPENCLIP_PREFIX).
    fused=(FusedLayer("text_encoder_2", f"{OPENCLIP_LAYERS}{{n}}.attn.in_proj",
                      tuple(f"{DIFFUSERS_LAYERS}{{n}}.self_attn.{p}_proj" for p in "qkv")),),
    short="sdxl",
    tiny="lorabridge.architectures.sdxl.tiny",
    real="lorabridge.architectures.sdxl.reference",
    inference=Inference(pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
                        denoiser="unet",
                        lora_components=("unet", "text_encoder", "text_encoder_2"), required={"addition_embed_type": "text_time"}, schedulers="diffusion",
                        guidance_scale=5.0),
    pipelines={"torch": "diffusers:StableDiffusionXLPipeline", "mindspore": "mindone.diffusers:StableDiffusionXLPipeline"},
    modelspec={"modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
               "modelspec.implementation": "https://github.com/Stability-AI/generative-models"},
    # kohya sd-scripts networks/lora.py (LORA_PREFIX_UNET, LORA_PREFIX_TEXT_ENCODER1/2); ComfyUI's generic
    # names (comfy/lora.py model_lora_keys_unet/_clip; comfy_extras/nodes_lora_extract.py).
    kohya_prefixes={"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    comfyui_prefixes={"unet": "diffusion_model", "text_encoder": "text_encoders.clip_l.transformer",
                      "text_encoder_2": "text_encoders.clip_g.transformer"},
)


def diffusers_to_sgm(path: str) -> str | None:
    """The SGM path of a diffusers UNet module path, or None if it names no SDXL-base module.

    Example:
        >>> diffusers_to_sgm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        'input_blocks.4.1.transformer_blocks.0.attn1.to_q'
    """
    return SDXL.original_path("unet", path)


def sgm_to_diffusers(path: str) -> str | None:
    """The diffusers path of an SGM UNet module path, or None if it names no SDXL-base module.

    Example:
        >>> sgm_to_diffusers("output_blocks.3.0.skip_connection")
        'up_blocks.1.resnets.0.conv_shortcut'
        >>> sgm_to_diffusers("input_blocks.1.1.proj_in") is None  # the first level has no attention
        True
    """
    return SDXL.from_original("unet", path)
