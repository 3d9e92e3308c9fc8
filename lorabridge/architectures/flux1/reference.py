"""Flux.1-dev's real component configs, for generating ``modules.json`` (``tools/gen_module_tree.py flux1``)
and a real-size random base (``make-base --arch flux``).

The configs are written out (black-forest-labs/FLUX.1-dev, the fields that shape the module tree)
because nothing can be downloaded; :func:`build_models` builds the components with
diffusers/transformers on torch's ``meta`` device (no weights; T5-XXL's 4.7 G parameters take no memory
there).
"""

from __future__ import annotations

from ..clip import CLIP_L_TEXT_CONFIG  # text_encoder, as in BFL's load_clip (src/flux/util.py)

# black-forest-labs/FLUX.1-dev, transformer/config.json. The same numbers are BFL's own
# ``configs["flux-dev"]`` in black-forest-labs/flux, src/flux/util.py (depth 19, depth_single_blocks 38,
# hidden_size 3072 = 24 heads x 128, in_channels 64, context_in_dim 4096, vec_in_dim 768,
# axes_dim [16, 56, 56], guidance_embed True); the diffusers names are FluxTransformer2DModel's arguments
# (diffusers/models/transformers/transformer_flux.py, whose defaults are these apart from guidance_embeds).
TRANSFORMER_CONFIG = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}


# text_encoder_2/config.json: T5 v1.1 XXL's encoder (google/t5-v1_1-xxl, BFL's ``load_t5`` in
# src/flux/util.py; transformers' T5EncoderModel): gated-GELU feed-forward, untied embeddings.
TEXT_ENCODER_2_CONFIG = {
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": True,
    "layer_norm_epsilon": 1e-06,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}


# vae/config.json: 16 latent channels, no quant convs, FLUX.1-dev's scaling and shift.
VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}


def build_models() -> dict:
    """The three Flux.1-dev components, built by diffusers/transformers on the meta device (no weights)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        return {
            "transformer": FluxTransformer2DModel(**TRANSFORMER_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG)),
            "text_encoder_2": T5EncoderModel(T5Config(**TEXT_ENCODER_2_CONFIG)),
        }


def base_parts() -> dict:
    """Every component of a Flux.1-dev pipeline: the weight-bearing ones on the meta device (:func:`build_models`
    plus the VAE), the scheduler with FLUX.1-dev's config and the tiny tokenizers (real ones cannot be
    downloaded; their ids fit the real embeddings)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from ..tiny_parts import clip_tokenizer, t5_tokenizer
    from .tiny import SCHEDULER_CONFIG

    with torch.device("meta"):
        vae = AutoencoderKL(**VAE_CONFIG)
    return {**build_models(), "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
            "tokenizer": clip_tokenizer(), "tokenizer_2": t5_tokenizer()}
