"""MindONE LoRA files <-> the neutral model: names, pairing, alpha, round trips, commands, bad input.

These tests need no MindSpore: files are written with lorabridge's own .ckpt writer (byte-identical
to mindspore.save_checkpoint, proven in test_ms_ckpt_mindspore.py). test_mindone_mindspore.py
repeats the key checks on files written and read by real MindSpore and mindone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorabridge.converters import convert
from lorabridge.converters.mindspore import ms2neutral, neutral2ms
from lorabridge.errors import LoraBridgeError
from lorabridge.formats.contract import ReadOptions
from lorabridge.formats.mindone import MINDONE_DIFFUSERS, MINDONE_KOHYA, MINDONE_SGM
from lorabridge.formats.neutral import read_neutral, write_neutral
from lorabridge.io.ms_ckpt import read_ms_checkpoint
from lorabridge.io.ms_safetensors import read_ms_safetensors
from lorabridge.tensor import Tensor
from tests.fixtures.core import make_lora_model
from tests.fixtures.kohya_file import KOHYA_TRAINING_METADATA, TE2_QKV_RANKS, kohya_sdxl_lora, write_kohya
from tests.fixtures.mindone import (OPENCLIP, SGM_UNET, expected_unet_name, sgm_attention_lora, sgm_text_encoder_lora,
                                    tiny_text, tiny_widths, write_ckpt)

A, B = "lora_A.weight", "lora_B.weight"


def same_file_tensors(left, right) -> None:
    """Two .ckpt files hold the same tags in the same order, with equal dtypes, shapes and bytes."""
    (lt, lm), (rt, rm) = read_ms_checkpoint(left), read_ms_checkpoint(right)
    assert list(lt) == list(rt)
    assert all(lt[k].same_as(rt[k]) for k in lt)
    assert lm == rm


@pytest.fixture
def sdxl_ckpt(tmp_path):
    """MindONE's default SDXL LoRA at SDXL-base shapes: 560 attention modules, 1120 tensors."""
    return write_ckpt(sgm_attention_lora(rank=4), tmp_path / "sdxl_lora.ckpt")


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A MindONE SGM LoRA at the tiny pipeline's widths, UNet attention plus both text encoders."""
    arrays = {**sgm_attention_lora(widths=tiny_widths()), **sgm_text_encoder_lora(text=tiny_text())}
    return write_ckpt(arrays, tmp_path / "tiny_lora.ckpt")


# ---- reading the SGM naming ----------------------------------------------------------------------

def test_sgm_unet_names_map_to_the_diffusers_modules_of_mindones_pairing_list(sdxl_ckpt):
    arrays = sgm_attention_lora(rank=4)
    model = MINDONE_SGM.read(sdxl_ckpt)
    assert len(model.modules) == 560 and model.components == ["unet"]
    for key, array in arrays.items():
        module = model.modules[expected_unet_name(key)]
        assert np.array_equal(module.tensors[A if key.endswith("lora_A.weight") else B].to_numpy(), array)
    # spot checks straight from MindONE's ms_lora_params.txt / pt_lora_params_ordered.txt
    assert model.modules["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"].in_features == 2048
    assert model.modules["unet.up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_out.0"].out_features == 1280
    assert model.modules["unet.mid_block.attentions.0.transformer_blocks.9.attn2.to_v"].weight_shape == (1280, 2048)


def test_alpha_is_assumed_to_be_the_rank_unless_given(sdxl_ckpt):
    assumed = MINDONE_SGM.read(sdxl_ckpt)
    assert {(m.alpha, m.alpha_source) for m in assumed.modules.values()} == {(4.0, "assumed")}
    given = MINDONE_SGM.read(sdxl_ckpt, ReadOptions(alpha=8))
    assert {(m.alpha, m.alpha_source) for m in given.modules.values()} == {(8.0, "user")}


def test_fused_openclip_in_proj_splits_exactly_into_q_k_v(tiny_ckpt):
    tensors, _ = read_ms_checkpoint(tiny_ckpt)
    model = MINDONE_SGM.read(tiny_ckpt)
    fused = f"{OPENCLIP}1.attn.in_proj"
    a, b = tensors[f"{fused}.lora_A.weight"].to_numpy(), tensors[f"{fused}.lora_B.weight"].to_numpy()
    fused_delta = b @ a  # alpha = rank: scale 1
    layer = "text_encoder_2.text_model.encoder.layers.1.self_attn"
    parts = [model.modules[f"{layer}.{p}_proj"] for p in "qkv"]
    assert np.array_equal(np.concatenate([p.delta_weight() for p in parts]), fused_delta)
    assert all(p.rank == 4 and p.alpha == 4 for p in parts)
    assert model.modules["text_encoder_2.text_model.encoder.layers.1.mlp.fc1"].out_features == tiny_text()["text_encoder_2"][2]
    assert model.modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].component == "text_encoder"


# ---- round trips -------------------------------------------------------------------------------

def test_ms_to_neutral_to_ms_is_byte_identical_at_full_sdxl_size(sdxl_ckpt, tmp_path):
    neutral = ms2neutral(sdxl_ckpt, tmp_path / "n.safetensors", progress=False)
    assert neutral.model.summary()["tensors"] == 1120
    back = neutral2ms(neutral.output, tmp_path / "back.ckpt", progress=False)
    assert back.output.read_bytes() == sdxl_ckpt.read_bytes()


def test_round_trip_with_text_encoders_merges_in_proj_back_byte_identically(tiny_ckpt, tmp_path):
    neutral = ms2neutral(tiny_ckpt, tmp_path / "n.safetensors", progress=False).output
    back = neutral2ms(neutral, tmp_path / "back.ckpt", progress=False).output
    assert back.read_bytes() == tiny_ckpt.read_bytes()


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_round_trip_keeps_half_precision_bits(tmp_path, dtype):
    arrays = sgm_attention_lora(widths=tiny_widths())
    src = tmp_path / "half.ckpt"
    from lorabridge.io.ms_ckpt import write_ms_checkpoint

    write_ms_checkpoint(src, {k: Tensor.from_numpy(v, dtype) for k, v in arrays.items()})
    neutral = ms2neutral(src, tmp_path / "n.safetensors", progress=False).output
    assert {t.dtype for t in read_neutral(neutral).tensors().values()} == {dtype}
    assert neutral2ms(neutral, tmp_path / "back.ckpt", progress=False).output.read_bytes() == src.read_bytes()


def test_crc_and_str_entries_survive_a_round_trip(tmp_path):
    src = write_ckpt(sgm_attention_lora(widths=tiny_widths()), tmp_path / "crc.ckpt", metadata={"note": "MindONE run 7"},
                     crc=True)
    neutral = ms2neutral(src, tmp_path / "n.safetensors", progress=False).output
    back = neutral2ms(neutral, tmp_path / "back.ckpt", crc=True, progress=False).output
    assert back.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("naming,container", [("mindone-diffusers", "ckpt"), ("mindone-diffusers", "safetensors"),
                                              ("mindone-kohya", "ckpt"), ("mindone-sgm", "safetensors")])
def test_every_naming_and_container_round_trips_through_neutral(tiny_ckpt, tmp_path, naming, container):
    neutral = ms2neutral(tiny_ckpt, tmp_path / "n.safetensors", alpha=4, progress=False).output
    written = neutral2ms(neutral, tmp_path / f"out.{container}", naming=naming, container=container, progress=False)
    assert written.target_format == naming
    again = ms2neutral(written.output, tmp_path / "again.safetensors", alpha=4, progress=False)
    assert again.source_format == naming
    first, second = read_neutral(neutral), read_neutral(again.output)
    assert set(first.modules) == set(second.modules)  # (MindSpore's safetensors layout sorts keys)
    for name, module in first.modules.items():
        other = second.modules[name]
        assert all(module.tensors[r].same_as(other.tensors[r]) for r in (A, B)) and module.alpha == other.alpha


def test_mindone_diffusers_keys_are_peft_names_with_component_prefix(tiny_ckpt, tmp_path):
    neutral = ms2neutral(tiny_ckpt, tmp_path / "n.safetensors", progress=False).output
    out = neutral2ms(neutral, tmp_path / "peft.ckpt", naming="mindone-diffusers", progress=False).output
    tensors, _ = read_ms_checkpoint(out)
    assert set(tensors) == set(read_neutral(neutral).tensors())


def test_mindone_diffusers_safetensors_carries_alpha_in_adapter_metadata(tmp_path):
    model = make_lora_model(rank=4, alpha=8.0)
    neutral = tmp_path / "n.safetensors"
    write_neutral(model, neutral)
    out = neutral2ms(neutral, tmp_path / "o.safetensors", naming="mindone-diffusers", container="safetensors",
                     progress=False)
    assert out.warnings == []  # alpha stored, nothing folded
    tensors, metadata = read_ms_safetensors(out.output)
    assert metadata["format"] == "ms"
    assert json.loads(metadata["lora_adapter_metadata"])["unet.lora_alpha"] == 8.0
    back = MINDONE_DIFFUSERS.read(out.output)
    assert {(m.alpha, m.alpha_source) for m in back.modules.values()} == {(8.0, "stored")}


def test_kohya_port_files_keep_their_stored_alpha(tmp_path):
    rng = np.random.default_rng(0)
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    tensors = {f"{stem}.lora_down.weight": Tensor.from_numpy(rng.standard_normal((8, 640)).astype("f4")),
               f"{stem}.lora_up.weight": Tensor.from_numpy(rng.standard_normal((640, 8)).astype("f4")),
               f"{stem}.alpha": Tensor.from_numpy(np.array(1.0, "f4"))}
    from lorabridge.io.ms_ckpt import write_ms_checkpoint

    write_ms_checkpoint(tmp_path / "kohya.ckpt", tensors)
    with pytest.warns(UserWarning, match="stores alpha for 1 module"):
        model = MINDONE_KOHYA.read(tmp_path / "kohya.ckpt", ReadOptions(alpha=8))  # a stored alpha wins over --alpha
    (module,) = model.modules.values()
    assert module.name == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert (module.rank, module.alpha, module.alpha_source) == (8, 1.0, "stored")
    neutral = ms2neutral(tmp_path / "kohya.ckpt", tmp_path / "n.safetensors", progress=False).output
    back = neutral2ms(neutral, tmp_path / "back.ckpt", naming="mindone-kohya", progress=False).output
    assert back.read_bytes() == (tmp_path / "kohya.ckpt").read_bytes()


# ---- alpha on the way back: MindONE files carry none -------------------------------------------

def test_alpha_other_than_rank_is_folded_into_lora_b_keeping_delta_w(tmp_path):
    model = make_lora_model({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (640, 640)}, rank=4, alpha=8.0)
    neutral = tmp_path / "n.safetensors"
    write_neutral(model, neutral)
    result = neutral2ms(neutral, tmp_path / "o.ckpt", progress=False)
    assert any("folded alpha/rank into lora_B" in w for w in result.warnings)
    (module,) = MINDONE_SGM.read(result.output).modules.values()  # read back with MindONE's alpha = rank
    (original,) = model.modules.values()
    np.testing.assert_allclose(module.delta_weight(), original.delta_weight(), rtol=1e-6)
    kept = neutral2ms(neutral, tmp_path / "kept.ckpt", fold_alpha=False, progress=False)
    assert any("load them with lora_alpha" in w for w in kept.warnings)
    (unfolded,) = MINDONE_SGM.read(kept.output, ReadOptions(alpha=8)).modules.values()
    assert unfolded.tensors[B].same_as(original.tensors[B])


def test_q_k_v_with_their_own_a_merge_into_a_wider_in_proj_with_the_same_delta_w(tmp_path):
    layer = "text_encoder_2.text_model.encoder.layers.0.self_attn"
    model = make_lora_model({f"{layer}.q_proj": (1280, 1280), f"{layer}.v_proj": (1280, 1280)}, rank=4, alpha=4.0)
    neutral = tmp_path / "n.safetensors"
    write_neutral(model, neutral)
    out = neutral2ms(neutral, tmp_path / "o.ckpt", progress=False).output
    tensors, _ = read_ms_checkpoint(out)
    fused = f"{OPENCLIP}0.attn.in_proj"
    assert list(tensors) == [f"{fused}.lora_A.weight", f"{fused}.lora_B.weight"]
    back = MINDONE_SGM.read(out)  # rank 12 = q, k (B = 0) and v of rank 4; alpha/rank stays 1, MindONE's default
    assert tensors[f"{fused}.lora_A.weight"].shape == (12, 1280) and tensors[f"{fused}.lora_B.weight"].shape == (3840, 12)
    for proj in ("q_proj", "v_proj"):
        np.testing.assert_allclose(back.modules[f"{layer}.{proj}"].delta_weight(),
                                   model.modules[f"{layer}.{proj}"].delta_weight(), rtol=1e-5, atol=1e-6)
    assert not back.modules[f"{layer}.k_proj"].delta_weight().any()


@pytest.fixture
def kohya_neutral(tmp_path):
    """A kohya SDXL LoRA at the tiny widths (bigG q/k/v at ranks 4/8/2, alpha = rank, kohya's training
    metadata), converted to a neutral file."""
    src = write_kohya(kohya_sdxl_lora(tiny_widths(), tiny_text()), tmp_path / "kohya.safetensors")
    return convert(src, tmp_path / "kohya_neutral.safetensors", to="neutral", progress=False).output


def test_kohya_q_k_v_of_their_own_ranks_come_back_from_mindone_bit_exact(kohya_neutral, tmp_path):
    ckpt = neutral2ms(kohya_neutral, tmp_path / "sgm.ckpt", progress=False).output
    tensors, _ = read_ms_checkpoint(ckpt)
    assert tensors[f"{OPENCLIP}0.attn.in_proj.lora_A.weight"].shape[0] == sum(TE2_QKV_RANKS.values())  # block-diagonal
    back = read_neutral(ms2neutral(ckpt, tmp_path / "back.safetensors", progress=False).output)
    first = read_neutral(kohya_neutral)
    assert set(back.modules) == set(first.modules)
    for name, module in first.modules.items():
        again = back.modules[name]
        assert (again.rank, again.alpha) == (module.rank, module.alpha), name
        assert all(again.tensors[r].same_as(module.tensors[r]) for r in (A, B)), name
    ranks = {n.rsplit(".", 1)[1]: m.rank for n, m in back.modules.items() if ".layers.1.self_attn." in n and "text_encoder_2" in n}
    assert ranks == {**TE2_QKV_RANKS, "out_proj": 4}


def test_sgm_output_says_which_modules_mindones_sdxl_lora_model_drops(kohya_neutral, tmp_path):
    result = neutral2ms(kohya_neutral, tmp_path / "sgm.ckpt", progress=False)
    (note,) = [w for w in result.warnings if "no LoRA layer in MindONE's SDXL LoRA model" in w]
    # bigG q/k/v (fused into attn.in_proj, a bare parameter there) and both MLPs; UNet and CLIP-L attention load
    assert "5 module(s)" in note and "text_encoder_2 attn.in_proj x2" in note and "text_encoder_2 mlp.c_fc x2" in note
    assert "text_encoder mlp.fc1 x1" in note and "--naming mindone-diffusers keeps them effective" in note
    assert read_ms_checkpoint(result.output)[0].keys() >= {f"{OPENCLIP}0.attn.in_proj.lora_A.weight"}  # still written
    other = neutral2ms(kohya_neutral, tmp_path / "peft.ckpt", naming="mindone-diffusers", progress=False)
    assert not any("no LoRA layer" in w for w in other.warnings)
    unet_only = write_ckpt(sgm_attention_lora(widths=tiny_widths()), tmp_path / "unet.ckpt")
    neutral = ms2neutral(unet_only, tmp_path / "unet.safetensors", progress=False).output
    assert not any("no LoRA layer" in w for w in neutral2ms(neutral, tmp_path / "u.ckpt", progress=False).warnings)


@pytest.mark.parametrize("naming", ["mindone-sgm", "mindone-diffusers", "mindone-kohya"])
def test_mindspore_safetensors_keep_the_training_metadata(kohya_neutral, tmp_path, naming):
    out = neutral2ms(kohya_neutral, tmp_path / "ms.safetensors", naming=naming, container="safetensors", progress=False)
    assert not any("training metadata" in w for w in out.warnings)
    _, metadata = read_ms_safetensors(out.output)
    assert metadata["format"] == "ms" and metadata["ss_tag_frequency"] == KOHYA_TRAINING_METADATA["ss_tag_frequency"]
    back = ms2neutral(out.output, tmp_path / "back.safetensors", progress=False).output
    assert read_neutral(back).training == KOHYA_TRAINING_METADATA


def test_a_ckpt_output_says_the_training_metadata_is_lost(kohya_neutral, tmp_path, run_cli):
    result = run_cli("neutral2ms", kohya_neutral, "-o", tmp_path / "out.ckpt")
    assert result.exit_code == 0, result.output
    (line,) = [w for w in result.output.splitlines() if "training metadata" in w]
    assert line.startswith(f"warning: {tmp_path / 'out.ckpt'}: {len(KOHYA_TRAINING_METADATA)} training metadata field(s) (")
    assert "(+35 more)) not written" in line and line.endswith("--format safetensors keeps them")
    _, strings = read_ms_checkpoint(tmp_path / "out.ckpt")
    assert strings == {}


def test_str_entries_survive_a_trip_through_a_pytorch_format(tmp_path):
    src = write_ckpt(sgm_attention_lora(widths=tiny_widths()), tmp_path / "src.ckpt", metadata={"note": "MindONE run 7"})
    neutral = ms2neutral(src, tmp_path / "n.safetensors", progress=False).output
    diffusers = convert(neutral, tmp_path / "d.safetensors", to="diffusers", progress=False).output  # strings as JSON
    again = convert(diffusers, tmp_path / "n2.safetensors", to="neutral", progress=False).output
    back = neutral2ms(again, tmp_path / "back.ckpt", progress=False)
    assert read_ms_checkpoint(back.output)[1] == {"note": "MindONE run 7"}
    assert not any("training metadata" in w for w in back.warnings)


def test_loha_and_dora_modules_are_refused_with_their_names(tmp_path):
    model = make_lora_model({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (640, 640)})
    module = model.modules["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    module.tensors["dora_scale"] = Tensor.from_numpy(np.ones((640, 1), "f4"))
    module.dora_axis = "out"
    neutral = tmp_path / "n.safetensors"
    write_neutral(model, neutral)
    with pytest.raises(LoraBridgeError, match="attn1.to_q"):
        neutral2ms(neutral, tmp_path / "o.ckpt", progress=False)
    assert not (tmp_path / "o.ckpt").exists()


# ---- by name, never by position; unknown and extra tensors -------------------------------------

def test_pairing_is_by_name_whatever_the_tensor_order(tmp_path):
    arrays = sgm_attention_lora(widths=tiny_widths())
    shuffled = dict(sorted(arrays.items(), key=lambda kv: hash(kv[0]) % 997))
    straight = MINDONE_SGM.read(write_ckpt(arrays, tmp_path / "a.ckpt"))
    mixed = MINDONE_SGM.read(write_ckpt(shuffled, tmp_path / "b.ckpt"))
    for name, module in straight.modules.items():
        assert all(module.tensors[r].same_as(mixed.modules[name].tensors[r]) for r in (A, B))


def test_names_that_match_no_sdxl_module_are_listed_or_skipped(tmp_path):
    arrays = sgm_attention_lora(widths=tiny_widths())
    bogus = f"{SGM_UNET}input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # level 0 of SDXL has no attention
    arrays[f"{bogus}.lora_A.weight"], arrays[f"{bogus}.lora_B.weight"] = np.ones((4, 32), "f4"), np.ones((32, 4), "f4")
    path = write_ckpt(arrays, tmp_path / "odd.ckpt")
    with pytest.raises(LoraBridgeError, match=r"2 LoRA tensor\(s\) name no SDXL-base module.*input_blocks\.1\.1"):
        MINDONE_SGM.read(path)
    with pytest.warns(UserWarning, match="dropped 2 LoRA tensor"):
        model = MINDONE_SGM.read(path, ReadOptions(skip_unknown=True))
    assert len(model.modules) == 560


def test_a_full_checkpoint_yields_its_lora_tensors_and_counts_the_rest(tmp_path):
    arrays = {f"{SGM_UNET}input_blocks.0.0.weight": np.zeros((32, 4, 3, 3), "f4"),
              **sgm_attention_lora(widths=tiny_widths()),
              "adam_m.model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.lora_A.weight": np.zeros((4, 64), "f4"),
              "global_step": np.array([10], "i4")}
    result = ms2neutral(write_ckpt(arrays, tmp_path / "full.ckpt"), tmp_path / "n.safetensors", progress=False)
    assert result.model.summary()["tensors"] == 1120
    assert any("ignored 3 non-LoRA tensor(s)" in w for w in result.warnings)


@pytest.mark.parametrize("change,message", [
    (lambda a, k: a.pop(f"{k}.lora_B.weight"), r" has lora_A.weight but no lora_B.weight"),
    (lambda a, k: a.__setitem__(f"{k}.lora_B.weight", np.ones((64, 3), "f4")), r": rank mismatch, lora_A is \[4, \d+\] but lora_B is \[64, 3\]"),
])
def test_broken_pairs_are_named(tmp_path, change, message):
    arrays = sgm_attention_lora(widths=tiny_widths())
    key = f"{SGM_UNET}middle_block.1.transformer_blocks.3.attn2.to_k"
    change(arrays, key)
    with pytest.raises(LoraBridgeError, match=rf"broken LoRA module\(s\): unet\.mid_block\.attentions\.0\.transformer_blocks\.3\.attn2\.to_k{message}"):
        MINDONE_SGM.read(write_ckpt(arrays, tmp_path / "broken.ckpt"))


def test_full_size_files_must_have_sdxl_base_shapes_everywhere(tmp_path):
    arrays = sgm_attention_lora()
    key = f"{SGM_UNET}input_blocks.4.1.transformer_blocks.0.attn2.to_k"
    arrays[f"{key}.lora_A.weight"] = np.ones((4, 768), "f4")  # SD 1.5's cross-attention width
    with pytest.raises(LoraBridgeError, match=r"not an SDXL LoRA: .*attn2.to_k adapts a \[640, 768\] weight"):
        MINDONE_SGM.read(write_ckpt(arrays, tmp_path / "sd15ish.ckpt"))


def test_detection_picks_the_naming_from_the_keys(tmp_path, tiny_ckpt):
    neutral = ms2neutral(tiny_ckpt, tmp_path / "n.safetensors", progress=False).output
    for naming, fmt in (("mindone-diffusers", MINDONE_DIFFUSERS), ("mindone-kohya", MINDONE_KOHYA)):
        out = neutral2ms(neutral, tmp_path / f"{naming}.ckpt", naming=naming, progress=False).output
        assert [f.detect(out) for f in (MINDONE_SGM, MINDONE_DIFFUSERS, MINDONE_KOHYA)] == [f is fmt for f in
                                                                                              (MINDONE_SGM, MINDONE_DIFFUSERS, MINDONE_KOHYA)]
    assert not MINDONE_DIFFUSERS.detect(neutral)  # a neutral (format "pt") file is not a MindSpore file


def test_generic_convert_reaches_mindone_formats(tiny_ckpt, tmp_path):
    out = convert(tiny_ckpt, tmp_path / "k.safetensors", to="mindone-kohya", progress=False)
    assert out.source_format == "mindone-sgm"
    tensors, metadata = read_ms_safetensors(out.output)  # container chosen by the suffix
    assert metadata["format"] == "ms" and all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in tensors)


# ---- the commands ------------------------------------------------------------------------------

def test_ms2neutral_writes_beside_the_input_and_prints_a_summary(run_cli, sdxl_ckpt):
    result = run_cli("ms2neutral", sdxl_ckpt)
    assert result.exit_code == 0, result.output
    out = sdxl_ckpt.with_suffix(".safetensors")
    assert out.is_file()
    assert "mindone-sgm -> neutral" in result.output and "unet 560" in result.output
    assert "rank     4 (560 modules)" in result.output and "source: assumed 560" in result.output
    manifest_alpha = {m.alpha_source for m in read_neutral(out).modules.values()}
    assert manifest_alpha == {"assumed"}
    again = run_cli("ms2neutral", sdxl_ckpt)
    assert again.exit_code == 1 and "output exists; pass --force" in again.output
    assert run_cli("ms2neutral", sdxl_ckpt, "--force", "--alpha", "8").exit_code == 0
    assert {m.alpha for m in read_neutral(out).modules.values()} == {8.0}


def test_help_states_the_alpha_default(run_cli):
    text = " ".join(run_cli("ms2neutral", "--help").output.split())
    assert "alpha = rank (MindONE's default), recorded in the manifest as 'assumed'" in text


def test_neutral2ms_command_with_all_options(run_cli, tiny_ckpt, tmp_path):
    neutral = tmp_path / "n.safetensors"
    assert run_cli("ms2neutral", tiny_ckpt, "-o", neutral).exit_code == 0
    result = run_cli("neutral2ms", neutral, "--naming", "mindone-sgm", "--format", "ckpt", "--crc")
    assert result.exit_code == 0, result.output
    assert "neutral -> mindone-sgm" in result.output
    _, _ = read_ms_checkpoint(neutral.with_suffix(".ckpt"))  # the CRC trailer verifies
    result = run_cli("neutral2ms", neutral, "--naming", "mindone-diffusers", "--format", "safetensors")
    assert result.exit_code == 0 and (tmp_path / "n_ms.safetensors").is_file()


def test_ms2neutral_explains_what_a_non_mindone_file_is(run_cli, tmp_path, neutral_file):
    result = run_cli("ms2neutral", neutral_file, "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 1 and "already a neutral LoRA file" in result.output
    from safetensors.numpy import save_file

    save_file({"unet.conv_in.lora_A.weight": np.zeros((4, 4, 3, 3), "f4")}, tmp_path / "pt.safetensors", {"format": "pt"})
    result = run_cli("ms2neutral", tmp_path / "pt.safetensors", "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 1 and "format='pt', not one written by MindSpore/MindONE" in result.output
    empty = write_ckpt({"model.diffusion_model.out.2.weight": np.zeros((4, 4), "f4")}, tmp_path / "base.ckpt")
    result = run_cli("ms2neutral", empty, "-o", tmp_path / "y.safetensors")
    assert result.exit_code == 1 and "no LoRA tensor in any MindONE naming" in result.output
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
