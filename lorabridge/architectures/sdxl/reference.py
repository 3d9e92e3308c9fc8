"""SDXL-base's real component configs, for generating ``modules.json`` (``tools/gen_module_tree.py sdxl``)
and a real-size random base (``make-base --arch sdxl``).

The configs are written out (stabilityai/stable-diffusion-xl-base-1.0, the fields that shape the module
tree) because nothing can be downloaded; :func:`build_models` builds the components with
diffusers/transformers on torch's ``meta`` device (no weights), :func:`base_parts` the whole pipeline's.
"""

from __future__ import annotations

from ..clip import CLIP_L_TEXT_CONFIG  # text_encoder

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (fields that shape the module tree).
UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}


# text_encoder_2/config.json (OpenCLIP ViT-bigG/14 text tower in transformers' spelling).
TEXT_ENCODER_2_CONFIG = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": 49408,
}


# vae/config.json (the fields that shape it, and the ones sampling reads).
VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def build_models() -> dict:
    """The three SDXL-base components, built by diffusers/transformers on the meta device (no weights)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(**UNET_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2_CONFIG)),
        }


def base_parts() -> dict:
    """Every component of an SDXL-base pipeline: the weight-bearing ones on the meta device (:func:`build_models`
    plus the VAE), the scheduler with SDXL-base's config and the tiny CLIP tokenizer (real ones cannot be
    downloaded; its ids fit the real 49408-row embeddings)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler

    from ..tiny_parts import clip_tokenizer
    from .tiny import SCHEDULER_CONFIG

    with torch.device("meta"):
        vae = AutoencoderKL(**VAE_CONFIG)
    tokenizer = clip_tokenizer()
    return {**build_models(), "vae": vae, "scheduler": EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
            "tokenizer": tokenizer, "tokenizer_2": tokenizer}
