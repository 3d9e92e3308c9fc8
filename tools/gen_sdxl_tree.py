"""Regenerate lorabridge/data/sdxl_modules.json: every weight-bearing module of SDXL-base, with its shape.

Converters resolve names against the real module tree (never by regex or list
position), and they must do it without importing torch. So this script builds
the three SDXL-base components with diffusers/transformers on torch's ``meta``
device (no weights, no downloads: the configs are written out below) and
records, per component, ``path -> [layer type, weight shape]`` for every module
that owns a ``weight`` parameter.

Usage:
    .venv/bin/python tools/gen_sdxl_tree.py            # rewrite the JSON
    .venv/bin/python tools/gen_sdxl_tree.py --check    # exit 1 if the JSON is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent.parent / "lorabridge" / "data" / "sdxl_modules.json"

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

# text_encoder/config.json (CLIP ViT-L/14 text tower).
TEXT_ENCODER_CONFIG = {
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


def weight_modules(model) -> dict[str, list]:
    """path -> [type name, weight shape] for every module that directly owns a ``weight`` parameter."""
    out = {}
    for path, module in model.named_modules():
        weight = module._parameters.get("weight")
        if path and weight is not None:
            out[path] = [type(module).__name__, list(weight.shape)]
    return out


def build_models() -> dict:
    """The three SDXL-base components, built by diffusers/transformers on the meta device (no weights)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(**UNET_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2_CONFIG)),
        }


def build_tree(models: dict | None = None) -> dict[str, dict[str, list]]:
    """component -> {path: [type, shape]} of the given (default: freshly built) SDXL-base components."""
    return {component: weight_modules(model) for component, model in (models or build_models()).items()}


def render(tree: dict[str, dict[str, list]]) -> str:
    """One module per line, so diffs of the committed file stay readable."""
    lines = ["{"]
    for ci, (component, modules) in enumerate(tree.items()):
        lines.append(f"  {json.dumps(component)}: {{")
        items = list(modules.items())
        for i, (path, entry) in enumerate(items):
            comma = "," if i < len(items) - 1 else ""
            lines.append(f"    {json.dumps(path)}: {json.dumps(entry)}{comma}")
        lines.append("  }" + ("," if ci < len(tree) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing")
    args = parser.parse_args(argv)
    text = render(build_tree())
    if args.check:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run tools/gen_sdxl_tree.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
