"""A tiny random-weight SDXL pipeline, built offline, for tests, demos and benchmarks.

Real SDXL weights are 7 GB and cannot be downloaded here, yet LoRA loading must be
checked against real diffusers and mindone.diffusers pipelines. This builder keeps
everything a LoRA touches the same as SDXL-base (block types and names, transformer
depths 1/2/10 with a 10-deep mid block, two CLIP text encoders, ``text_time``
conditioning) and shrinks only the widths, so every SDXL LoRA module name exists here
(560 UNet attention modules, as in the real model) and a 64x64 image takes seconds on CPU.

Example:
    >>> build_tiny("tiny-sdxl")   # doctest: +SKIP
    PosixPath('tiny-sdxl')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ...errors import LoraBridgeError
from ..tiny_parts import clip_text_config, clip_tokenizer, random_lora, save_pipeline, weight_shapes

# SDXL-base's UNet layout at small widths (320/640/1280 -> 32/64/64), 32-dim attention heads.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [1, 2, 2],  # diffusers' name for the head count (SDXL-base: 5/10/20)
    "cross_attention_dim": 80,  # text_encoder hidden + text_encoder_2 hidden (32 + 48), as 768 + 1280 = 2048
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 48,  # 6 time ids * embed dim + pooled text_encoder_2
    "norm_num_groups": 32,
}

# CLIP ViT-L (text_encoder) and OpenCLIP bigG (text_encoder_2) shrunk to 2 layers of widths 32 and 48.
# Different widths, as in SDXL (768 / 1280): a LoRA for one encoder cannot silently fit the other, and
# single-file loaders tell the two apart by width.
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32,
}
TEXT_ENCODER_2_CONFIG: dict[str, Any] = {**TEXT_ENCODER_CONFIG, "hidden_size": 48, "intermediate_size": 96,
                                         "projection_dim": 48, "hidden_act": "gelu"}

# SDXL's VAE: four levels (so the latent is 1/8 of the image, as in SDXL), 4 latent channels.
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 64,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8,
    "scaling_factor": 0.13025, "force_upcast": False,
}

# SDXL-base's scheduler configuration (scheduler/scheduler_config.json).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
    "interpolation_type": "linear", "use_karras_sigmas": False, "sample_max_value": 1.0,
    "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
}

def _components(seed: int, configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The seeded torch modules and tokenizers of the pipeline (random init); ``configs`` override the tiny sizes."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sizes = {name: {**default, **configs.get(name, {})} for name, default in (
        ("unet", UNET_CONFIG), ("vae", VAE_CONFIG), ("text_encoder", TEXT_ENCODER_CONFIG), ("text_encoder_2", TEXT_ENCODER_2_CONFIG))}
    torch.manual_seed(seed)
    parts: dict[str, Any] = {
        "unet": UNet2DConditionModel(**sizes["unet"]),
        "vae": AutoencoderKL(**sizes["vae"]),
        "text_encoder": CLIPTextModel(clip_text_config(sizes["text_encoder"])),
        "text_encoder_2": CLIPTextModelWithProjection(clip_text_config(sizes["text_encoder_2"])),
        "scheduler": EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
    }
    tokenizer = clip_tokenizer()
    parts["tokenizer"] = tokenizer
    parts["tokenizer_2"] = tokenizer
    return parts


def build_tiny(out: str | os.PathLike, seed: int = 0, force: bool = False,
                    configs: dict[str, dict[str, Any]] | None = None, half: bool = False) -> Path:
    """Write a tiny random SDXL pipeline (diffusers layout, safetensors) to ``out`` and return its path.

    The same ``seed`` gives the same weights bit for bit. The directory is assembled beside
    ``out`` and renamed into place at the end, so a failure leaves nothing behind. ``configs``
    overrides component configs (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``), e.g. with
    SDXL-base's real widths for a benchmark; ``half`` saves fp16 weights.
    """
    from diffusers import StableDiffusionXLPipeline

    return save_pipeline(lambda: StableDiffusionXLPipeline(**_components(seed, configs or {})), out, force, half)


# Layers a LoRA adapts by default, per component: the leaf names PEFT's target_modules match.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "unet": ("to_q", "to_k", "to_v", "to_out.0"),
    "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "text_encoder_2": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
# component -> weights file of a diffusers pipeline directory
WEIGHT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}


def lora_shapes(pipeline_dir: str | os.PathLike, components: tuple[str, ...] = ("unet",),
                targets: dict[str, tuple[str, ...]] = LORA_TARGETS) -> dict[str, tuple[int, ...]]:
    """Canonical module name -> weight shape (out, in[, kh, kw]) of every targeted layer of a pipeline.

    Read from the safetensors headers only, so it needs no framework and works on a real SDXL too.
    """
    return weight_shapes(pipeline_dir, WEIGHT_FILES, targets, components)


def make_tiny_lora(pipeline_dir: str | os.PathLike, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                   components: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2"), strength: float = 0.5):
    """A seeded LoRA (:class:`LoraModel`) for every attention projection of ``pipeline_dir``, with non-zero A and B
    (see :func:`~..tiny_parts.random_lora`).

    Example:
        >>> model = make_tiny_lora("tiny-sdxl")   # doctest: +SKIP
        >>> len(model.modules)   # doctest: +SKIP
        576
    """
    return random_lora(lora_shapes(pipeline_dir, components), rank, alpha, seed, strength,
                       provenance={"source_format": "lorabridge.tiny_sdxl"},
                       training={"note": f"random LoRA for a tiny SDXL, seed {seed}", "ss_network_dim": str(rank)})


# --make-lora output suffix -> registry format written: a neutral file, or what MindONE's SDXL trainer saves.
LORA_FILE_FORMATS = {".safetensors": "neutral", ".ckpt": "mindone-sgm"}


def write_tiny_lora(pipeline_dir: str | os.PathLike, out: str | os.PathLike, seed: int = 0, force: bool = False) -> Path:
    """Write :func:`make_tiny_lora` for ``pipeline_dir`` at ``out``: ``.safetensors`` as a neutral file,
    ``.ckpt`` as a MindONE SDXL trainer checkpoint (SGM names, alpha folded into lora_B)."""
    import warnings

    from ...converters.registry import get_writer
    from ...errors import LoraBridgeWarning
    from ...io.atomic import check_output_path, replacing

    out = check_output_path(out, force)
    lora = make_tiny_lora(pipeline_dir, seed=seed)
    # The MindONE writer warns that alpha is folded and that a .ckpt keeps no training facts: for this
    # made-up LoRA that is the design (see the docstring), not news to print.
    with replacing(force), warnings.catch_warnings():  # without --force, a racing run gets "output exists"
        warnings.simplefilter("ignore", LoraBridgeWarning)
        get_writer(lora_file_format(out)).write(lora, out)
    return out


def lora_file_format(path: str | os.PathLike) -> str:
    """The format :func:`write_tiny_lora` writes to ``path``, by suffix (checked before any work)."""
    suffix = Path(path).suffix
    if suffix not in LORA_FILE_FORMATS:
        raise LoraBridgeError(f"LoRA file must end in {' or '.join(LORA_FILE_FORMATS)}", path)
    return LORA_FILE_FORMATS[suffix]
