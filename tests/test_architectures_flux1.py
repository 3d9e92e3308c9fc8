"""Flux.1 as the second registered architecture: its tree, BFL naming, fused layers, detection and refusals.

The BFL table is checked against diffusers' own single-file converter
(``convert_flux_transformer_checkpoint_to_diffusers``, diffusers/loaders/single_file_utils.py) on a
checkpoint built from it; a random LoRA at real Flux.1-dev shapes converts neutral <-> diffusers <-> PEFT
bit for bit with ``architecture == "flux-1-dev"``; a LoRA made by PEFT on a tiny real
``FluxTransformer2DModel`` goes through lorabridge and loads back into it with diffusers' Flux loader.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lorabridge.adapters.infer import infer
from lorabridge.adapters.options import InferOptions
from lorabridge.architectures import ARCHITECTURES, get_architecture
from lorabridge.architectures.flux1 import FLUX1, bfl_to_diffusers, diffusers_to_bfl
from lorabridge.architectures.fused import split_fused
from lorabridge.architectures.sdxl import SDXL
from lorabridge.converters import convert
from lorabridge.errors import LoraBridgeError
from lorabridge.formats.neutral import read_neutral
from lorabridge.io.safetensors_file import SafetensorsFile, write_safetensors
from lorabridge.model import LoraModule
from lorabridge.neutral_rules import loaders
from lorabridge.tensor import Tensor
from tests.fixtures.flux import TINY_FLUX

ROOT = Path(__file__).resolve().parent.parent
T = "transformer"
DOUBLE, SINGLE = 19, 38  # Flux.1-dev's double and single blocks


# ---- the record ---------------------------------------------------------------------------------


def test_flux1_is_registered_after_sdxl_with_its_pipelines_and_modelspec():
    assert list(ARCHITECTURES.values())[:2] == [SDXL, FLUX1] and get_architecture("flux-1-dev") is FLUX1
    assert FLUX1.components == ("transformer", "text_encoder", "text_encoder_2")
    assert FLUX1.a_label == "a Flux.1" and FLUX1.reference == "Flux.1-dev"
    assert FLUX1.pipelines == {"torch": "diffusers:FluxPipeline", "mindspore": "mindone.diffusers:FluxPipeline"}
    assert FLUX1.modelspec["modelspec.architecture"] == "flux-1-dev/lora"


def test_the_tree_has_flux1_dev_shapes():
    t = FLUX1.modules(T)
    assert sum(p.startswith("transformer_blocks.") and p.endswith(".attn.to_q") for p in t) == DOUBLE
    assert sum(p.startswith("single_transformer_blocks.") and p.endswith(".proj_mlp") for p in t) == SINGLE
    assert t["x_embedder"] == (3072, 64) and t["context_embedder"] == (3072, 4096)
    assert t["time_text_embed.text_embedder.linear_1"] == (3072, 768) and "time_text_embed.guidance_embedder.linear_1" in t
    assert t["single_transformer_blocks.0.proj_out"] == (3072, 15360) and t["norm_out.linear"] == (6144, 3072)
    assert FLUX1.modules("text_encoder") == SDXL.modules("text_encoder")  # CLIP-L, as SDXL's
    t5 = FLUX1.modules("text_encoder_2")
    assert t5["encoder.block.23.layer.1.DenseReluDense.wi_0"] == (10240, 4096) and "encoder.block.24.layer.0.SelfAttention.q" not in t5


@pytest.mark.torch
def test_modules_json_is_what_the_real_classes_build():
    pytest.importorskip("diffusers")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_module_tree.py"), "flux1", "--check"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


# ---- BFL naming and fused layers ----------------------------------------------------------------


@pytest.mark.parametrize(("path", "bfl"), [
    ("transformer_blocks.0.attn.to_out.0", "double_blocks.0.img_attn.proj"),
    ("transformer_blocks.18.attn.to_add_out", "double_blocks.18.txt_attn.proj"),
    ("transformer_blocks.3.ff.net.0.proj", "double_blocks.3.img_mlp.0"),
    ("transformer_blocks.3.ff_context.net.2", "double_blocks.3.txt_mlp.2"),
    ("transformer_blocks.3.norm1.linear", "double_blocks.3.img_mod.lin"),
    ("transformer_blocks.3.norm1_context.linear", "double_blocks.3.txt_mod.lin"),
    ("single_transformer_blocks.37.proj_out", "single_blocks.37.linear2"),
    ("single_transformer_blocks.0.norm.linear", "single_blocks.0.modulation.lin"),
    ("x_embedder", "img_in"), ("context_embedder", "txt_in"), ("proj_out", "final_layer.linear"),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
])
def test_bfl_names_map_both_ways(path, bfl):
    assert diffusers_to_bfl(path) == bfl and bfl_to_diffusers(bfl) == path
    assert FLUX1.resolve_underscored(T, bfl.replace(".", "_")) == path  # kohya spells BFL paths with underscores


def test_every_transformer_module_has_a_bfl_name_or_a_fused_layer_except_the_swapped_norm_out():
    unmapped = [p for p in FLUX1.modules(T) if diffusers_to_bfl(p) is None and FLUX1.fused_name(T, p) is None]
    assert unmapped == ["norm_out.linear"]  # BFL's final_layer.adaLN_modulation.1 has shift and scale swapped
    assert bfl_to_diffusers("final_layer.adaLN_modulation.1") is None
    assert bfl_to_diffusers("double_blocks.19.img_mod.lin") is None  # Flux.1-dev has 19 double blocks


def test_the_fused_layers_name_their_parts_and_sizes_both_ways():
    component, parts = FLUX1.fused_parts("single_blocks.5.linear1")
    assert component == T and parts == tuple(f"single_transformer_blocks.5.{p}"
                                             for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
    assert FLUX1.part_sizes(T, parts) == (3072, 3072, 3072, 12288)
    assert FLUX1.fused_parts("double_blocks.18.img_attn.qkv")[1] == tuple(
        f"transformer_blocks.18.attn.to_{p}" for p in "qkv")
    assert FLUX1.fused_parts("double_blocks.0.txt_attn.qkv")[1] == tuple(
        f"transformer_blocks.0.attn.add_{p}_proj" for p in "qkv")
    assert FLUX1.fused_name(T, "transformer_blocks.7.attn.add_v_proj") == ("double_blocks.7.txt_attn.qkv", 2)
    assert FLUX1.fused_name(T, "transformer_blocks.7.attn.to_k") == ("double_blocks.7.img_attn.qkv", 1)
    assert FLUX1.fused_name(T, "single_transformer_blocks.37.proj_mlp") == ("single_blocks.37.linear1", 3)
    assert FLUX1.fused_parts("double_blocks.19.img_attn.qkv") is None  # no 20th double block
    assert FLUX1.fused_name(T, "transformer_blocks.7.attn.to_out.0") is None


def test_a_lora_on_linear1_splits_into_its_four_unequal_parts_at_real_size():
    rng = np.random.default_rng(5)
    _, parts = FLUX1.fused_parts("single_blocks.0.linear1")
    fused = LoraModule("transformer.single_blocks.0.linear1", "lora",
                       {"lora_A.weight": Tensor.from_numpy(rng.standard_normal((2, 3072)).astype("f4")),
                        "lora_B.weight": Tensor.from_numpy(rng.standard_normal((21504, 2)).astype("f4"))}, 2.0)
    split = split_fused(fused, tuple(f"{T}.{p}" for p in parts), FLUX1.part_sizes(T, parts))
    assert [tuple(m.weight_shape) for m in split] == [FLUX1.modules(T)[p] for p in parts]


@pytest.mark.torch
def test_diffusers_single_file_converter_agrees_on_every_transformer_module():
    """A BFL checkpoint built from our table, each module's weights tagged with its number; diffusers'
    converter must put every tag under our diffusers path, fused row blocks under their parts."""
    torch = pytest.importorskip("torch")
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    types, modules = FLUX1.module_types(T), FLUX1.modules(T)
    checkpoint, expected = {}, {}
    params = lambda path: ("weight", "bias") if types[path] == "Linear" else ("weight",)  # noqa: E731
    for i, path in enumerate(modules):
        bfl, fused = diffusers_to_bfl(path), FLUX1.fused_name(T, path)
        if bfl is not None:
            for param in params(path):
                checkpoint[f"{bfl}.{'scale' if types[path] == 'RMSNorm' else param}"] = torch.full((1,), float(i))
                expected[f"{path}.{param}"] = [i]
        elif fused is not None:
            name, block = fused
            _, parts = FLUX1.fused_parts(name)
            sizes = FLUX1.part_sizes(T, parts)
            start = sum(sizes[:block])
            for param in params(path):
                rows = checkpoint.setdefault(f"{name}.{param}", torch.zeros(sum(sizes)))
                rows[start:start + sizes[block]] = i
                expected[f"{path}.{param}"] = [i] * sizes[block]
    # norm_out: BFL computes (shift, scale), diffusers (scale, shift): the converter swaps the halves.
    for param in ("weight", "bias"):
        checkpoint[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([torch.zeros(3072), torch.ones(3072)])
        expected[f"norm_out.linear.{param}"] = [1] * 3072 + [0] * 3072
    converted = convert_flux_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v for k, v in checkpoint.items()})
    assert {k: v.flatten().int().tolist() for k, v in converted.items()} == expected


# ---- detection and conversion -------------------------------------------------------------------

REAL_MODULES = (
    "transformer.transformer_blocks.0.attn.to_q",
    "transformer.transformer_blocks.18.attn.add_k_proj",
    "transformer.transformer_blocks.3.norm1_context.linear",
    "transformer.single_transformer_blocks.37.proj_mlp",
    "transformer.single_transformer_blocks.10.proj_out",
    "transformer.context_embedder",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q",
)


def write_diffusers_lora(path: Path, modules: dict[str, tuple[int, int]], rank: int = 4) -> dict[str, np.ndarray]:
    """A diffusers-layout LoRA file: ``<component>.<path>.lora_A/B.weight``, random values."""
    rng = np.random.default_rng(0)
    tensors = {}
    for name, (out_features, in_features) in modules.items():
        tensors[f"{name}.lora_A.weight"] = rng.standard_normal((rank, in_features)).astype("f4")
        tensors[f"{name}.lora_B.weight"] = rng.standard_normal((out_features, rank)).astype("f4")
    write_safetensors(path, {k: Tensor.from_numpy(v) for k, v in tensors.items()}, {})
    return tensors


def real_shapes(names=REAL_MODULES) -> dict[str, tuple[int, int]]:
    return {name: FLUX1.modules(name.split(".", 1)[0])[name.split(".", 1)[1]] for name in names}


def test_a_flux1_dev_lora_converts_neutral_diffusers_peft_bit_exactly(tmp_path):
    original = write_diffusers_lora(tmp_path / "flux.safetensors", real_shapes())
    first = convert(tmp_path / "flux.safetensors", tmp_path / "n.safetensors", "neutral", progress=False)
    assert first.model.architecture == "flux-1-dev"
    model = read_neutral(tmp_path / "n.safetensors")
    assert model.architecture == "flux-1-dev" and sorted(model.modules) == sorted(REAL_MODULES)
    assert loaders(model)["diffusers"] == "yes"  # its components are Flux.1's, not "components SDXL has not"
    convert(tmp_path / "n.safetensors", tmp_path / "d.safetensors", "diffusers", progress=False)
    convert(tmp_path / "d.safetensors", tmp_path / "n2.safetensors", "neutral", progress=False)
    convert(tmp_path / "n2.safetensors", tmp_path / "peft", "peft", progress=False)
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["text_encoder", "text_encoder_2", "transformer"]
    back = convert(tmp_path / "peft", tmp_path / "n3.safetensors", "neutral", progress=False)
    assert back.model.architecture == "flux-1-dev"
    convert(tmp_path / "n3.safetensors", tmp_path / "d2.safetensors", "diffusers", progress=False)
    again = SafetensorsFile(tmp_path / "d2.safetensors")
    assert sorted(again.keys()) == sorted(original)
    for key, array in original.items():
        assert again.tensor(key).to_numpy().tobytes() == array.tobytes(), key


@pytest.mark.parametrize("width", [384, 128])  # FLUX.1-Fill-dev; FLUX.1-Depth-dev and Canny-dev
def test_variant_x_embedder_widths_are_flux1_loras(tmp_path, width):
    write_diffusers_lora(tmp_path / "v.safetensors", {**real_shapes(REAL_MODULES[:2]), "transformer.x_embedder": (3072, width)})
    assert convert(tmp_path / "v.safetensors", tmp_path / "n.safetensors", "neutral", progress=False).model.architecture == "flux-1-dev"


def test_an_sdxl_lora_is_still_an_sdxl_lora(tmp_path):
    names = ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj")
    write_diffusers_lora(tmp_path / "s.safetensors", {n: SDXL.modules(n.split(".", 1)[0])[n.split(".", 1)[1]] for n in names})
    assert convert(tmp_path / "s.safetensors", tmp_path / "n.safetensors", "neutral", progress=False).model.architecture == SDXL.name


def test_a_flux1_lora_of_other_shapes_is_not_a_flux1_lora_and_no_hint_points_at_flux(tmp_path):
    shapes = {**real_shapes(REAL_MODULES[:2]), "transformer.transformer_blocks.1.attn.to_q": (3072, 2048)}
    write_diffusers_lora(tmp_path / "w.safetensors", shapes)
    with pytest.raises(LoraBridgeError, match=r"not a Flux\.1 LoRA: 1 of 3 modules do not fit Flux\.1-dev: "
                                              r"transformer\.transformer_blocks\.1\.attn\.to_q adapts a \[3072, 2048\] weight") as error:
        convert(tmp_path / "w.safetensors", tmp_path / "n.safetensors", "neutral", progress=False)
    assert "looks like" not in str(error.value)


def test_a_flux1_lora_is_refused_by_sdxl_only_formats_and_by_infer(tmp_path):
    write_diffusers_lora(tmp_path / "flux.safetensors", real_shapes())
    convert(tmp_path / "flux.safetensors", tmp_path / "n.safetensors", "neutral", progress=False)
    with pytest.raises(LoraBridgeError, match="--to mindone-sgm names only stable-diffusion-xl-v1-base layers; "
                                              "this LoRA is for flux-1-dev"):
        convert(tmp_path / "n.safetensors", tmp_path / "out.ckpt", "mindone-sgm", progress=False)
    assert not (tmp_path / "out.ckpt").exists()
    base = tmp_path / "sdxl"  # just enough of an SDXL pipeline directory for infer's base-model check
    for name, config in {"model_index.json": {"_class_name": "StableDiffusionXLPipeline"},
                         "unet/config.json": {"addition_embed_type": "text_time"}, "vae/config.json": {}}.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(json.dumps(config))
    with pytest.raises(LoraBridgeError, match=r"n\.safetensors: this is a Flux\.1 LoRA \(flux-1-dev\); the base model is an SDXL pipeline"):
        infer(InferOptions("torch", base, "a cat", lora=tmp_path / "n.safetensors", output=tmp_path / "images"))
    assert not (tmp_path / "images").exists()


# ---- diffusers' own Flux loader on a tiny real transformer --------------------------------------

# PEFT targets: both block kinds (a single-block module tells a narrow Flux.1 LoRA from SD3's names).
TINY_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "proj_mlp", "x_embedder"]


@pytest.mark.torch
def test_a_peft_lora_on_a_tiny_flux_transformer_goes_through_lorabridge_and_loads_in_diffusers(tmp_path):
    torch = pytest.importorskip("torch")
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(0)
    trained = FluxTransformer2DModel(**TINY_FLUX)
    trained.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TINY_TARGETS, init_lora_weights=False))
    layers = get_peft_model_state_dict(trained)
    FluxPipeline.save_lora_weights(tmp_path / "theirs", transformer_lora_layers=layers,
                                   transformer_lora_adapter_metadata=trained.peft_config["default"].to_dict())
    theirs = tmp_path / "theirs" / "pytorch_lora_weights.safetensors"

    neutral = convert(theirs, tmp_path / "n.safetensors", "neutral", progress=False)
    assert neutral.model.architecture == "flux-1-dev"  # Flux.1-dev at smaller widths
    convert(tmp_path / "n.safetensors", tmp_path / "ours.safetensors", "diffusers", progress=False)

    # What FluxPipeline.load_lora_weights does with a file: read it with lora_state_dict, load it into the transformer.
    fresh = FluxTransformer2DModel(**TINY_FLUX)
    state_dict, alphas, metadata = FluxPipeline.lora_state_dict(
        str(tmp_path), weight_name="ours.safetensors", return_alphas=True, return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=fresh, metadata=metadata)
    loaded = get_peft_model_state_dict(fresh, adapter_name=next(iter(fresh.peft_config)))
    assert sorted(loaded) == sorted(layers)
    for key, tensor in layers.items():
        assert torch.equal(loaded[key], tensor), key
    config = fresh.peft_config[next(iter(fresh.peft_config))]
    assert {config.alpha_pattern.get(k, config.lora_alpha) / config.rank_pattern.get(k, config.r)
            for k in {k.rsplit(".lora_", 1)[0] for k in layers}} == {2.0}  # alpha 8 / rank 4 kept


# ---- kohya sd-scripts' Flux layout (networks/lora_flux.py @450630c6: lora_unet_ BFL names, fused qkv/linear1) ----

KOHYA_FLUX = {  # key stem -> (out, in) of the BFL / transformers weight it adapts, at Flux.1-dev size
    "lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072),
    "lora_unet_double_blocks_0_txt_attn_qkv": (9216, 3072),
    "lora_unet_double_blocks_0_img_attn_proj": (3072, 3072),
    "lora_unet_double_blocks_0_img_mod_lin": (18432, 3072),
    "lora_unet_single_blocks_0_linear1": (21504, 3072),
    "lora_unet_single_blocks_0_linear2": (3072, 15360),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    "lora_te3_encoder_block_0_layer_0_SelfAttention_q": (4096, 4096),
}


def _kohya_flux_file(path: Path, rank: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    arrays = {}
    for stem, (out, inp) in KOHYA_FLUX.items():
        arrays[f"{stem}.lora_down.weight"] = rng.standard_normal((rank, inp)).astype("f2")
        arrays[f"{stem}.lora_up.weight"] = rng.standard_normal((out, rank)).astype("f2")
        arrays[f"{stem}.alpha"] = np.array(rank / 2, "f2")
    write_safetensors(path, {k: Tensor.from_numpy(v) for k, v in arrays.items()}, {"ss_network_module": "networks.lora_flux"})
    return arrays


def test_a_kohya_flux_file_reads_as_flux_with_its_fused_layers_split_and_writes_back_byte_identical(tmp_path):
    arrays = _kohya_flux_file(tmp_path / "kohya_flux.safetensors")
    result = convert(tmp_path / "kohya_flux.safetensors", tmp_path / "n.safetensors", "neutral", progress=False)
    model = result.model
    assert result.source_format == "kohya" and model.architecture == "flux-1-dev"
    assert {"transformer.single_transformer_blocks.0.proj_mlp", "transformer.transformer_blocks.0.attn.add_v_proj",
            "transformer.transformer_blocks.0.norm1.linear", "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"} <= set(model.modules)
    assert len(model.modules) == 3 + 3 + 1 + 1 + 4 + 1 + 1 + 1  # qkv, qkv, proj, mod, linear1 (q,k,v,mlp), linear2, te1, te3
    assert model.modules["transformer.single_transformer_blocks.0.proj_mlp"].out_features == 12288
    # every part's delta W is its row block of the fused one
    fused = arrays["lora_unet_single_blocks_0_linear1.lora_up.weight"].astype("f4") @ \
        arrays["lora_unet_single_blocks_0_linear1.lora_down.weight"].astype("f4") * 0.5
    parts = [model.modules[f"transformer.single_transformer_blocks.0.{p}"].delta_weight()
             for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    assert np.allclose(np.concatenate(parts), fused, rtol=1e-6, atol=1e-6)

    for via in ("neutral", "diffusers"):
        src = tmp_path / "n.safetensors"
        if via == "diffusers":
            convert(src, tmp_path / "d.safetensors", "diffusers", progress=False)
            src = convert(tmp_path / "d.safetensors", tmp_path / "n2.safetensors", "neutral", progress=False).output
        convert(src, tmp_path / f"back_{via}.safetensors", "kohya", progress=False)
        back = SafetensorsFile(tmp_path / f"back_{via}.safetensors")
        assert sorted(back.keys()) == sorted(arrays), via
        for key, array in arrays.items():
            assert back.tensor(key).to_numpy().tobytes() == array.tobytes(), (via, key)
        assert back.metadata["modelspec.architecture"] == "flux-1-dev/lora"


def test_a_kohya_flux_lora_is_refused_by_an_sdxl_only_target_with_one_line(tmp_path):
    _kohya_flux_file(tmp_path / "kohya_flux.safetensors")
    with pytest.raises(LoraBridgeError, match="--to mindone-kohya names only stable-diffusion-xl-v1-base layers; "
                                              "this LoRA is for flux-1-dev"):
        convert(tmp_path / "kohya_flux.safetensors", tmp_path / "x.ckpt", "mindone-kohya", progress=False)


def test_comfyui_generic_flux_names_read_as_the_same_flux_lora(tmp_path):
    """ComfyUI's LoraSave / OneTrainer COMFY_LORA: ``diffusion_model.<BFL path>``, ``text_encoders.t5xxl.transformer.``
    (comfy/lora.py model_lora_keys_unet and model_lora_keys_clip)."""
    arrays = _kohya_flux_file(tmp_path / "kohya_flux.safetensors")
    comfy = {}
    for key, array in arrays.items():
        stem, _, suffix = key.partition(".")
        for prefix, dotted in (("lora_unet_", "diffusion_model."), ("lora_te1_", "text_encoders.clip_l.transformer."),
                               ("lora_te3_", "text_encoders.t5xxl.transformer.")):
            if stem.startswith(prefix):
                comfy[f"{dotted}{COMFY_PATHS[stem]}.{suffix}"] = array
    write_safetensors(tmp_path / "comfy.safetensors", {k: Tensor.from_numpy(v) for k, v in comfy.items()}, {})
    from_comfy = convert(tmp_path / "comfy.safetensors", tmp_path / "c.safetensors", "neutral", progress=False).model
    from_kohya = convert(tmp_path / "kohya_flux.safetensors", tmp_path / "k.safetensors", "neutral", progress=False).model
    assert from_comfy.architecture == "flux-1-dev" and sorted(from_comfy.modules) == sorted(from_kohya.modules)
    for name, module in from_kohya.modules.items():
        assert all(module.tensors[r].same_as(from_comfy.modules[name].tensors[r]) for r in module.tensors), name


COMFY_PATHS = {  # the dotted BFL / transformers paths of KOHYA_FLUX's stems
    "lora_unet_double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv",
    "lora_unet_double_blocks_0_txt_attn_qkv": "double_blocks.0.txt_attn.qkv",
    "lora_unet_double_blocks_0_img_attn_proj": "double_blocks.0.img_attn.proj",
    "lora_unet_double_blocks_0_img_mod_lin": "double_blocks.0.img_mod.lin",
    "lora_unet_single_blocks_0_linear1": "single_blocks.0.linear1",
    "lora_unet_single_blocks_0_linear2": "single_blocks.0.linear2",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "text_model.encoder.layers.0.self_attn.q_proj",
    "lora_te3_encoder_block_0_layer_0_SelfAttention_q": "encoder.block.0.layer.0.SelfAttention.q",
}


def test_a_kohya_split_qkv_flux_file_splits_back_to_each_parts_own_rank_and_writes_back_byte_identical(tmp_path):
    """sd-scripts' ``split_qkv=True`` trains q, k and v with their own A but saves them under the fused name:
    ``lora_down`` stacked to 3r rows, ``lora_up`` block-diagonal (9216, 3r), ``.alpha`` not rescaled
    (networks/lora_flux.py @450630c6, LoRAModule.state_dict), so its loaders scale by alpha / 3r."""
    rank, alpha, rng = 4, 8.0, np.random.default_rng(9)
    down = rng.standard_normal((3 * rank, 3072)).astype("f2")
    up = np.zeros((9216, 3 * rank), "f2")
    for part in range(3):
        up[part * 3072:(part + 1) * 3072, part * rank:(part + 1) * rank] = rng.standard_normal((3072, rank)).astype("f2")
    stem = "lora_unet_double_blocks_3_img_attn_qkv"
    arrays = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": np.array(alpha, "f2")}
    write_safetensors(tmp_path / "split_qkv.safetensors", {k: Tensor.from_numpy(v) for k, v in arrays.items()}, {})
    model = convert(tmp_path / "split_qkv.safetensors", tmp_path / "n.safetensors", "neutral", progress=False).model
    parts = [model.modules[f"transformer.transformer_blocks.3.attn.{p}"] for p in ("to_q", "to_k", "to_v")]
    assert [p.rank for p in parts] == [rank] * 3
    assert all(p.scale == alpha / (3 * rank) for p in parts)  # what the file's loaders apply: alpha / 3r
    fused = up.astype("f4") @ down.astype("f4") * (alpha / (3 * rank))
    assert np.allclose(np.concatenate([p.delta_weight() for p in parts]), fused, rtol=1e-6, atol=1e-6)
    convert(tmp_path / "n.safetensors", tmp_path / "back.safetensors", "kohya", progress=False)
    back = SafetensorsFile(tmp_path / "back.safetensors")
    assert sorted(back.keys()) == sorted(arrays)
    for key, array in arrays.items():
        assert back.tensor(key).to_numpy().tobytes() == array.tobytes(), key


# ---- MindONE's Flux LoRA (mindone examples/diffusers/dreambooth/train_dreambooth_lora_flux.py) -----------------

def test_a_mindone_flux_lora_reads_as_flux_and_round_trips_through_both_mindspore_containers(tmp_path):
    """MindONE's Flux trainer saves through mindone.diffusers' ``FluxPipeline.save_lora_weights``: diffusers keys,
    MindSpore safetensors (metadata ``format`` = ``np``), no alpha (MindONE trains with alpha = rank);
    docs/flux-lora-layouts.md section 1 cites the source."""
    rng, rank = np.random.default_rng(13), 4
    shapes = {"transformer.transformer_blocks.0.attn.to_q": (3072, 3072),
              "transformer.single_transformer_blocks.0.attn.to_k": (3072, 3072),
              "transformer.transformer_blocks.0.ff.net.0.proj": (12288, 3072)}
    arrays = {}
    for name, (out, inp) in shapes.items():
        arrays[f"{name}.lora_A.weight"] = rng.standard_normal((rank, inp)).astype("f4")
        arrays[f"{name}.lora_B.weight"] = rng.standard_normal((out, rank)).astype("f4")
    src = tmp_path / "pytorch_lora_weights.safetensors"
    write_safetensors(src, {k: Tensor.from_numpy(v) for k, v in arrays.items()}, {"format": "np"})
    result = convert(src, tmp_path / "n.safetensors", "neutral", progress=False)
    assert result.source_format == "mindone-diffusers" and result.model.architecture == "flux-1-dev"
    assert {m.alpha_source for m in result.model.modules.values()} == {"assumed"}
    assert {m.alpha for m in result.model.modules.values()} == {float(rank)}
    for container in ("safetensors", "ckpt"):
        out = tmp_path / f"back.{container}"
        convert(tmp_path / "n.safetensors", out, "mindone-diffusers", progress=False)
        again = convert(out, tmp_path / f"again_{container}.safetensors", "neutral", progress=False).model
        assert again.architecture == "flux-1-dev"
        for key, array in arrays.items():
            name, _, role = key.rpartition(".lora_")
            assert again.modules[name].tensors[f"lora_{role}"].to_numpy().tobytes() == array.tobytes(), (container, key)
