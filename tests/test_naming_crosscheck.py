"""Our name tables against the independent converters of diffusers and LyCORIS, on every SDXL-base module.

diffusers converts original SDXL checkpoints (SGM UNet, OpenCLIP bigG) and
kohya LoRA files with its own code. Single-file checkpoints: each module gets
weights tagged with its position under our SGM name, and diffusers must put
that tag under our diffusers name. kohya: every module's underscored name must
land, after diffusers' loader conversions, on the module we resolve it to.
"""

from __future__ import annotations

import copy
import types

import pytest

from lorabridge.architectures.sdxl import SDXL
from lorabridge.architectures.architecture import underscored
from lorabridge.architectures.sdxl import diffusers_to_sgm
from lorabridge.architectures.sdxl import reference
from lorabridge.architectures.sdxl.sgm import TOP_LEVEL
from lorabridge.architectures.sdxl.text_encoders import OPENCLIP_PREFIX, diffusers_text_to_sgm

torch = pytest.importorskip("torch")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
from diffusers import StableDiffusionXLPipeline  # noqa: E402
from diffusers.utils import (  # noqa: E402
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)

is_lora_target, resolve_underscored, sdxl_module_types, sdxl_modules = SDXL.is_lora_target, SDXL.resolve_underscored, SDXL.module_types, SDXL.modules

pytestmark = pytest.mark.torch


def _tag(i: int, rows: int = 1):
    return torch.full((rows, 1), float(i))


def test_diffusers_single_file_converter_agrees_on_every_unet_module():
    paths = list(sdxl_modules("unet"))
    checkpoint = {}
    for i, path in enumerate(paths):
        for param in ("weight", "bias"):
            checkpoint[f"model.diffusion_model.{diffusers_to_sgm(path)}.{param}"] = _tag(i)
    converted = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, reference.UNET_CONFIG)
    expected = {f"{path}.{param}": i for i, path in enumerate(paths) for param in ("weight", "bias")}
    assert {key: int(value.item()) for key, value in converted.items()} == expected


def test_diffusers_single_file_converter_agrees_on_clip_l():
    paths = list(sdxl_modules("text_encoder"))
    checkpoint = {f"{diffusers_text_to_sgm('text_encoder', p)}.weight": _tag(i) for i, p in enumerate(paths)}
    converted = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)
    assert {key: int(value.item()) for key, value in converted.items()} == {f"{p}.weight": i for i, p in enumerate(paths)}


def test_diffusers_single_file_converter_agrees_on_openclip_bigg_and_the_qkv_row_order():
    width = sdxl_modules("text_encoder_2")["text_projection"][0]
    checkpoint, expected = {}, {}
    for i, path in enumerate(sdxl_modules("text_encoder_2")):
        sgm = diffusers_text_to_sgm("text_encoder_2", path)
        fused = SDXL.fused_name("text_encoder_2", path)
        if sgm is not None:
            checkpoint[f"{sgm}.weight"] = _tag(i)
            expected[f"{path}.weight"] = [i]
        elif fused is not None:
            name, block = fused
            rows = checkpoint.setdefault(f"{OPENCLIP_PREFIX}{name}_weight", torch.zeros((3 * width, 1)))
            rows[block * width:(block + 1) * width] = i
            expected[f"{path}.weight"] = [i] * width
    text_model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=width))
    converted = single_file_utils.convert_open_clip_checkpoint(text_model, checkpoint, prefix=OPENCLIP_PREFIX)
    assert {key: value.flatten().int().tolist() for key, value in converted.items()} == expected


def _kohya_state_dict(names: list[str]) -> dict[str, "torch.Tensor"]:
    sd = {}
    for name in names:
        sd[f"{name}.lora_down.weight"] = torch.zeros(1, 1)
        sd[f"{name}.lora_up.weight"] = torch.zeros(1, 1)
        sd[f"{name}.alpha"] = torch.tensor(1.0)
    return sd


def _peft_modules(state_dict: dict, component: str) -> set[str]:
    """Module paths diffusers ends up with for ``component``, in the PEFT spelling its loader applies."""
    own = {k.removeprefix(component + "."): v for k, v in state_dict.items() if k.startswith(component + ".")}
    peft = convert_unet_state_dict_to_peft(own) if component == "unet" else convert_state_dict_to_peft(convert_state_dict_to_diffusers(own))
    return {k.removesuffix(".lora_A.weight") for k in peft if k.endswith(".lora_A.weight")}


@pytest.mark.parametrize("spelling", ["sgm", "diffusers"])
def test_diffusers_kohya_loader_agrees_on_every_unet_block_layer(spelling):
    """kohya names for every Linear/Conv2d inside the blocks, in both spellings, land where we resolve them.

    diffusers' own kohya conversion cannot place the top-level layers (``time_embed_0`` makes its SGM
    remapper raise; ``conv_in`` comes out as ``conv.in``), so those are left to the tree tests.
    """
    paths = [p for p, t in sdxl_module_types("unet").items() if t in ("Linear", "Conv2d") and p not in TOP_LEVEL]
    names = {"lora_unet_" + underscored(diffusers_to_sgm(p) if spelling == "sgm" else p): p for p in paths}
    assert all(resolve_underscored("unet", n.removeprefix("lora_unet_")) == p for n, p in names.items())
    config = types.SimpleNamespace(**reference.UNET_CONFIG)
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(_kohya_state_dict(list(names)), unet_config=config)
    assert _peft_modules(converted, "unet") == set(paths)
    assert len(paths) == 788


def test_diffusers_kohya_loader_agrees_on_every_text_encoder_linear():
    expected, names = {}, []
    for component, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        expected[component] = {p for p, t in sdxl_module_types(component).items() if t == "Linear"}
        for path in expected[component]:
            assert resolve_underscored(component, underscored(path)) == path
            names.append(prefix + underscored(path))
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(_kohya_state_dict(names))
    for component, paths in expected.items():
        assert _peft_modules(converted, component) == paths


def test_lycoris_diffusers_to_compvis_converter_agrees_on_every_unet_module_it_knows():
    """LyCORIS renames diffusers-spelled kohya keys to SGM spelling with its own regex table."""
    lycoris_utils = pytest.importorskip("lycoris.utils")

    unknown_to_lycoris = []
    for path in sdxl_modules("unet"):
        key = "lora_unet_" + underscored(path)
        converted = lycoris_utils.convert_diffusers_name_to_compvis(key)
        if converted == key:  # LyCORIS passes keys it has no rule for through unchanged
            unknown_to_lycoris.append(path)
        else:
            assert converted == "lora_unet_" + underscored(diffusers_to_sgm(path))
    assert unknown_to_lycoris == ["add_embedding.linear_1", "add_embedding.linear_2", "conv_norm_out"]


@pytest.mark.parametrize("component", ["unet", "text_encoder", "text_encoder_2"])
def test_peft_can_target_every_lora_target_with_the_shapes_the_tree_predicts(component, sdxl_meta_models):
    """PEFT adapts every Linear/Conv2d we list, with lora_A (r, in[, kh, kw]) and lora_B (out, r[, 1, 1])."""
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(sdxl_meta_models[component])
    targets = [p for p in sdxl_modules(component) if is_lora_target(component, p)]
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=targets), model)
    state = peft.get_peft_model_state_dict(model)
    expected = {}
    for path in targets:
        out, inp, *kernel = sdxl_modules(component)[path]
        expected[f"{path}.lora_A.weight"] = (4, inp, *kernel)
        expected[f"{path}.lora_B.weight"] = (out, 4, *([1, 1] if kernel else []))
    assert {key: tuple(value.shape) for key, value in state.items()} == expected
