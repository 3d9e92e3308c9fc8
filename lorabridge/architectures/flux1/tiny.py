"""A tiny random-weight Flux.1 pipeline, built offline, for tests, demos and benchmarks.

Flux.1-dev's weights are 24 GB and cannot be downloaded here, yet LoRA loading and inference
must be checked against real diffusers and mindone.diffusers ``FluxPipeline``s. This builder keeps
everything a Flux.1-dev LoRA's names depend on: the transformer's 19 double and 38 single blocks (so
every ``transformer.`` module name of a Flux.1-dev LoRA exists here), Flux's 16-channel VAE latents
packed 2x2 into 64 input channels, the guidance embedder, a CLIP-L and a T5 encoder (2 layers each:
text-encoder LoRAs on layers 0-1 fit), ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's config.
Only widths shrink (transformer 2 heads x 16, CLIP 32, T5 48), so a 64x64 image takes a second on CPU.

Example:
    >>> build_tiny("tiny-flux")   # doctest: +SKIP
    PosixPath('tiny-flux')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ...errors import LoraBridgeError
from . import FLUX1
from ..tiny_parts import (T5_VOCAB_SIZE, clip_text_config, clip_tokenizer, random_lora, save_pipeline, t5_tokenizer,
                          weight_shapes)

# Flux.1-dev's transformer (reference.TRANSFORMER_CONFIG) at 2 heads of 16 (rope axes 4 + 6 + 6 = 16), same depths.
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 16, "num_attention_heads": 2, "axes_dims_rope": [4, 6, 6],
    "joint_attention_dim": 48,  # text_encoder_2 (T5) width, as 4096
    "pooled_projection_dim": 32,  # text_encoder (CLIP-L) width, as 768
    "guidance_embeds": True,
}

# CLIP ViT-L shrunk as SDXL's tiny text_encoder is; its pooled output feeds the transformer.
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32,
}

# T5 v1.1's encoder (gated GELU, relative attention, untied) at width 48, 2 layers.
TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "vocab_size": T5_VOCAB_SIZE, "d_model": 48, "d_kv": 12, "d_ff": 96, "num_layers": 2, "num_heads": 4,
    "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "tie_word_embeddings": False, "is_encoder_decoder": False,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "layer_norm_epsilon": 1e-6,
}

# Flux's VAE: four levels (latent 1/8 of the image), 16 latent channels, no quant convs, FLUX.1-dev's scaling.
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "sample_size": 64,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8,
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
    "force_upcast": True,
}

# FLUX.1-dev's scheduler/scheduler_config.json.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096,
}


def _components(seed: int, configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The seeded torch modules and tokenizers of the pipeline (random init); ``configs`` override the tiny sizes."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    sizes = {name: {**default, **configs.get(name, {})} for name, default in (
        ("transformer", TRANSFORMER_CONFIG), ("vae", VAE_CONFIG), ("text_encoder", TEXT_ENCODER_CONFIG),
        ("text_encoder_2", TEXT_ENCODER_2_CONFIG))}
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(**sizes["text_encoder_2"]))
    # transformers saves the encoder's token embedding only as the tied ``shared.weight``; mindone's T5 reads
    # ``encoder.embed_tokens.weight`` and would draw it at random. Real Flux.1 files hold both: so does this one.
    t5.encoder.embed_tokens = torch.nn.Embedding.from_pretrained(t5.shared.weight.detach().clone(), freeze=False)
    return {
        "transformer": FluxTransformer2DModel(**sizes["transformer"]),
        "vae": AutoencoderKL(**sizes["vae"]),
        "text_encoder": CLIPTextModel(clip_text_config(sizes["text_encoder"])),
        "text_encoder_2": t5,
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": t5_tokenizer(),
    }


def build_tiny(out: str | os.PathLike, seed: int = 0, force: bool = False,
               configs: dict[str, dict[str, Any]] | None = None, half: bool = False) -> Path:
    """Write a tiny random Flux.1 pipeline (diffusers layout, safetensors) to ``out`` and return its path.

    The same ``seed`` gives the same weights bit for bit; the directory appears whole or not at all.
    ``configs`` overrides component configs (``transformer``, ``vae``, ``text_encoder``, ``text_encoder_2``);
    ``half`` saves fp16 weights.
    """
    from diffusers import FluxPipeline

    return save_pipeline(lambda: FluxPipeline(**_components(seed, configs or {})), out, force, half)


# Layers a LoRA adapts by default, per component: what diffusers' Flux DreamBooth LoRA script targets in the
# transformer (both block kinds) plus the text encoders' attention.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "transformer": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2", "proj_mlp", "proj_out"),
    "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "text_encoder_2": ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o"),
}
# component -> weights file of a diffusers pipeline directory
WEIGHT_FILES = {
    "transformer": "transformer/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}


def make_tiny_lora(pipeline_dir: str | os.PathLike, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                   components: tuple[str, ...] = ("transformer", "text_encoder"), strength: float = 0.5):
    """A seeded LoRA (:class:`LoraModel`) on the :data:`LORA_TARGETS` of ``pipeline_dir``, with non-zero A and B.

    By default the transformer and CLIP-L: what FluxPipeline.load_lora_weights loads (T5 LoRAs it does not).

    Example:
        >>> len(make_tiny_lora("tiny-flux").modules)   # doctest: +SKIP
        426
    """
    shapes = weight_shapes(pipeline_dir, WEIGHT_FILES, LORA_TARGETS, components)
    shapes = {name: shape for name, shape in shapes.items() if not name.endswith(".proj_out")
              or ".single_transformer_blocks." in name}  # the transformer's own final proj_out stays
    model = random_lora(shapes, rank, alpha, seed, strength, provenance={"source_format": "lorabridge.tiny_flux"},
                        training={"note": f"random LoRA for a tiny Flux.1, seed {seed}", "ss_network_dim": str(rank)})
    model.architecture = FLUX1.name
    return model


def write_tiny_lora(pipeline_dir: str | os.PathLike, out: str | os.PathLike, seed: int = 0, force: bool = False) -> Path:
    """Write :func:`make_tiny_lora` for ``pipeline_dir`` at ``out`` as a neutral file."""
    from ...formats.neutral import write_neutral
    from ...io.atomic import check_output_path, replacing

    out = check_output_path(out, force)
    lora = make_tiny_lora(pipeline_dir, seed=seed)
    with replacing(force):
        write_neutral(lora, out)
    return out


def lora_file_format(path: str | os.PathLike) -> str:
    """The format :func:`write_tiny_lora` writes to ``path``: a neutral ``.safetensors`` file (checked before any work)."""
    if Path(path).suffix != ".safetensors":
        raise LoraBridgeError("LoRA file must end in .safetensors", path)
    return "neutral"
