"""The committed SDXL-base module tree and the underscore resolver that kohya/LyCORIS names need."""

from __future__ import annotations

import doctest
import json
from importlib import resources

import numpy as np
import pytest

from lorabridge import architectures
from lorabridge.architectures import architecture, fused, sdxl, tree
from lorabridge.architectures.architecture import underscored
from lorabridge.architectures.sdxl import SDXL, diffusers_to_sgm, sgm, text_encoders
from tests.fixtures.naming import load_generator

COMPONENTS, sdxl_module_types, sdxl_modules = SDXL.components, SDXL.module_types, SDXL.modules
is_lora_target, resolve_underscored = SDXL.is_lora_target, SDXL.resolve_underscored


@pytest.mark.torch
def test_committed_tree_is_what_diffusers_and_transformers_build_today(built_sdxl_tree):
    text = resources.files("lorabridge.architectures.sdxl").joinpath("modules.json").read_text()
    assert json.loads(text) == built_sdxl_tree
    assert text == load_generator().render(built_sdxl_tree)  # byte for byte: regenerating changes nothing


@pytest.mark.parametrize("module", [architectures, architecture, fused, tree, sdxl, sgm, text_encoders], ids=lambda m: m.__name__)
def test_docstring_examples_hold(module):
    result = doctest.testmod(module, extraglobs={"np": np})  # examples use np as numpy's own do
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.torch
def test_every_built_linear_and_conv_is_listed_with_its_shape(built_sdxl_tree):
    for component, modules in built_sdxl_tree.items():
        for path, (kind, shape) in modules.items():
            assert sdxl_modules(component)[path] == tuple(shape)
            assert sdxl_module_types(component)[path] == kind


def test_tree_sizes_match_sdxl_base():
    types = {c: sorted(set(sdxl_module_types(c).values())) for c in COMPONENTS}
    assert types["unet"] == ["Conv2d", "GroupNorm", "LayerNorm", "Linear"]
    linears = {c: sum(t == "Linear" for t in sdxl_module_types(c).values()) for c in COMPONENTS}
    # UNet: 70 transformer blocks x 10 linears, 11 proj_in/out pairs, 17 time_emb_proj, 4 embedding linears.
    assert linears["unet"] == 70 * 10 + 11 * 2 + 17 + 4
    # CLIP-L: 12 layers x 6; bigG: 32 layers x 6 plus text_projection.
    assert linears == {"unet": 743, "text_encoder": 12 * 6, "text_encoder_2": 32 * 6 + 1}


@pytest.mark.parametrize(("component", "path", "shape"), [
    ("unet", "conv_in", (320, 4, 3, 3)),
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (640, 640)),
    ("unet", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k", (1280, 2048)),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", (10240, 1280)),
    ("unet", "up_blocks.0.resnets.0.conv_shortcut", (1280, 2560, 1, 1)),
    ("unet", "add_embedding.linear_1", (1280, 2816)),
    ("text_encoder", "text_model.encoder.layers.11.mlp.fc1", (3072, 768)),
    ("text_encoder_2", "text_model.encoder.layers.31.self_attn.q_proj", (1280, 1280)),
    ("text_encoder_2", "text_projection", (1280, 1280)),
])
def test_shapes_are_pytorch_weight_shapes(component, path, shape):
    assert sdxl_modules(component)[path] == shape


def test_unknown_component_is_refused():
    with pytest.raises(ValueError, match="unknown component .vae."):
        sdxl_modules("vae")


def test_tree_is_read_only():
    with pytest.raises(TypeError):
        sdxl_modules("unet")["conv_in"] = (1,)


@pytest.mark.parametrize(("component", "name", "path"), [
    ("unet", "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("unet", "mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0",
     "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    ("unet", "up_blocks_0_attentions_2_transformer_blocks_9_ff_net_0_proj",
     "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.0.proj"),
    ("unet", "down_blocks_1_attentions_1_proj_in", "down_blocks.1.attentions.1.proj_in"),
    ("unet", "up_blocks_1_resnets_2_time_emb_proj", "up_blocks.1.resnets.2.time_emb_proj"),
    ("unet", "up_blocks_2_resnets_0_conv_shortcut", "up_blocks.2.resnets.0.conv_shortcut"),
    ("unet", "time_embedding_linear_1", "time_embedding.linear_1"),
    # SGM spelling (kohya sd-scripts, A1111) resolves to the same diffusers paths.
    ("unet", "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("unet", "output_blocks_2_1_transformer_blocks_9_attn2_to_out_0",
     "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_out.0"),
    ("unet", "input_blocks_7_0_skip_connection", "down_blocks.2.resnets.0.conv_shortcut"),
    ("unet", "output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv"),
    ("unet", "input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
    ("unet", "label_emb_0_2", "add_embedding.linear_2"),
    ("unet", "middle_block_2_emb_layers_1", "mid_block.resnets.1.time_emb_proj"),
    ("text_encoder", "text_model_encoder_layers_0_self_attn_q_proj", "text_model.encoder.layers.0.self_attn.q_proj"),
    ("text_encoder", "text_model_encoder_layers_0_mlp_fc1", "text_model.encoder.layers.0.mlp.fc1"),
    ("text_encoder_2", "text_model_encoder_layers_31_self_attn_out_proj",
     "text_model.encoder.layers.31.self_attn.out_proj"),
    ("text_encoder_2", "text_projection", "text_projection"),
])
def test_underscored_names_resolve_to_real_paths(component, name, path):
    assert resolve_underscored(component, name) == path


@pytest.mark.parametrize(("component", "name"), [
    ("unet", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),  # level 0 has no attention
    ("unet", "down_blocks_1_attentions_0_transformer_blocks_2_attn1_to_q"),  # level 1 has depth 2
    ("unet", "input_blocks_1_1_proj_in"),
    ("unet", "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out"),  # the Dropout's container
    ("text_encoder", "text_model_encoder_layers_12_mlp_fc1"),  # CLIP-L has 12 layers
    ("text_encoder_2", "text_model_encoder_layers_0_self_attn_in_proj"),
    ("text_encoder", "down_blocks_1_attentions_0_proj_in"),
])
def test_underscored_names_of_no_module_resolve_to_none(component, name):
    assert resolve_underscored(component, name) is None


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_module_resolves_from_its_underscored_diffusers_name(component):
    for path in sdxl_modules(component):
        assert resolve_underscored(component, underscored(path)) == path


def test_every_unet_module_resolves_from_its_underscored_sgm_name():
    for path in sdxl_modules("unet"):
        assert resolve_underscored("unet", underscored(diffusers_to_sgm(path))) == path


@pytest.mark.parametrize("component", COMPONENTS)
def test_underscored_spellings_are_unambiguous(component):
    spellings = [underscored(p) for p in sdxl_modules(component)]
    if component == "unet":
        spellings += [underscored(diffusers_to_sgm(p)) for p in sdxl_modules(component)]
    assert len(spellings) == len(set(spellings))


def test_lora_targets_are_the_linear_and_conv_layers():
    assert is_lora_target("unet", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2")
    assert is_lora_target("unet", "up_blocks.0.upsamplers.0.conv")
    assert not is_lora_target("unet", "down_blocks.1.attentions.0.norm")
    assert not is_lora_target("text_encoder", "text_model.embeddings.token_embedding")
    assert not is_lora_target("unet", "down_blocks.1.attentions.0")
    counts = {c: sum(is_lora_target(c, p) for p in sdxl_modules(c)) for c in COMPONENTS}
    assert counts == {"unet": 743 + 51, "text_encoder": 72, "text_encoder_2": 193}


@pytest.mark.torch
def test_tiny_test_pipeline_modules_are_all_in_the_tree():
    """The tiny SDXL used in tests shrinks widths and text encoder depth only, so every name resolves."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lorabridge.architectures.sdxl import tiny as tiny_sdxl

    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(**tiny_sdxl.UNET_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**tiny_sdxl.TEXT_ENCODER_CONFIG)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**tiny_sdxl.TEXT_ENCODER_2_CONFIG)),
        }
    for component, model in models.items():
        tiny = load_generator().weight_modules(model)
        assert {p: t for p, (t, _) in tiny.items()} == {p: sdxl_module_types(component)[p] for p in tiny}
        for path in tiny:
            assert resolve_underscored(component, underscored(path)) == path
    assert len([p for p in load_generator().weight_modules(models["unet"]) if p.endswith("attn1.to_q")]) == 70
