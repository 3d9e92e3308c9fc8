"""SGM (MindONE, kohya) <-> diffusers UNet module paths: the block arithmetic, checked on the whole tree."""

from __future__ import annotations

import pytest

from lorabridge.architectures.sdxl import SDXL
from lorabridge.architectures.sdxl import diffusers_to_sgm, sgm_to_diffusers

sdxl_module_types, sdxl_modules = SDXL.module_types, SDXL.modules

# FORMATS.md section 3, one row per rule: SGM path -> diffusers path.
KNOWN_PAIRS = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "input_blocks.1.0.in_layers.0": "down_blocks.0.resnets.0.norm1",
    "input_blocks.2.0.in_layers.2": "down_blocks.0.resnets.1.conv1",
    "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks.5.1.proj_in": "down_blocks.1.attentions.1.proj_in",
    "input_blocks.6.0.op": "down_blocks.1.downsamplers.0.conv",
    "input_blocks.8.1.transformer_blocks.9.ff.net.2": "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
    "input_blocks.8.0.emb_layers.1": "down_blocks.2.resnets.1.time_emb_proj",
    "middle_block.0.out_layers.3": "mid_block.resnets.0.conv2",
    "middle_block.1.transformer_blocks.9.attn2.to_out.0": "mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0",
    "middle_block.2.out_layers.0": "mid_block.resnets.1.norm2",
    "output_blocks.0.0.skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
    "output_blocks.2.1.proj_out": "up_blocks.0.attentions.2.proj_out",
    "output_blocks.2.2.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.3.1.transformer_blocks.1.norm3": "up_blocks.1.attentions.0.transformer_blocks.1.norm3",
    "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks.8.0.out_layers.3": "up_blocks.2.resnets.2.conv2",
}

# The attention-only LoRA MindONE trains by default: where the 70 SDXL transformer blocks live (FORMATS.md s.1),
# as SGM block -> (transformer depth, channels).
SDXL_SPATIAL_TRANSFORMERS = {
    "input_blocks.4.1": (2, 640), "input_blocks.5.1": (2, 640),
    "input_blocks.7.1": (10, 1280), "input_blocks.8.1": (10, 1280),
    "middle_block.1": (10, 1280),
    "output_blocks.0.1": (10, 1280), "output_blocks.1.1": (10, 1280), "output_blocks.2.1": (10, 1280),
    "output_blocks.3.1": (2, 640), "output_blocks.4.1": (2, 640), "output_blocks.5.1": (2, 640),
}
ATTENTION_TARGETS = [f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")]


@pytest.mark.parametrize(("sgm", "diffusers"), KNOWN_PAIRS.items())
def test_known_pairs_map_both_ways(sgm, diffusers):
    assert sgm_to_diffusers(sgm) == diffusers
    assert diffusers_to_sgm(diffusers) == sgm


def test_every_unet_module_round_trips_and_no_two_share_an_sgm_name():
    modules = sdxl_modules("unet")
    sgm_names = {}
    for path in modules:
        sgm = diffusers_to_sgm(path)
        assert sgm is not None, path
        assert sgm_to_diffusers(sgm) == path
        assert sgm_names.setdefault(sgm, path) == path, f"{path} and {sgm_names[sgm]} both map to {sgm}"
    assert len(sgm_names) == len(modules) == 1050


def test_every_lora_target_type_is_covered():
    types = sdxl_module_types("unet")
    kinds = {types[p] for p in sdxl_modules("unet") if diffusers_to_sgm(p) is not None}
    assert kinds == {"Linear", "Conv2d", "GroupNorm", "LayerNorm"}


def test_default_mindone_attention_lora_maps_to_1120_tensors_with_sdxl_shapes():
    keys = {}
    for block, (depth, channels) in SDXL_SPATIAL_TRANSFORMERS.items():
        for d in range(depth):
            for target in ATTENTION_TARGETS:
                cross = target in ("attn2.to_k", "attn2.to_v")
                for ab in "AB":
                    keys[f"model.diffusion_model.{block}.transformer_blocks.{d}.{target}.lora_{ab}.weight"] = (
                        channels, 2048 if cross else channels)
    assert len(keys) == 1120
    diffusers_names = set()
    for key, shape in keys.items():
        sgm = key.removeprefix("model.diffusion_model.").rsplit(".lora_", 1)[0]
        path = sgm_to_diffusers(sgm)
        assert path is not None, key
        assert sdxl_modules("unet")[path] == shape, key
        diffusers_names.add(path)
    assert len(diffusers_names) == 560


@pytest.mark.parametrize("path", [
    "input_blocks.1.1.proj_in",  # level 0 has resnets only
    "input_blocks.9.0.in_layers.2",  # there are 9 input blocks (0..8)
    "input_blocks.9.0.op",  # the last level has no downsampler
    "input_blocks.3.0.in_layers.2",  # block 3 is the downsampler
    "input_blocks.4.1.transformer_blocks.2.attn1.to_q",  # level 1 is 2 blocks deep
    "output_blocks.8.1.conv",  # the last level has no upsampler
    "output_blocks.2.1.conv",  # the upsampler sits after the attention
    "output_blocks.9.0.in_layers.2",
    "middle_block.3.in_layers.2",
    "middle_block.0.skip_connection",  # the mid resnets keep their width
    "input_blocks.4.0.in_layers.1",  # the SiLU between norm and conv holds no weight
    "input_blocks.4.1.transformer_blocks.0.attn1.to_out",
    "model.diffusion_model.input_blocks.4.1.proj_in",  # paths carry no prefix
    "input_blocks.x.1.proj_in",
    "",
])
def test_sgm_paths_of_no_sdxl_module_map_to_none(path):
    assert sgm_to_diffusers(path) is None


@pytest.mark.parametrize("path", [
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.2.downsamplers.0.conv",
    "up_blocks.2.upsamplers.0.conv",
    "up_blocks.0.resnets.3.conv1",
    "mid_block.attentions.1.proj_in",
    "unet.conv_in",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1",  # a container, not a weight-bearing layer
    "conv_in.weight",
])
def test_diffusers_paths_of_no_sdxl_module_map_to_none(path):
    assert diffusers_to_sgm(path) is None
