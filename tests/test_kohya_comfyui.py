"""Every key of our kohya (and LyCORIS) export is one ComfyUI loads, onto the right SDXL weight.

ComfyUI is not installable offline, so its SDXL key-matching rules are restated here as data,
read from ``comfy/lora.py`` (``model_lora_keys_unet``, ``model_lora_keys_clip``, ``load_lora``) and
``comfy/utils.py`` (``unet_to_diffusers``) of comfyanonymous/ComfyUI:

- UNet: ``lora_unet_<SGM weight path, dots as _>`` for every weight of ComfyUI's (SGM) SDXL model,
  plus ``lora_unet_<diffusers path>`` and ``lycoris_<diffusers path>`` through ``unet_to_diffusers``.
- CLIP: ``lora_te1_text_model_encoder_layers_<b>_<layer>`` (clip_l) and ``lora_te2_...`` (clip_g, when
  clip_l is present, as in SDXL) for the six layers of ``LORA_CLIP_MAP``; ``lora_te2_text_projection``.
- Per module ``load_lora`` reads ``.alpha``, ``.dora_scale``, ``.lora_up/down/mid.weight``, LoHa
  ``hada_*`` and LoKr ``lokr_*`` factors, full deltas ``.diff`` (the weight) and ``.diff_b`` (the bias), multiplying the ``*_a`` @ ``*_b`` pairs with ``torch.mm``
  (so they must be 2-D); any other key is "lora key not loaded".

The SDXL model facts the rules run on (blocks, depths, where resamplers and conv shortcuts exist)
are spelled out below, independent of lorabridge's naming code.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorabridge.errors import LoraBridgeWarning
from lorabridge.formats import kohya, lycoris
from lorabridge.io.safetensors_file import read_safetensors
from lorabridge.model import LoraModel, LoraModule
from lorabridge.architectures.sdxl import SDXL
from lorabridge.tensor import Tensor

sdxl_module_types, sdxl_modules = SDXL.module_types, SDXL.modules

# --- ComfyUI's rules, restated -------------------------------------------------------------------
# unet_to_diffusers tables: SGM layer -> diffusers layer inside a resnet, an attention, a transformer block.
RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
          "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
ATTENTION = ("norm", "proj_in", "proj_out")
TRANSFORMER_BLOCK = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
       "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
       "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
# model_lora_keys_clip: LORA_CLIP_MAP, per encoder layer.
CLIP_LAYERS = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
               "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
               "self_attn.out_proj": "self_attn_out_proj"}
# load_lora: the per-module suffixes it consumes.
LOADED_SUFFIXES = {"alpha", "dora_scale", "reshape_weight", "diff", "diff_b", "lora_up.weight", "lora_down.weight", "lora_mid.weight",
                   "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                   "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
MM_FACTORS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1_a", "lokr_w1_b"}  # torch.mm operands

# --- SDXL-base, as ComfyUI's SDXL config describes it ----------------------------------------------
RES_BLOCKS = 2
DOWN_DEPTHS = (0, 2, 10)  # transformer blocks per attention, per down level (level 0 has no attention)
UP_DEPTHS = (10, 2, 0)
MID_DEPTH = 10
CLIP_DEPTHS = {"text_encoder": ("lora_te1", 12), "text_encoder_2": ("lora_te2", 32)}
# Resnets whose channel count changes, so they have a conv_shortcut: the first of down levels 1 and 2, all up ones.
SHORTCUTS = {("down", 1, 0), ("down", 2, 0)} | {("up", level, i) for level in range(3) for i in range(3)}


def sdxl_sgm_to_diffusers() -> dict[str, str]:
    """SGM weight path -> diffusers path, for every weight ComfyUI's SDXL UNet has (unet_to_diffusers, restated)."""
    table = dict(TOP)

    def resnet(sgm: str, diffusers: str, has_shortcut: bool):
        table.update({f"{sgm}.{s}": f"{diffusers}.{d}" for s, d in RESNET.items() if d != "conv_shortcut" or has_shortcut})

    def attention(sgm: str, diffusers: str, depth: int):
        table.update({f"{sgm}.{layer}": f"{diffusers}.{layer}" for layer in ATTENTION})
        table.update({f"{sgm}.transformer_blocks.{t}.{layer}": f"{diffusers}.transformer_blocks.{t}.{layer}"
                      for t in range(depth) for layer in TRANSFORMER_BLOCK})

    for level, depth in enumerate(DOWN_DEPTHS):
        for i in range(RES_BLOCKS):
            block = 1 + level * (RES_BLOCKS + 1) + i
            resnet(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{i}", ("down", level, i) in SHORTCUTS)
            if depth:
                attention(f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{i}", depth)
        if level < len(DOWN_DEPTHS) - 1:  # the last level does not downsample
            table[f"input_blocks.{(level + 1) * (RES_BLOCKS + 1)}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
    resnet("middle_block.0", "mid_block.resnets.0", False)
    attention("middle_block.1", "mid_block.attentions.0", MID_DEPTH)
    resnet("middle_block.2", "mid_block.resnets.1", False)
    for level, depth in enumerate(UP_DEPTHS):
        for i in range(RES_BLOCKS + 1):
            block = level * (RES_BLOCKS + 1) + i
            resnet(f"output_blocks.{block}.0", f"up_blocks.{level}.resnets.{i}", True)
            if depth:
                attention(f"output_blocks.{block}.1", f"up_blocks.{level}.attentions.{i}", depth)
            if i == RES_BLOCKS and level < len(UP_DEPTHS) - 1:  # the last level does not upsample
                table[f"output_blocks.{block}.{2 if depth else 1}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
    return table


def comfyui_key_map() -> dict[str, str]:
    """LoRA key stem ComfyUI recognises -> the diffusers name of the SDXL weight it patches."""
    sgm = sdxl_sgm_to_diffusers()
    keys = {"lora_unet_" + s.replace(".", "_"): f"unet.{d}" for s, d in sgm.items()}
    keys |= {f"{prefix}_{d.replace('.', '_')}": f"unet.{d}" for d in sgm.values() for prefix in ("lora_unet", "lycoris")}
    for component, (prefix, depth) in CLIP_DEPTHS.items():
        keys |= {f"{prefix}_text_model_encoder_layers_{b}_{short}": f"{component}.text_model.encoder.layers.{b}.{layer}"
                 for b in range(depth) for layer, short in CLIP_LAYERS.items()}
    keys["lora_te2_text_projection"] = "text_encoder_2.text_projection"
    return keys


# --- what we export --------------------------------------------------------------------------------
def every_sdxl_layer(kind: str = "lora") -> LoraModel:
    """A rank-1 module on every Linear and Conv2d of SDXL-base's UNet and both text encoders."""
    rng = np.random.default_rng(0)
    model = LoraModel()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        types = sdxl_module_types(component)
        for path, shape in sdxl_modules(component).items():
            if types[path] not in ("Linear", "Conv2d") or "embeddings" in path:
                continue
            out, inp, *kernel = shape
            if kind == "lora":
                t = {"lora_A.weight": (1, inp, *kernel), "lora_B.weight": (out, 1, *([1, 1] if kernel else []))}
            else:
                t = {"hada_w1_a": (out, 1), "hada_w1_b": (1, inp, *kernel), "hada_w2_a": (out, 1), "hada_w2_b": (1, inp, *kernel)}
            tensors = {r: Tensor.from_numpy(rng.standard_normal(s).astype("f2")) for r, s in t.items()}
            model.add(LoraModule(f"{component}.{path}", kind, tensors, alpha=1.0))
    return model


def stems_and_suffixes(path) -> list[tuple[str, str, Tensor]]:
    tensors, _ = read_safetensors(path)
    return [(*key.split(".", 1), t) for key, t in tensors.items()]


def test_the_restated_unet_table_covers_every_sdxl_unet_weight():
    """Sanity of the restatement itself: it names exactly SDXL-base's UNet weights (2,000+), no more."""
    assert set(sdxl_sgm_to_diffusers().values()) == set(sdxl_modules("unet"))


def test_every_key_of_a_kohya_export_is_loaded_by_comfyui_onto_the_layer_it_came_from(tmp_path):
    model = every_sdxl_layer()
    with pytest.warns(LoraBridgeWarning, match="diffusers' kohya loader cannot"):  # conv_in & co: ComfyUI loads them
        kohya.write(model, tmp_path / "k.safetensors")
    key_map, seen = comfyui_key_map(), set()
    roles = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
    for stem, suffix, tensor in stems_and_suffixes(tmp_path / "k.safetensors"):
        assert suffix in LOADED_SUFFIXES, f"{stem}.{suffix}: lora key not loaded"
        assert stem in key_map, f"{stem}: ComfyUI has no such key"
        target = key_map[stem]  # the SDXL weight ComfyUI patches with it: must be where the factors came from
        if suffix in roles:
            assert tensor.same_as(model.modules[target].tensors[roles[suffix]]), f"{stem} patches {target}"
        seen.add(target)
    loadable = set(key_map.values())
    assert seen == {m for m in model.modules if m in loadable}
    # ComfyUI loads every UNet layer, and the text-encoder layers it knows (q/k/v/out, fc1/fc2, text_projection).
    assert {m for m in model.modules if m.startswith("unet.")} <= seen
    assert len([m for m in seen if m.startswith("text_encoder.")]) == 12 * 6
    assert len([m for m in seen if m.startswith("text_encoder_2.")]) == 32 * 6 + 1


def test_a_lycoris_loha_export_is_loaded_by_comfyui_with_2d_factors(tmp_path):
    model = every_sdxl_layer("loha")
    lycoris.write(model, tmp_path / "l.safetensors")
    key_map = comfyui_key_map()
    for stem, suffix, tensor in stems_and_suffixes(tmp_path / "l.safetensors"):
        assert suffix in LOADED_SUFFIXES and stem in key_map, f"{stem}.{suffix}"
        if suffix in MM_FACTORS:
            assert len(tensor.shape) == 2, f"{stem}.{suffix} {tensor.shape}: torch.mm needs a matrix"


# --- ComfyUI's LoraSave output, read -----------------------------------------------------------------
# comfyanonymous/ComfyUI comfy_extras/nodes_lora_extract.py (LoraSave.save, calc_lora_model): keys are the
# model's own state-dict names minus ".weight" under "diffusion_model." (SGM UNet) and "text_encoders."
# (the CLIP patcher's "clip_l.transformer.*"/"clip_g.transformer.*", transformers layout, comfy/clip_model.py);
# lora_type "standard": every weight of 2+ dims as lora_up (out, r[, 1, 1]) / lora_down (r, in[, kh, kw]), fp16,
# no alpha; with bias_diff (on by default) a ".diff" for every 1-D weight (norms) and a ".diff_b" for every bias;
# lora_type "full_diff": a ".diff" for every weight. ComfyUI's CLIP-L has a text_projection diffusers' lacks.
def _has_bias(stem: str) -> bool:
    return not stem.endswith(("to_q", "to_k", "to_v", "text_projection")) and "embedding" not in stem


def lora_save_file(path, lora_type: str = "standard", only: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """A LoraSave file for an SDXL model diff at SDXL-base shapes (rank 1); ``only``: stems containing one of these."""
    rng = np.random.default_rng(0)
    weights = {f"diffusion_model.{s}": sdxl_modules("unet")[d] for s, d in sdxl_sgm_to_diffusers().items()}
    for component, clip in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        weights |= {f"text_encoders.{clip}.transformer.{p}": shape for p, shape in sdxl_modules(component).items()}
    weights["text_encoders.clip_l.transformer.text_projection"] = (768, 768)
    sd = {}
    for stem, shape in weights.items():
        if only and not any(o in stem for o in only):
            continue
        out, *rest = shape
        if lora_type == "full_diff" or len(shape) < 2:
            sd[f"{stem}.diff"] = rng.standard_normal(shape)
        else:
            sd[f"{stem}.lora_up.weight"] = rng.standard_normal((out, 1, *([1, 1] if len(rest) > 1 else [])))
            sd[f"{stem}.lora_down.weight"] = rng.standard_normal((1, *rest))
        if _has_bias(stem):
            sd[f"{stem}.diff_b"] = rng.standard_normal((out,))
    tensors = {k: Tensor.from_numpy(v.astype("f2")) for k, v in sd.items()}
    from lorabridge.io.safetensors_file import write_safetensors

    write_safetensors(path, tensors, {})
    return tensors


def test_a_comfyui_lora_save_file_reads_its_lora_pairs_and_names_what_it_drops(tmp_path, run_cli):
    """Refused before as "component 'diffusion'" / "LyCORIS full modules have no neutral kind"."""
    from lorabridge.converters.torch import pt2neutral
    from lorabridge.errors import LoraBridgeError
    from lorabridge.formats.neutral import read_neutral

    tensors = lora_save_file(tmp_path / "ComfyUI_extracted_lora_00001_.safetensors")
    src = tmp_path / "ComfyUI_extracted_lora_00001_.safetensors"
    stray = [k for k in tensors if k.endswith(".diff_b") or k.endswith(".diff")]
    with pytest.raises(LoraBridgeError, match=rf"{len(stray)} bias or norm-layer delta\(s\) .*--skip-unknown drops them"):
        pt2neutral(src, tmp_path / "n.safetensors", progress=False)
    result = pt2neutral(src, tmp_path / "n.safetensors", skip_unknown=True, progress=False)
    assert result.source_format == "kohya"
    assert any(f"dropped {len(stray)} bias or norm-layer delta(s)" in w for w in result.warnings)
    assert any("text_encoder.text_projection" in w for w in result.warnings)  # CLIP-L's: no such diffusers layer
    model = read_neutral(result.output, verify_hash=True)
    pairs = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_up.weight")} - {"text_encoders.clip_l.transformer.text_projection"}
    assert len(model.modules) == len(pairs) and set(model.summary()["kinds"]) == {"lora"}
    sgm = sdxl_sgm_to_diffusers()
    for stem in pairs:
        if stem.startswith("diffusion_model."):
            name = "unet." + sgm[stem[len("diffusion_model."):]]
        else:
            name = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}[stem.split(".")[1]] + "." + stem.split(".", 3)[3]
        module = model.modules[name]
        assert module.tensors["lora_A.weight"].same_as(tensors[f"{stem}.lora_down.weight"]), name
        assert module.tensors["lora_B.weight"].same_as(tensors[f"{stem}.lora_up.weight"]), name
        assert module.alpha_source == "assumed" and module.alpha == 1.0


def test_comfyui_full_diff_deltas_are_kind_full_and_written_back_where_comfyui_loads_them(tmp_path):
    """LoraSave's full_diff: ``.diff`` (delta W) and ``.diff_b`` per layer -> kind "full"; our kohya export
    spells them ``lora_unet_<SGM path>.diff``/``.diff_b``, which ComfyUI's load_lora patches the weight/bias with."""
    from lorabridge.converters.torch import pt2neutral
    from lorabridge.formats.neutral import read_neutral

    src = tmp_path / "full.safetensors"
    tensors = lora_save_file(src, "full_diff", only=("input_blocks.4.1.transformer_blocks.0.attn1", "input_blocks.4.0.in_layers"))
    result = pt2neutral(src, tmp_path / "n.safetensors", skip_unknown=True, progress=False)
    model = read_neutral(result.output, verify_hash=True)
    assert set(model.summary()["kinds"]) == {"full"} and len(model.modules) == 5  # to_q/k/v/out.0 and conv1
    out_proj = model.modules["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"]
    assert out_proj.tensors["diff_b"].same_as(tensors["diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.diff_b"])
    assert any("dropped 2 bias or norm-layer delta(s)" in w for w in result.warnings)  # in_layers.0 (GroupNorm)
    kohya.write(model, tmp_path / "k.safetensors")
    key_map = comfyui_key_map()
    written = stems_and_suffixes(tmp_path / "k.safetensors")
    assert {suffix for _, suffix, _ in written} == {"diff", "diff_b"}
    for stem, suffix, tensor in written:
        assert tensor.same_as(model.modules[key_map[stem]].tensors[suffix])


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "U8"]), data=st.binary(min_size=8, max_size=8),
       shape=st.sampled_from([(), (1,), (1, 1)]))
def test_a_stored_alpha_reads_as_the_exact_value_of_its_bits(dtype, data, shape):
    """An alpha is the value its bytes hold, as numpy widens them to float64 (F16, BF16 and F32 exactly, an F64
    as it is, so that it goes back bit-exact), NaN and Inf included (the checks refuse those)."""
    from lorabridge.formats.underscored_files import alpha_of
    from lorabridge.tensor import DTYPES

    alpha = Tensor(dtype, shape, data[:DTYPES[dtype][0]])
    value, source, extra = alpha_of({"alpha": alpha}, 4, None)
    with np.errstate(invalid="ignore"):  # a signalling NaN, widened, is still NaN
        expected = float(alpha.to_numpy().astype(np.float64).reshape(-1)[0])
    assert (source, extra, type(value)) == ("stored", {"alpha_dtype": dtype}, float)
    assert value == expected or (np.isnan(value) and np.isnan(expected))
