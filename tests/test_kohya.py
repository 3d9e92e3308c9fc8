"""kohya sd-scripts / A1111 / ComfyUI files: names, alphas, metadata, round trips and bad input.

Inputs are written with ``safetensors.torch.save_file`` (what kohya's scripts call), their names
taken from the table below, which is spelled out by hand from SDXL's block layout (FORMATS.md
section 3), not produced by lorabridge's naming code.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from lorabridge.converters import convert  # noqa: E402
from lorabridge.errors import LoraBridgeError, LoraBridgeWarning  # noqa: E402
from lorabridge.formats import kohya  # noqa: E402
from lorabridge.formats.contract import ReadOptions, WriteOptions  # noqa: E402
from lorabridge.formats.neutral import read_neutral, write_neutral  # noqa: E402
from lorabridge.io.safetensors_file import read_safetensors, write_safetensors  # noqa: E402
from lorabridge.model import LoraModel, LoraModule  # noqa: E402
from lorabridge.architectures.sdxl import SDXL  # noqa: E402
from lorabridge.report import validation_report  # noqa: E402
from lorabridge.tensor import Tensor  # noqa: E402

sdxl_modules = SDXL.modules

pytestmark = pytest.mark.torch

# kohya stem in SGM spelling, the same in diffusers spelling, and the canonical module it names.
NAMES = [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
     "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj", "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_ff_net_0_proj",
     "unet.down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj"),
    ("lora_unet_middle_block_1_transformer_blocks_3_attn2_to_k", "lora_unet_mid_block_attentions_0_transformer_blocks_3_attn2_to_k",
     "unet.mid_block.attentions.0.transformer_blocks.3.attn2.to_k"),
    ("lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_out_0", "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
     "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"),
    ("lora_unet_output_blocks_5_1_proj_out", "lora_unet_up_blocks_1_attentions_2_proj_out", "unet.up_blocks.1.attentions.2.proj_out"),
    ("lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_down_blocks_0_resnets_0_conv1", "unet.down_blocks.0.resnets.0.conv1"),
    ("lora_unet_input_blocks_7_0_skip_connection", "lora_unet_down_blocks_2_resnets_0_conv_shortcut", "unet.down_blocks.2.resnets.0.conv_shortcut"),
    ("lora_unet_input_blocks_3_0_op", "lora_unet_down_blocks_0_downsamplers_0_conv", "unet.down_blocks.0.downsamplers.0.conv"),
    ("lora_unet_output_blocks_3_0_emb_layers_1", "lora_unet_up_blocks_1_resnets_0_time_emb_proj", "unet.up_blocks.1.resnets.0.time_emb_proj"),
    ("lora_unet_output_blocks_2_2_conv", "lora_unet_up_blocks_0_upsamplers_0_conv", "unet.up_blocks.0.upsamplers.0.conv"),
    ("lora_unet_time_embed_0", "lora_unet_time_embedding_linear_1", "unet.time_embedding.linear_1"),
    ("lora_unet_label_emb_0_2", "lora_unet_add_embedding_linear_2", "unet.add_embedding.linear_2"),
    ("lora_unet_input_blocks_0_0", "lora_unet_conv_in", "unet.conv_in"),
    ("lora_unet_out_2", "lora_unet_conv_out", "unet.conv_out"),
    ("lora_te1_text_model_encoder_layers_11_mlp_fc2", "lora_te1_text_model_encoder_layers_11_mlp_fc2",
     "text_encoder.text_model.encoder.layers.11.mlp.fc2"),
    ("lora_te2_text_model_encoder_layers_31_self_attn_out_proj", "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
     "text_encoder_2.text_model.encoder.layers.31.self_attn.out_proj"),
]
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def kohya_state_dict(spelling: int = 0, dtype=torch.float32, alpha_dtype=torch.float16, rank: int = 2,
                     alpha: float | None = 1.0, seed: int = 0) -> dict:
    """A kohya state dict over NAMES (spelling 0: SGM, 1: diffusers), full SDXL shapes, random factors."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for row in NAMES:
        component, path = row[2].split(".", 1)
        out, inp, *kernel = sdxl_modules(component)[path]
        stem = row[spelling]
        sd[f"{stem}.lora_down.weight"] = torch.randn(rank, inp, *kernel, generator=gen).to(dtype)
        sd[f"{stem}.lora_up.weight"] = torch.randn(out, rank, *([1, 1] if kernel else []), generator=gen).to(dtype)
        if alpha is not None:
            sd[f"{stem}.alpha"] = torch.tensor(alpha, dtype=alpha_dtype)
    return sd


def data_section_sha256(path) -> str:
    """kohya's/A1111's model hash: sha256 of everything after the safetensors header."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + n:]).hexdigest()


def save_kohya(path, sd: dict, metadata: dict | None = None):
    save_file(sd, str(path), metadata)
    return path


METADATA = {"ss_network_module": "networks.lora", "ss_network_dim": "Dynamic", "ss_network_alpha": "1.0",
            "ss_output_name": "my_style", "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "modelspec.title": "my style"}


def test_sgm_spelled_kohya_names_resolve_to_the_diffusers_modules(tmp_path):
    sd = kohya_state_dict(spelling=0)
    model = kohya.read(save_kohya(tmp_path / "sgm.safetensors", sd))
    assert sorted(model.modules) == sorted(row[2] for row in NAMES)
    for stem, _, name in NAMES:
        module = model.modules[name]
        assert module.tensors["lora_A.weight"].to_float32().tobytes() == sd[f"{stem}.lora_down.weight"].numpy().tobytes()
        assert module.tensors["lora_B.weight"].to_float32().tobytes() == sd[f"{stem}.lora_up.weight"].numpy().tobytes()
        assert (module.alpha, module.alpha_source, module.extra["alpha_dtype"]) == (1.0, "stored", "F16")


def test_diffusers_spelled_kohya_file_reads_as_the_same_model(tmp_path):
    sgm = kohya.read(save_kohya(tmp_path / "sgm.safetensors", kohya_state_dict(spelling=0)))
    diffusers = kohya.read(save_kohya(tmp_path / "diffusers.safetensors", kohya_state_dict(spelling=1)))
    assert set(sgm.modules) == set(diffusers.modules) == {row[2] for row in NAMES}
    for name, module in sgm.modules.items():
        assert all(t.same_as(diffusers.modules[name].tensors[r]) for r, t in module.tensors.items())


def test_diffusers_spelled_input_is_written_in_sgm_spelling(tmp_path):
    src = save_kohya(tmp_path / "diffusers.safetensors", kohya_state_dict(spelling=1))
    neutral = convert(src, tmp_path / "n.safetensors", to="neutral", progress=False).output
    out = convert(neutral, tmp_path / "k.safetensors", to="kohya", progress=False).output
    written, _ = read_safetensors(out)
    assert {key.split(".")[0] for key in written} == {row[0] for row in NAMES}


@pytest.mark.parametrize("dtype,alpha_dtype", [("F32", "F16"), ("F16", "F16"), ("BF16", "BF16"), ("F32", "F32"), ("BF16", "F32")])
def test_kohya_to_neutral_to_kohya_is_bit_exact(tmp_path, dtype, alpha_dtype):
    sd = kohya_state_dict(dtype=TORCH_DTYPES[dtype], alpha_dtype=TORCH_DTYPES[alpha_dtype], alpha=0.75)
    src = save_kohya(tmp_path / "src.safetensors", sd, METADATA)
    hashed = {**METADATA, "sshs_model_hash": data_section_sha256(src), "sshs_legacy_hash": "deadbeef"}
    src = save_kohya(tmp_path / "src.safetensors", sd, hashed)
    neutral = convert(src, tmp_path / "n.safetensors", to="neutral", progress=False).output
    out = convert(neutral, tmp_path / "back.safetensors", to="kohya", progress=False).output
    original, original_meta = read_safetensors(src)
    written, written_meta = read_safetensors(out)
    assert list(written) == list(original)  # same keys, laid out in safetensors' own order
    assert all(written[k].same_as(original[k]) for k in original)
    assert written["lora_unet_input_blocks_0_0.alpha"].shape == () and written["lora_unet_input_blocks_0_0.alpha"].dtype == alpha_dtype
    # Training facts come back verbatim; the data hash is recomputed (and equal: same data, same order).
    assert written_meta.pop("sshs_model_hash") == data_section_sha256(out) == data_section_sha256(src)
    assert written_meta == {k: v for k, v in hashed.items() if k not in ("sshs_model_hash", "sshs_legacy_hash")} | {
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"}


def test_a_kohya_file_without_alphas_gets_alpha_rank_as_assumed_and_keeps_having_none(tmp_path):
    src = save_kohya(tmp_path / "src.safetensors", kohya_state_dict(alpha=None, rank=3))
    model = kohya.read(src)
    assert {(m.alpha, m.alpha_source, m.scale) for m in model.modules.values()} == {(3.0, "assumed", 1.0)}
    neutral = convert(src, tmp_path / "n.safetensors", to="neutral", progress=False).output
    back = convert(neutral, tmp_path / "back.safetensors", to="kohya", progress=False).output
    original, _ = read_safetensors(src)
    written, _ = read_safetensors(back)
    assert set(written) == set(original) and all(written[k].same_as(original[k]) for k in original)


def test_user_alpha_applies_only_where_the_file_stores_none(tmp_path):
    sd = kohya_state_dict(alpha=None)
    sd["lora_unet_input_blocks_0_0.alpha"] = torch.tensor(0.5)
    model = kohya.read(save_kohya(tmp_path / "src.safetensors", sd), ReadOptions(alpha=4.0))
    assert (model.modules["unet.conv_in"].alpha, model.modules["unet.conv_in"].alpha_source) == (0.5, "stored")
    assert {m.alpha_source for n, m in model.modules.items() if n != "unet.conv_in"} == {"user"}


def test_text_encoder_modules_keep_their_components(tmp_path):
    model = kohya.read(save_kohya(tmp_path / "src.safetensors", kohya_state_dict()))
    assert model.components == ["unet", "text_encoder", "text_encoder_2"]


def test_dtype_option_casts_every_tensor_alpha_included(tmp_path):
    neutral = tmp_path / "n.safetensors"
    write_neutral(kohya.read(save_kohya(tmp_path / "src.safetensors", kohya_state_dict())), neutral)
    out = convert(neutral, tmp_path / "k.safetensors", to="kohya", dtype="bf16", progress=False).output
    written, _ = read_safetensors(out)
    assert {t.dtype for t in written.values()} == {"BF16"}


# --- DoRA and kinds kohya cannot hold -------------------------------------------------------------

def loha_model() -> LoraModel:
    rng = np.random.default_rng(0)
    model = LoraModel()
    for name, (out, inp) in [("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (64, 64)),
                             ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v", (64, 32))]:
        t = {"hada_w1_a": (out, 2), "hada_w1_b": (2, inp), "hada_w2_a": (out, 2), "hada_w2_b": (2, inp)}
        model.add(LoraModule(name, "loha", {r: Tensor.from_numpy(rng.standard_normal(s).astype("f4")) for r, s in t.items()}, 1.0))
    return model


def test_loha_modules_are_refused_by_the_kohya_writer_with_the_modules_listed(tmp_path):
    with pytest.raises(LoraBridgeError, match=r"kohya format holds only plain LoRA and full deltas, 2 module\(s\) are loha: "
                                              r"unet\.down_blocks\.1\..*attn1\.to_q \(loha\).*--bake-to-lora RANK"):
        kohya.write(loha_model(), tmp_path / "k.safetensors")
    assert not (tmp_path / "k.safetensors").exists()


def test_bake_to_lora_writes_plain_lora_and_reports_the_error_of_each_module(tmp_path):
    model = loha_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kohya.write(model, tmp_path / "k.safetensors", WriteOptions(bake_to_lora=4))  # a rank-2 LoHa has rank <= 4: exact
    messages = [str(w.message) for w in caught]
    assert any("baked 2 module(s)" in m for m in messages)
    assert sum("loha baked to LoRA rank 4, relative error" in m for m in messages) == 2
    back = kohya.read(tmp_path / "k.safetensors")
    for name, module in model.modules.items():
        np.testing.assert_allclose(back.modules[name].delta_weight(), module.delta_weight(), rtol=1e-4, atol=1e-4)


def dora_model(axis: str) -> LoraModel:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 32)).astype("f4"), rng.standard_normal((64, 2)).astype("f4")
    scale = np.abs(rng.standard_normal((64, 1) if axis == "out" else (1, 32))).astype("f4")
    tensors = {"lora_A.weight": Tensor.from_numpy(a), "lora_B.weight": Tensor.from_numpy(b), "dora_scale": Tensor.from_numpy(scale)}
    model = LoraModel()
    model.add(LoraModule("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v", "lora", tensors, 2.0, dora_axis=axis))
    return model


def test_dora_magnitudes_per_output_row_are_written_as_dora_scale_with_a_warning_and_read_back(tmp_path):
    with pytest.warns(LoraBridgeWarning, match=r"1 module\(s\) have DoRA magnitudes per output row .*attn2.to_v.*A1111"):
        kohya.write(dora_model("out"), tmp_path / "k.safetensors")
    written, _ = read_safetensors(tmp_path / "k.safetensors")
    assert written["lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.dora_scale"].shape == (64, 1)
    back = kohya.read(tmp_path / "k.safetensors")
    assert back.modules["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v"].dora_axis == "out"


def test_dora_magnitudes_per_input_column_are_written_unchanged(tmp_path):
    """OneTrainer's and LyCORIS' wd_on_output=False axis, the one A1111 and ComfyUI compute right."""
    model = dora_model("in")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about on this axis
        kohya.write(model, tmp_path / "k.safetensors")
    written, _ = read_safetensors(tmp_path / "k.safetensors")
    stored = written["lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.dora_scale"]
    assert stored.same_as(model.modules["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v"].tensors["dora_scale"])
    assert kohya.read(tmp_path / "k.safetensors").modules["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v"].dora_axis == "in"


def test_a_dora_scale_stored_as_out_is_read_per_output_row_in_the_shape_the_spec_gives_and_validates(tmp_path):
    """kohya/LyCORIS files may hold a 1-D (out,) magnitude (A1111's network.py uses dora_scale whatever its shape,
    ComfyUI's comfy/weight_adapter/base.py decides the axis by dora_scale.shape[0] == W.shape[0]); spec 3.3 allows
    (out, 1[, 1, 1]) only, so the reader reshapes it (same bytes) and the neutral file validates."""
    sd = kohya_state_dict()
    stem = NAMES[0][0]
    out = sd[f"{stem}.lora_up.weight"].shape[0]
    sd[f"{stem}.dora_scale"] = torch.rand(out) + 0.5
    model = kohya.read(save_kohya(tmp_path / "k.safetensors", sd))
    module = model.modules[NAMES[0][2]]
    assert module.dora_axis == "out" and module.tensors["dora_scale"].shape == (out, 1)
    np.testing.assert_array_equal(module.tensors["dora_scale"].to_numpy().reshape(-1), sd[f"{stem}.dora_scale"].numpy())
    write_neutral(model, tmp_path / "n.safetensors")
    report = validation_report(tmp_path / "n.safetensors")
    assert report["valid"], report["problems"]


# --- bad input ------------------------------------------------------------------------------------

def test_mismatched_lora_down_and_lora_up_ranks_are_refused_with_the_module_named(tmp_path):
    sd = kohya_state_dict()
    sd["lora_unet_input_blocks_0_0.lora_up.weight"] = torch.zeros(320, 3, 1, 1)
    with pytest.raises(LoraBridgeError, match=r"unet\.conv_in: rank mismatch, lora_A is \[2, 4, 3, 3\] but lora_B is \[320, 3, 1, 1\]"):
        kohya.read(save_kohya(tmp_path / "bad.safetensors", sd))


def test_a_missing_half_is_refused_with_the_module_named(tmp_path):
    sd = kohya_state_dict()
    del sd["lora_te1_text_model_encoder_layers_11_mlp_fc2.lora_up.weight"]
    with pytest.raises(LoraBridgeError, match=r"text_encoder\.text_model\.encoder\.layers\.11\.mlp\.fc2 has .* but no lora_B\.weight"):
        kohya.read(save_kohya(tmp_path / "bad.safetensors", sd))


@pytest.mark.parametrize("alpha_dtype,alpha", [(torch.float64, 0.1), (torch.int64, 2**24 + 1)])
def test_an_alpha_float32_cannot_hold_goes_back_bit_exact(tmp_path, alpha_dtype, alpha):
    """0.1 as F64 and 16,777,217 as I64 are not float32 values: read through float32 they came back changed."""
    src = save_kohya(tmp_path / "src.safetensors", kohya_state_dict(alpha_dtype=alpha_dtype, alpha=alpha))
    neutral = convert(src, tmp_path / "n.safetensors", to="neutral", progress=False).output
    assert {m.alpha for m in read_neutral(neutral).modules.values()} == {float(alpha)}
    out = convert(neutral, tmp_path / "back.safetensors", to="kohya", progress=False).output
    original, _ = read_safetensors(src)
    written, _ = read_safetensors(out)
    assert all(written[k].same_as(original[k]) for k in original)


def test_an_fp8_alpha_is_refused_in_one_line(tmp_path, run_cli):
    """No struct or numpy type reads FP8; such an alpha was a TypeError traceback."""
    tensors = {k: Tensor.from_numpy(v.numpy()) for k, v in kohya_state_dict().items()}
    tensors["lora_unet_input_blocks_0_0.alpha"] = Tensor("F8_E4M3", (), b"\x38")
    src = tmp_path / "fp8.safetensors"
    write_safetensors(src, tensors)
    result = run_cli("convert", src, "--to", "neutral", "-o", tmp_path / "n.safetensors")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "broken LoRA module(s): unet.conv_in: alpha: F8_E4M3 tensors cannot be turned into numbers" in result.output
    assert not (tmp_path / "n.safetensors").exists()


def test_a_non_scalar_alpha_is_refused(tmp_path):
    sd = kohya_state_dict()
    sd["lora_unet_input_blocks_0_0.alpha"] = torch.ones(2)
    with pytest.raises(LoraBridgeError, match=r"unet\.conv_in: alpha must be a single number, it has shape \[2\]"):
        kohya.read(save_kohya(tmp_path / "bad.safetensors", sd))


def test_one_module_named_in_both_spellings_is_refused(tmp_path):
    sd = {**kohya_state_dict(spelling=0), **kohya_state_dict(spelling=1)}
    with pytest.raises(LoraBridgeError, match=r"both 'lora_unet_.*' and 'lora_unet_.*' name its"):
        kohya.read(save_kohya(tmp_path / "bad.safetensors", sd))


def with_unknown(sd: dict) -> dict:
    sd = dict(sd)
    for stem in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn3_to_q", "lora_te1_text_model_encoder_layers_99_mlp_fc1"):
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = torch.ones(2, 8), torch.ones(8, 2)
    return sd


def test_names_matching_no_sdxl_layer_are_listed(tmp_path):
    with pytest.raises(LoraBridgeError, match=r"2 module\(s\) match no SDXL layer: .* \(--skip-unknown drops them") as error:
        kohya.read(save_kohya(tmp_path / "bad.safetensors", with_unknown(kohya_state_dict())))
    assert "unet.input_blocks_4_1_transformer_blocks_0_attn3_to_q" in str(error.value)
    assert "text_encoder.text_model_encoder_layers_99_mlp_fc1" in str(error.value)


def test_skip_unknown_drops_them_with_a_warning_and_converts_the_rest(tmp_path):
    src = save_kohya(tmp_path / "bad.safetensors", with_unknown(kohya_state_dict()))
    result = convert(src, tmp_path / "n.safetensors", to="neutral", skip_unknown=True, progress=False)
    assert any("dropped 2 module(s) that match no SDXL layer" in w for w in result.warnings)
    assert set(read_neutral(result.output).modules) == {row[2] for row in NAMES}


FOREIGN = {
    "SD 1.x": {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (640, 768)},
    "SD3": {"lora_unet_joint_blocks_0_x_block_attn_qkv": (4608, 1536), "lora_unet_joint_blocks_0_context_block_mlp_fc1": (6144, 1536),
            "lora_te3_encoder_block_0_layer_0_SelfAttention_q": (4096, 4096)},
}
# The registered architecture a refusal names: SD3's lora_unet_/lora_te3_ keys place best in Flux.1's record
# (same prefixes), which refuses them with the evidence and the hint.
REFUSED_AS = {"SD 1.x": "an SDXL", "SD3": "a Flux.1"}
EVIDENCE = {"SD 1.x": "lora_te.text_model_encoder_layers_0_self_attn_q_proj (component 'lora_te';",
            "SD3": "transformer.joint_blocks_0_x_block_attn_qkv (no such Flux.1 layer)"}


@pytest.mark.parametrize("architecture", FOREIGN)
def test_loras_for_unregistered_architectures_are_refused_with_evidence(tmp_path, architecture):
    sd = {}
    for stem, (out, inp) in FOREIGN[architecture].items():
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = torch.zeros(2, inp), torch.zeros(out, 2)
        sd[f"{stem}.alpha"] = torch.tensor(2.0)
    src = save_kohya(tmp_path / "foreign.safetensors", sd)
    assert kohya.detect(src)
    with pytest.raises(LoraBridgeError, match=rf"not {REFUSED_AS[architecture]} LoRA: .*looks like {architecture}") as error:
        convert(src, tmp_path / "n.safetensors", to="neutral", progress=False)
    assert EVIDENCE[architecture] in str(error.value)
    assert not (tmp_path / "n.safetensors").exists()


def test_an_sd15_unet_lora_in_diffusers_spelling_is_not_sdxl_even_with_skip_unknown(tmp_path):
    """down_blocks.0 has attention in SD 1.x only; down_blocks.1 attn1 layers fit SDXL too (same width)."""
    sd = {}
    for level, width in ((0, 320), (1, 640)):
        stem = f"lora_unet_down_blocks_{level}_attentions_0_transformer_blocks_0_attn1_to_q"
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = torch.zeros(2, width), torch.zeros(width, 2)
    src = save_kohya(tmp_path / "sd15.safetensors", sd)
    with pytest.raises(LoraBridgeError, match=r"not an SDXL LoRA: .*down_blocks_0_attentions_0.*looks like SD 1\.x/2\.x"):
        kohya.read(src, ReadOptions(skip_unknown=True))


def test_detect_leaves_lycoris_files_to_the_lycoris_reader(tmp_path):
    sd = kohya_state_dict()
    sd["lora_unet_conv_in.hada_w1_a"] = torch.zeros(2, 2)
    assert not kohya.detect(save_kohya(tmp_path / "lycoris.safetensors", sd))


def test_cli_neutral2pt_writes_kohya(tmp_path, run_cli):
    neutral = tmp_path / "n.safetensors"
    write_neutral(kohya.read(save_kohya(tmp_path / "src.safetensors", kohya_state_dict())), neutral)
    result = run_cli("neutral2pt", neutral, "--format", "kohya", "-o", tmp_path / "k.safetensors")
    assert result.exit_code == 0, result.output
    assert kohya.detect(tmp_path / "k.safetensors")


def test_cli_refuses_loha_to_kohya_without_bake_in_one_line(tmp_path, run_cli):
    neutral = tmp_path / "n.safetensors"
    write_neutral(loha_model(), neutral)
    result = run_cli("neutral2pt", neutral, "--format", "kohya", "-o", tmp_path / "k.safetensors")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "--bake-to-lora RANK" in result.output
    result = run_cli("neutral2pt", neutral, "--format", "kohya", "-o", tmp_path / "k.safetensors", "--bake-to-lora", "4")
    assert result.exit_code == 0, result.output
    assert "relative error" in result.output


def test_top_level_unet_layers_are_written_with_a_warning_that_diffusers_cannot_load_them(tmp_path):
    src = save_kohya(tmp_path / "src.safetensors", kohya_state_dict())
    neutral = convert(src, tmp_path / "n.safetensors", to="neutral", progress=False).output
    result = convert(neutral, tmp_path / "k.safetensors", to="kohya", progress=False)
    [warning] = [w for w in result.warnings if "outside the down/mid/up blocks" in w]
    assert "4 UNet layer(s)" in warning and "unet.conv_in" in warning and "--format diffusers" in warning


def test_a_kohya_torch_pickle_reads_like_its_safetensors_twin(tmp_path):
    sd = kohya_state_dict()
    torch.save(sd, tmp_path / "lora.pt")
    assert kohya.detect(tmp_path / "lora.pt")
    from_pickle = kohya.read(tmp_path / "lora.pt")
    from_safetensors = kohya.read(save_kohya(tmp_path / "lora.safetensors", sd))
    for name, module in from_safetensors.modules.items():
        assert all(t.same_as(from_pickle.modules[name].tensors[r]) for r, t in module.tensors.items())


def test_nan_factors_warn_and_strict_refuses_them(tmp_path):
    sd = kohya_state_dict()
    sd["lora_unet_out_2.lora_up.weight"][0, 0] = float("nan")
    src = save_kohya(tmp_path / "nan.safetensors", sd)
    with pytest.warns(LoraBridgeWarning, match=r"1 tensor\(s\) hold NaN or Inf values: unet\.conv_out\.lora_B\.weight"):
        kohya.read(src)
    with pytest.raises(LoraBridgeError, match="refused"):
        kohya.read(src, ReadOptions(strict=True))


def test_training_facts_that_are_not_strings_become_json_metadata(tmp_path):
    model = kohya.read(save_kohya(tmp_path / "src.safetensors", kohya_state_dict()))
    model.training = {"learning_rate": 0.0001, "resolution": [1024, 1024], "ss_network_dim": "2"}
    with pytest.warns(LoraBridgeWarning, match="outside the down/mid/up blocks"):
        kohya.write(model, tmp_path / "k.safetensors")
    _, metadata = read_safetensors(tmp_path / "k.safetensors")
    assert (metadata["learning_rate"], metadata["resolution"], metadata["ss_network_dim"]) == ("0.0001", "[1024, 1024]", "2")


@pytest.mark.filterwarnings("ignore:.*outside the down/mid/up blocks")
def test_an_fp8_module_s_alpha_is_written_as_f32_and_its_factors_as_they_are(tmp_path):
    """A module's alpha goes in its own dtype, unless that is FP8: numpy makes no FP8 values (and FP8 holds few)."""
    a, b = Tensor("F8_E4M3", (2, 8), bytes(range(16))), Tensor("F8_E4M3", (8, 2), bytes(range(16, 32)))
    model = LoraModel()
    model.add(LoraModule("unet.conv_in", "lora", {"lora_A.weight": a, "lora_B.weight": b}, 0.75))
    kohya.write(model, tmp_path / "k.safetensors")
    written, _ = read_safetensors(tmp_path / "k.safetensors")
    alpha = written["lora_unet_input_blocks_0_0.alpha"]
    assert alpha.dtype == "F32" and alpha.to_numpy().item() == 0.75
    assert written["lora_unet_input_blocks_0_0.lora_down.weight"].same_as(a) and written["lora_unet_input_blocks_0_0.lora_up.weight"].same_as(b)
