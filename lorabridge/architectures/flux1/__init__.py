"""Flux.1 (dev): the second registered architecture.

Data only: the module tree (``modules.json``: the transformer, CLIP-L and T5-XXL), BFL's spelling of the
transformer (``bfl.py``, the spelling of BFL checkpoints, ComfyUI and kohya sd-scripts) with its fused
``qkv`` and ``linear1`` layers, and the shapes the variants differ in, how ``infer`` runs it and the tiny pipeline (``tiny.py``).

Variants: FLUX.1-schnell has no guidance embedder (its LoRAs are a subset of dev's modules); FLUX.1-Fill-dev
reads 384 input channels in ``x_embedder`` (BFL ``img_in``), FLUX.1-Depth-dev and FLUX.1-Canny-dev 128
(diffusers' configs of those models: ``in_channels`` 384 and 128, ``out_channels`` 64). Their LoRAs are
recognised as Flux.1 LoRAs (:attr:`Architecture.variants`).
"""

from __future__ import annotations

from ..architecture import Architecture, Inference
from .bfl import COMPONENT, FUSED_LAYERS, transformer_path_to_bfl
from .tree import TREE

HIDDEN = 3072  # Flux.1's transformer width (24 heads x 128)

FLUX1 = Architecture(
    name="flux-1-dev",
    label="Flux.1",
    tree=TREE,
    reference="Flux.1-dev",
    article="a",
    original_paths={COMPONENT: transformer_path_to_bfl},
    fused=FUSED_LAYERS,
    short="flux",
    tiny="lorabridge.architectures.flux1.tiny",
    real="lorabridge.architectures.flux1.reference",
    # FluxPipeline: flow matching, guidance distilled into an embedding (FLUX.1-dev's default 3.5), no negative
    # prompt, 16 latent channels read as 2x2 patches, 1024 px by default (default_sample_size 128 x VAE scale 8).
    inference=Inference(pipeline_classes=("FluxPipeline",), denoiser="transformer",
                        lora_components=("transformer", "text_encoder"), schedulers="flow",
                        guidance_scale=3.5, negative_prompt=False, patch=2, native_size=1024),
    pipelines={"torch": "diffusers:FluxPipeline", "mindspore": "mindone.diffusers:FluxPipeline"},
    modelspec={"modelspec.architecture": "flux-1-dev/lora",
               "modelspec.implementation": "https://github.com/black-forest-labs/flux"},
    variants={COMPONENT: {"x_embedder": ((HIDDEN, 384), (HIDDEN, 128))}},  # Fill; Depth and Canny
    # kohya sd-scripts networks/lora_flux.py (@450630c6): LORA_PREFIX_FLUX, _TEXT_ENCODER_CLIP, _TEXT_ENCODER_T5.
    kohya_prefixes={COMPONENT: "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te3"},
    # ComfyUI's generic names (comfy/lora.py model_lora_keys_unet/_clip; what OneTrainer's COMFY_LORA writes).
    comfyui_prefixes={COMPONENT: "diffusion_model", "text_encoder": "text_encoders.clip_l.transformer",
                      "text_encoder_2": "text_encoders.t5xxl.transformer"},
)


def diffusers_to_bfl(path: str) -> str | None:
    """The BFL path of a diffusers transformer module path, or None if it has none (or names no Flux.1-dev module).

    Example:
        >>> diffusers_to_bfl("transformer_blocks.18.ff_context.net.0.proj")
        'double_blocks.18.txt_mlp.0'
        >>> diffusers_to_bfl("transformer_blocks.19.ff.net.2") is None  # Flux.1-dev has 19 double blocks
        True
    """
    return FLUX1.original_path(COMPONENT, path)


def bfl_to_diffusers(path: str) -> str | None:
    """The diffusers path of a BFL transformer module path, or None if it names no single Flux.1-dev module.

    Example:
        >>> bfl_to_diffusers("single_blocks.37.modulation.lin")
        'single_transformer_blocks.37.norm.linear'
        >>> bfl_to_diffusers("double_blocks.0.img_attn.qkv") is None  # fused: see Architecture.fused_parts
        True
    """
    return FLUX1.from_original(COMPONENT, path)
