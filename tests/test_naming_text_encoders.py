"""SDXL text encoders: MindONE/SGM <-> diffusers names and the exact fused-qkv LoRA split and merge."""

from __future__ import annotations

import numpy as np
import pytest

from lorabridge.architectures.fused import merge_fused, split_fused
from lorabridge.architectures.sdxl import SDXL
from lorabridge.architectures.sdxl.text_encoders import diffusers_text_to_sgm, sgm_text_to_diffusers
from lorabridge.errors import LoraBridgeError
from lorabridge.model import LoraModule
from lorabridge.tensor import Tensor

sdxl_modules = SDXL.modules


BIGG = "conditioner.embedders.1.model."
CLIPL = "conditioner.embedders.0.transformer."
LAYER = "text_encoder_2.text_model.encoder.layers.3.self_attn."
QKV = (LAYER + "q_proj", LAYER + "k_proj", LAYER + "v_proj")
IN_PROJ = "transformer.resblocks.3.attn.in_proj"  # the fused layer's path inside the OpenCLIP model
FUSED = BIGG + IN_PROJ


@pytest.mark.parametrize(("sgm", "component", "path"), [
    (CLIPL + "text_model.encoder.layers.0.self_attn.q_proj", "text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
    (CLIPL + "text_model.encoder.layers.11.mlp.fc2", "text_encoder", "text_model.encoder.layers.11.mlp.fc2"),
    (CLIPL + "text_model.final_layer_norm", "text_encoder", "text_model.final_layer_norm"),
    (BIGG + "transformer.resblocks.0.attn.out_proj", "text_encoder_2", "text_model.encoder.layers.0.self_attn.out_proj"),
    (BIGG + "transformer.resblocks.31.mlp.c_fc", "text_encoder_2", "text_model.encoder.layers.31.mlp.fc1"),
    (BIGG + "transformer.resblocks.7.mlp.c_proj", "text_encoder_2", "text_model.encoder.layers.7.mlp.fc2"),
    (BIGG + "transformer.resblocks.7.ln_1", "text_encoder_2", "text_model.encoder.layers.7.layer_norm1"),
    (BIGG + "transformer.resblocks.7.ln_2", "text_encoder_2", "text_model.encoder.layers.7.layer_norm2"),
    (BIGG + "ln_final", "text_encoder_2", "text_model.final_layer_norm"),
    (BIGG + "token_embedding", "text_encoder_2", "text_model.embeddings.token_embedding"),
])
def test_text_encoder_names_map_both_ways(sgm, component, path):
    assert sgm_text_to_diffusers(sgm) == (component, path)
    assert diffusers_text_to_sgm(component, path) == sgm


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2"])
def test_every_mappable_text_encoder_module_round_trips(component):
    mapped = 0
    for path in sdxl_modules(component):
        sgm = diffusers_text_to_sgm(component, path)
        fused = SDXL.fused_name(component, path)
        if sgm is not None:
            assert sgm_text_to_diffusers(sgm) == (component, path)
            mapped += 1
        elif fused is not None:
            assert SDXL.fused_parts(fused[0])[1][fused[1]] == path
        else:
            # Bare parameters in OpenCLIP, not modules: nothing a LoRA can target there.
            assert (component, path) in {("text_encoder_2", "text_model.embeddings.position_embedding"),
                                         ("text_encoder_2", "text_projection")}
    assert mapped == len(sdxl_modules(component)) - (0 if component == "text_encoder" else 2 + 32 * 3)


def test_fused_in_proj_stands_for_q_k_v_in_row_order():
    component, paths = SDXL.fused_parts(IN_PROJ)
    assert component == "text_encoder_2"
    assert paths == tuple(q.removeprefix("text_encoder_2.") for q in QKV)
    assert [SDXL.fused_name(component, p) for p in paths] == [(IN_PROJ, 0), (IN_PROJ, 1), (IN_PROJ, 2)]
    assert SDXL.fused_parts(FUSED) is None  # names are paths inside the component
    assert sgm_text_to_diffusers(FUSED) is None


@pytest.mark.parametrize("name", [
    BIGG + "transformer.resblocks.32.attn.out_proj",  # bigG has 32 layers
    BIGG + "transformer.resblocks.0.attn",
    BIGG + "positional_embedding",
    CLIPL + "text_model.encoder.layers.12.mlp.fc1",
    "conditioner.embedders.2.transformer.text_model.encoder.layers.0.mlp.fc1",
    "model.diffusion_model.input_blocks.4.1.proj_in",
])
def test_names_of_no_text_encoder_module_map_to_none(name):
    assert sgm_text_to_diffusers(name) is None
    assert SDXL.fused_parts(name) is None


def _lora(name, out, inp, rank, alpha, rng, dtype="F32", source="stored"):
    a = rng.standard_normal((rank, inp)).astype(np.float32)
    b = rng.standard_normal((out, rank)).astype(np.float32)
    return LoraModule(name, "lora", {"lora_A.weight": Tensor.from_numpy(a, dtype), "lora_B.weight": Tensor.from_numpy(b, dtype)},
                      alpha=alpha, alpha_source=source)


def _delta(module: LoraModule) -> np.ndarray:
    """alpha/r * B @ A, computed here from the raw tensors (not with lorabridge.deltas)."""
    a = module.tensors["lora_A.weight"].to_float32()
    b = module.tensors["lora_B.weight"].to_float32()
    return (module.alpha / a.shape[0]) * (b @ a)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_split_gives_each_projection_its_row_block_of_the_fused_delta_exactly(dtype):
    fused = _lora(FUSED, 3 * 24, 24, 4, 8.0, np.random.default_rng(0), dtype)
    parts = split_fused(fused, QKV)
    whole = _delta(fused)
    for i, part in enumerate(parts):
        assert part.name == QKV[i] and part.rank == 4 and part.alpha == 8.0
        assert part.tensors["lora_A.weight"].same_as(fused.tensors["lora_A.weight"])
        b_rows = fused.tensors["lora_B.weight"].to_numpy()[24 * i:24 * (i + 1)]
        assert part.tensors["lora_B.weight"].dtype == dtype
        np.testing.assert_array_equal(part.tensors["lora_B.weight"].to_numpy(), b_rows)
        np.testing.assert_array_equal(_delta(part), whole[24 * i:24 * (i + 1)])


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_fused_split_fused_is_bit_exact(dtype):
    fused = _lora(FUSED, 3 * 24, 24, 4, 3.0, np.random.default_rng(1), dtype, source="assumed")
    again = merge_fused(tuple(split_fused(fused, QKV)), FUSED)
    assert again.name == FUSED and again.alpha == fused.alpha and again.alpha_source == "assumed"
    for role, tensor in fused.tensors.items():
        assert again.tensors[role].same_as(tensor)


def test_independent_q_k_v_merge_block_diagonally_with_delta_kept():
    rng = np.random.default_rng(2)
    q, k, v = (_lora(n, 24, 16, r, alpha, rng) for n, r, alpha in zip(QKV, (4, 2, 8), (4.0, 2.0, 8.0)))
    fused = merge_fused((q, k, v), FUSED)
    assert fused.rank == 14 and fused.alpha / fused.rank == q.alpha / q.rank
    assert fused.tensors["lora_A.weight"].shape == (14, 16) and fused.tensors["lora_B.weight"].shape == (72, 14)
    np.testing.assert_allclose(_delta(fused), np.concatenate([_delta(q), _delta(k), _delta(v)]), rtol=1e-6, atol=1e-6)
    # Splitting that again reproduces each delta (the other blocks of B are zero).
    for part, original in zip(split_fused(fused, QKV), (q, k, v)):
        np.testing.assert_allclose(_delta(part), _delta(original), rtol=1e-6, atol=1e-6)


def test_merge_folds_differing_scales_into_b():
    rng = np.random.default_rng(3)
    q, k, v = (_lora(n, 8, 8, 4, alpha, rng, source=s) for n, alpha, s in zip(QKV, (4.0, 1.0, 16.0), ("stored", "user", "stored")))
    fused = merge_fused((q, k, v), FUSED)
    assert fused.scale == q.scale and fused.alpha_source == "user"
    np.testing.assert_allclose(_delta(fused), np.concatenate([_delta(q), _delta(k), _delta(v)]), rtol=1e-6, atol=1e-6)


def test_shared_a_with_different_alphas_is_not_merged_as_shared():
    fused = _lora(FUSED, 3 * 8, 8, 2, 2.0, np.random.default_rng(4))
    q, k, v = split_fused(fused, QKV)
    k.alpha = 4.0
    merged = merge_fused((q, k, v), FUSED)
    assert merged.rank == 6
    np.testing.assert_allclose(_delta(merged), np.concatenate([_delta(q), _delta(k), _delta(v)]), rtol=1e-6, atol=1e-6)


def test_dora_magnitude_per_output_row_splits_and_merges_with_b():
    fused = _lora(FUSED, 3 * 8, 8, 2, 2.0, np.random.default_rng(5))
    fused.tensors["dora_scale"] = Tensor.from_numpy(np.arange(24, dtype=np.float32).reshape(24, 1))
    fused.dora_axis = "out"
    parts = split_fused(fused, QKV)
    assert [p.tensors["dora_scale"].to_numpy()[0, 0] for p in parts] == [0, 8, 16]
    assert merge_fused(tuple(parts), FUSED).tensors["dora_scale"].same_as(fused.tensors["dora_scale"])


def test_dora_magnitude_per_input_column_cannot_be_split():
    fused = _lora(FUSED, 3 * 8, 8, 2, 2.0, np.random.default_rng(6))
    fused.tensors["dora_scale"] = Tensor.from_numpy(np.ones((1, 8), np.float32))
    fused.dora_axis = "in"
    with pytest.raises(LoraBridgeError, match="per input column"):
        split_fused(fused, QKV)


def test_fused_b_rows_must_split_in_three():
    with pytest.raises(LoraBridgeError, match="not divisible by 3"):
        split_fused(_lora(FUSED, 25, 8, 2, 2.0, np.random.default_rng(7)), QKV)


def test_merge_refuses_mismatched_inputs():
    rng = np.random.default_rng(8)
    q, k, v = _lora(QKV[0], 8, 8, 2, 2.0, rng), _lora(QKV[1], 8, 16, 2, 2.0, rng), _lora(QKV[2], 8, 8, 2, 2.0, rng)
    with pytest.raises(LoraBridgeError, match="different input sizes"):
        merge_fused((q, k, v), FUSED)


def test_merge_of_mixed_dtypes_widens_to_float32_exactly():
    rng = np.random.default_rng(9)
    q, k, v = (_lora(n, 8, 8, 2, 2.0, rng, dtype) for n, dtype in zip(QKV, ("F16", "BF16", "F16")))
    fused = merge_fused((q, k, v), FUSED)
    assert {t.dtype for t in fused.tensors.values()} == {"F32"}
    a = fused.tensors["lora_A.weight"].to_numpy()
    for i, part in enumerate((q, k, v)):  # widening loses nothing
        np.testing.assert_array_equal(a[2 * i:2 * i + 2], part.tensors["lora_A.weight"].to_float32())
    np.testing.assert_allclose(_delta(fused), np.concatenate([_delta(q), _delta(k), _delta(v)]), rtol=1e-6, atol=1e-6)


# ---- ranks of q, k, v with their own A: merged block-diagonally, split back to their own ranks ----------

@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_q_k_v_with_own_ranks_merge_and_split_back_to_the_same_ranks_alphas_and_bytes(dtype):
    rng = np.random.default_rng(10)
    q, k, v = (_lora(n, 24, 16, r, float(r), rng, dtype) for n, r in zip(QKV, (4, 2, 8)))  # alpha = rank: one scale
    fused = merge_fused((q, k, v), FUSED)
    assert fused.rank == 14
    for part, original in zip(split_fused(fused, QKV), (q, k, v)):
        assert (part.rank, part.alpha, part.alpha_source) == (original.rank, original.alpha, original.alpha_source)
        for role, tensor in original.tensors.items():
            assert part.tensors[role].same_as(tensor), (part.name, role)


def test_parts_with_other_scales_come_back_at_their_ranks_with_the_same_delta():
    rng = np.random.default_rng(11)
    q, k, v = (_lora(n, 24, 16, r, 1.0, rng) for n, r in zip(QKV, (4, 2, 8)))  # kohya's usual: one alpha, ranks differ
    for part, original in zip(split_fused(merge_fused((q, k, v), FUSED), QKV), (q, k, v)):
        assert part.rank == original.rank
        np.testing.assert_allclose(_delta(part), _delta(original), rtol=1e-6, atol=1e-7)


def test_a_zero_initialised_fused_lora_keeps_its_rank_and_a():
    fused = _lora(FUSED, 3 * 8, 8, 4, 4.0, np.random.default_rng(12))
    zero_b = Tensor.from_numpy(np.zeros((24, 4), np.float32))
    for b in (zero_b, Tensor.from_numpy(np.concatenate([np.ones((8, 4)), np.zeros((16, 4))]).astype("f4"))):
        fused.tensors["lora_B.weight"] = b  # all B zero (start of training), or only k and v still zero
        for part in split_fused(fused, QKV):
            assert part.rank == 4 and part.alpha == 4.0
            assert part.tensors["lora_A.weight"].same_as(fused.tensors["lora_A.weight"])


def test_parts_sharing_rank_columns_are_not_trimmed():
    b = np.zeros((24, 6), np.float32)
    b[0:8, 0:3], b[8:16, 2:4], b[16:24, 4:6] = 1.0, 2.0, 3.0  # q and k both use column 2: not block-diagonal
    fused = _lora(FUSED, 24, 8, 6, 6.0, np.random.default_rng(13))
    fused.tensors["lora_B.weight"] = Tensor.from_numpy(b)
    assert [p.rank for p in split_fused(fused, QKV)] == [6, 6, 6]


def test_an_all_zero_column_between_blocks_goes_to_the_earlier_part_with_delta_kept():
    b = np.zeros((24, 7), np.float32)
    b[0:8, 0:2], b[8:16, 3:5], b[16:24, 5:7] = 1.0, 2.0, 3.0  # column 2 is zero everywhere
    fused = _lora(FUSED, 24, 8, 7, 7.0, np.random.default_rng(14))
    fused.tensors["lora_B.weight"] = Tensor.from_numpy(b)
    parts = split_fused(fused, QKV)
    assert [p.rank for p in parts] == [3, 2, 2] and [p.alpha for p in parts] == [3.0, 2.0, 2.0]
    whole = _delta(fused)
    for i, part in enumerate(parts):
        np.testing.assert_allclose(_delta(part), whole[8 * i:8 * (i + 1)], rtol=1e-6, atol=1e-7)
