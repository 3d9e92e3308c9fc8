"""OneTrainer's Flux.1 LoRA layouts: read-only. Test inputs are built from OneTrainer's own key grammar,
written below as data with its sources (``Nerogar/OneTrainer``; commits as ``docs/flux-lora-layouts.md`` s.3):

* legacy: ``abfc72fe138914c5672b862f6909f727b079a511`` ``modules/modelSetup/FluxLoRASetup.py`` (wrappers
  ``lora_te1`` on CLIP-L, ``lora_te2`` on T5, ``lora_transformer`` on the diffusers transformer) and
  ``modules/module/LoRAModule.py`` (``prefix + "_" + module path``, dots to ``_``; ``lora_down``/``lora_up``
  and an ``alpha`` buffer; forward ``up(down(x)) * alpha / rank``), saved by ``modules/modelSaver/flux/FluxLoRASaver.py``;
* OMI: ``e72bfa5571dbba0619772d60b03311f5b69e3a6e`` ``modules/util/convert/lora/convert_flux_lora.py`` (the
  table :data:`OMI_TABLE` copies) and ``modules/util/convert/convert_lora_util.py`` (key = OMI prefix + the
  rest of the key; ``swap_chunks`` swaps the two row halves of ``lora_up.weight``); DoRA's ``dora_scale`` is
  (1, in) (``modules/module/LoRAModule.py`` at the same commit).

The legacy layout is cross-checked with diffusers 0.35.2's ``_convert_mixture_state_dict_to_diffusers``
(``FluxLoraLoaderMixin.lora_state_dict``), on the modules it maps (attention and CLIP-L: it drops the block
path of other layers, e.g. ``ff.net.0.proj`` becomes ``transformer_blocks.0``); diffusers has no OMI reader.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from lorabridge.converters import convert
from lorabridge.converters.registry import get_format
from lorabridge.formats.contract import ReadOptions
from lorabridge.formats.neutral import read_neutral
from lorabridge.io.safetensors_file import write_safetensors
from lorabridge.naming.onetrainer_keys import omi_path
from lorabridge.tensor import Tensor

# Legacy: key stem -> (out, in) at Flux.1-dev size; the stems are the wrappers' prefixes + diffusers paths.
LEGACY = {
    "lora_transformer_transformer_blocks_0_attn_to_q": (3072, 3072),
    "lora_transformer_transformer_blocks_0_attn_add_k_proj": (3072, 3072),
    "lora_transformer_transformer_blocks_18_attn_to_out_0": (3072, 3072),
    "lora_transformer_single_transformer_blocks_37_attn_to_v": (3072, 3072),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
}
LEGACY_ONLY_OURS = {  # layers diffusers' mixture converter misnames (see the module docstring)
    "lora_transformer_transformer_blocks_0_ff_net_0_proj": (12288, 3072),
    "lora_transformer_single_transformer_blocks_0_proj_mlp": (12288, 3072),
    "lora_te2_encoder_block_0_layer_0_SelfAttention_q": (4096, 4096),
}
LEGACY_NAMES = {
    "lora_transformer_transformer_blocks_0_attn_to_q": "transformer.transformer_blocks.0.attn.to_q",
    "lora_transformer_transformer_blocks_0_attn_add_k_proj": "transformer.transformer_blocks.0.attn.add_k_proj",
    "lora_transformer_transformer_blocks_18_attn_to_out_0": "transformer.transformer_blocks.18.attn.to_out.0",
    "lora_transformer_single_transformer_blocks_37_attn_to_v": "transformer.single_transformer_blocks.37.attn.to_v",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    "lora_transformer_transformer_blocks_0_ff_net_0_proj": "transformer.transformer_blocks.0.ff.net.0.proj",
    "lora_transformer_single_transformer_blocks_0_proj_mlp": "transformer.single_transformer_blocks.0.proj_mlp",
    "lora_te2_encoder_block_0_layer_0_SelfAttention_q": "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q",
}
# OMI: convert_flux_lora.py's table, OMI name -> diffusers name (blocks with {i}).
OMI_TABLE = {
    "double_blocks.{i}.img_attn.qkv.0": "transformer_blocks.{i}.attn.to_q",
    "double_blocks.{i}.img_attn.qkv.1": "transformer_blocks.{i}.attn.to_k",
    "double_blocks.{i}.img_attn.qkv.2": "transformer_blocks.{i}.attn.to_v",
    "double_blocks.{i}.txt_attn.qkv.0": "transformer_blocks.{i}.attn.add_q_proj",
    "double_blocks.{i}.txt_attn.qkv.1": "transformer_blocks.{i}.attn.add_k_proj",
    "double_blocks.{i}.txt_attn.qkv.2": "transformer_blocks.{i}.attn.add_v_proj",
    "double_blocks.{i}.img_attn.proj": "transformer_blocks.{i}.attn.to_out.0",
    "double_blocks.{i}.img_mlp.0": "transformer_blocks.{i}.ff.net.0.proj",
    "double_blocks.{i}.img_mlp.2": "transformer_blocks.{i}.ff.net.2",
    "double_blocks.{i}.img_mod.lin": "transformer_blocks.{i}.norm1.linear",
    "double_blocks.{i}.txt_attn.proj": "transformer_blocks.{i}.attn.to_add_out",
    "double_blocks.{i}.txt_mlp.0": "transformer_blocks.{i}.ff_context.net.0.proj",
    "double_blocks.{i}.txt_mlp.2": "transformer_blocks.{i}.ff_context.net.2",
    "double_blocks.{i}.txt_mod.lin": "transformer_blocks.{i}.norm1_context.linear",
    "single_blocks.{i}.linear1.0": "single_transformer_blocks.{i}.attn.to_q",
    "single_blocks.{i}.linear1.1": "single_transformer_blocks.{i}.attn.to_k",
    "single_blocks.{i}.linear1.2": "single_transformer_blocks.{i}.attn.to_v",
    "single_blocks.{i}.linear1.3": "single_transformer_blocks.{i}.proj_mlp",
    "single_blocks.{i}.linear2": "single_transformer_blocks.{i}.proj_out",
    "single_blocks.{i}.modulation.lin": "single_transformer_blocks.{i}.norm.linear",
    "txt_in": "context_embedder",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # swap_chunks=True
    "final_layer.linear": "proj_out",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "img_in.proj": "x_embedder",
}
OMI_PREFIXES = {"transformer": "transformer", "clip_l": "text_encoder", "t5": "text_encoder_2"}  # convert_flux_lora_key_sets


def quietly(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


def lora_file(path: Path, stems: dict[str, tuple[int, int]], rank: int = 4, alpha: float = 8.0, dtype: str = "f4",
              drop: str | None = None, nan: bool = False) -> dict[str, np.ndarray]:
    """A file of one LoRA per stem, kohya suffixes (what both OneTrainer layouts use), alpha as a 0-d buffer."""
    rng = np.random.default_rng(16)
    arrays = {}
    for stem, (out, inp) in stems.items():
        arrays[f"{stem}.lora_down.weight"] = (rng.standard_normal((rank, inp)) / rank).astype(dtype)
        arrays[f"{stem}.lora_up.weight"] = rng.standard_normal((out, rank)).astype(dtype)
        arrays[f"{stem}.alpha"] = np.array(alpha, "f4")
    if drop:
        del arrays[drop]
    if nan:
        arrays[next(iter(arrays))][0, 0] = np.nan
    write_safetensors(path, {k: Tensor.from_numpy(v) for k, v in arrays.items()}, {"ot_branch": "master"})
    return arrays


def assert_same_models(one, other):
    assert list(other.modules) == list(one.modules)
    for name, module in one.modules.items():
        theirs = other.modules[name]
        assert (theirs.alpha, theirs.kind, theirs.dora_axis) == (module.alpha, module.kind, module.dora_axis)
        assert {r: (t.dtype, t.shape, bytes(t.data)) for r, t in theirs.tensors.items()} == \
               {r: (t.dtype, t.shape, bytes(t.data)) for r, t in module.tensors.items()}


def round_trip(tmp_path: Path, src: Path):
    """read -> neutral -> diffusers -> read back: the model read, the neutral file's and diffusers' read back."""
    read = convert(src, tmp_path / "n.safetensors", "neutral", progress=False)
    convert(tmp_path / "n.safetensors", tmp_path / "d.safetensors", "diffusers", progress=False)
    back = convert(tmp_path / "d.safetensors", tmp_path / "n2.safetensors", "neutral", progress=False).model
    return read, read_neutral(tmp_path / "n.safetensors"), back


def test_the_omi_table_is_onetrainers():
    for omi, diffusers in OMI_TABLE.items():
        for i in ("0", "18") if "{i}" in omi else ("",):
            found = omi_path(omi.replace("{i}", i))
            assert found is not None and found.path == diffusers.replace("{i}", i), omi
            assert found.swapped == (omi == "final_layer.adaLN_modulation.1")


def test_a_legacy_file_is_detected_read_with_its_alphas_and_round_trips_bit_exactly(tmp_path):
    lora_file(tmp_path / "ot.safetensors", {**LEGACY, **LEGACY_ONLY_OURS}, dtype="f2")
    read, neutral, back = round_trip(tmp_path, tmp_path / "ot.safetensors")
    model = read.model
    assert read.source_format == "onetrainer" and model.architecture == "flux-1-dev" and not read.warnings
    assert set(model.modules) == set(LEGACY_NAMES.values())
    assert {(m.alpha, m.alpha_source) for m in model.modules.values()} == {(8.0, "stored")}
    assert all("key_prefix" not in m.extra for m in model.modules.values())  # OneTrainer's prefixes are not kept
    assert model.training["ot_branch"] == "master"
    assert_same_models(model, neutral)
    assert_same_models(model, back)


@pytest.mark.torch
def test_diffusers_mixture_converter_agrees_on_the_legacy_layout(tmp_path):
    torch = pytest.importorskip("torch")
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    lora_file(tmp_path / "ot.safetensors", LEGACY, rank=4, alpha=8.0)  # scale 2: diffusers folds it into A exactly
    ours = get_format("onetrainer").read(tmp_path / "ot.safetensors")
    state_dict, alphas = FluxLoraLoaderMixin.lora_state_dict(str(tmp_path), weight_name="ot.safetensors", return_alphas=True)
    assert alphas is None  # folded into the factors
    assert sorted(state_dict) == sorted(f"{name}.{role}" for name, m in ours.modules.items() for role in m.tensors)
    for name, module in ours.modules.items():
        a, b = (module.tensors[r].to_numpy() for r in ("lora_A.weight", "lora_B.weight"))
        assert module.scale == 2.0
        assert torch.equal(state_dict[f"{name}.lora_A.weight"], torch.from_numpy(a * np.float32(2.0))), name
        assert torch.equal(state_dict[f"{name}.lora_B.weight"], torch.from_numpy(b.copy())), name


def omi_stems() -> dict[str, tuple[int, int]]:
    """OMI key stems of a OneTrainer 'full' LoRA on block 0 and the top-level layers, with CLIP-L and T5."""
    shapes = {"img_attn.qkv.0": (3072, 3072), "txt_attn.qkv.2": (3072, 3072), "img_mlp.0": (12288, 3072),
              "img_mod.lin": (18432, 3072)}
    stems = {f"transformer.double_blocks.0.{k}": v for k, v in shapes.items()}
    stems |= {"transformer.single_blocks.0.linear1.3": (12288, 3072), "transformer.single_blocks.0.linear2": (3072, 15360),
              "transformer.img_in.proj": (3072, 64), "transformer.final_layer.adaLN_modulation.1": (6144, 3072),
              "clip_l.text_model.encoder.layers.0.self_attn.q_proj": (768, 768),
              "t5.encoder.block.0.layer.0.SelfAttention.q": (4096, 4096)}
    return stems


def test_an_omi_file_reads_with_its_parts_named_and_the_swapped_halves_put_back(tmp_path):
    arrays = lora_file(tmp_path / "omi.safetensors", omi_stems(), alpha=2.0)
    read, neutral, back = round_trip(tmp_path, tmp_path / "omi.safetensors")
    model = read.model
    assert read.source_format == "onetrainer" and model.architecture == "flux-1-dev"
    assert {"transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_v_proj",
            "transformer.single_transformer_blocks.0.proj_mlp", "transformer.x_embedder", "transformer.norm_out.linear",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
            "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"} <= set(model.modules)
    assert len(model.modules) == len(omi_stems())
    up = arrays["transformer.final_layer.adaLN_modulation.1.lora_up.weight"]
    norm_b = model.modules["transformer.norm_out.linear"].tensors["lora_B.weight"].to_numpy()
    assert norm_b.tobytes() == np.concatenate([up[3072:], up[:3072]]).tobytes()  # (shift, scale) -> (scale, shift)
    assert_same_models(model, neutral)
    assert_same_models(model, back)


def test_omi_dora_magnitudes_are_per_input_column(tmp_path):
    lora_file(tmp_path / "omi.safetensors", {"transformer.double_blocks.0.img_attn.proj": (3072, 3072)})
    from lorabridge.io.safetensors_file import read_safetensors

    tensors, metadata = read_safetensors(tmp_path / "omi.safetensors")
    tensors["transformer.double_blocks.0.img_attn.proj.dora_scale"] = Tensor.from_numpy(np.ones((1, 3072), "f4"))
    write_safetensors(tmp_path / "omi.safetensors", tensors, metadata)
    (module,) = get_format("onetrainer").read(tmp_path / "omi.safetensors").modules.values()
    assert module.dora_axis == "in" and get_format("onetrainer").dora_axes == ("in",)


def test_user_alpha_applies_only_where_no_alpha_is_stored(tmp_path):
    arrays = lora_file(tmp_path / "ot.safetensors", LEGACY)
    del arrays["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"]
    write_safetensors(tmp_path / "ot.safetensors", {k: Tensor.from_numpy(v) for k, v in arrays.items()}, {})
    model = get_format("onetrainer").read(tmp_path / "ot.safetensors", ReadOptions(alpha=3.0))
    assert model.modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].alpha_source == "user"
    assert {m.alpha for n, m in model.modules.items() if n.startswith("transformer.")} == {8.0}


def test_onetrainer_is_read_only(tmp_path, run_cli):
    assert not get_format("onetrainer").writable
    lora_file(tmp_path / "ot.safetensors", LEGACY)
    result = run_cli("convert", tmp_path / "ot.safetensors", "--to", "onetrainer", "-o", tmp_path / "x.safetensors")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1
    assert lines[0].startswith("error: onetrainer is read-only: lorabridge reads onetrainer files but does not write them")
    assert not (tmp_path / "x.safetensors").exists()


def test_kohya_flux_files_are_not_taken_for_onetrainer(tmp_path):
    lora_file(tmp_path / "k.safetensors", {"lora_unet_double_blocks_0_img_attn_proj": (3072, 3072)})
    assert not get_format("onetrainer").detect(tmp_path / "k.safetensors")
    assert convert(tmp_path / "k.safetensors", tmp_path / "n.safetensors", "neutral", progress=False).source_format == "kohya"


@pytest.mark.parametrize("stems, broken, expected", [
    (LEGACY, {"drop": "lora_transformer_transformer_blocks_0_attn_to_q.lora_up.weight"}, "no lora_B.weight"),
    (omi_stems(), {"drop": "transformer.single_blocks.0.linear2.lora_down.weight"}, "no lora_A.weight"),
    (LEGACY, {"nan": True}, "NaN"),
    (omi_stems(), {"nan": True}, "NaN"),
])
def test_broken_files_are_one_line(run_cli, tmp_path, stems, broken, expected):
    lora_file(tmp_path / "bad.safetensors", stems, **broken)
    result = run_cli("pt2neutral", tmp_path / "bad.safetensors", "--strict", "-o", tmp_path / "n.safetensors")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'bad.safetensors'}: ")
    assert expected in lines[0] and not (tmp_path / "n.safetensors").exists()


def test_wrong_shapes_are_one_line(run_cli, tmp_path):
    lora_file(tmp_path / "bad.safetensors", {"transformer.double_blocks.0.img_attn.qkv.0": (9216, 3072)})  # fused size
    result = run_cli("pt2neutral", tmp_path / "bad.safetensors", "-o", tmp_path / "n.safetensors")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "to_q" in lines[0]
