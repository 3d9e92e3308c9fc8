"""The CLIP ViT-L/14 text tower's config (openai/clip-vit-large-patch14, text_encoder/config.json): the
``text_encoder`` of SD 1.x, SDXL and Flux.1, written out once for the records' ``reference.py``."""

from __future__ import annotations

CLIP_L_TEXT_CONFIG = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
