"""Baking LoHa/LoKr into plain LoRA: the best rank-k approximation of delta W, its error reported.

The error of a truncated SVD is known in closed form (Eckart-Young): the norm of the singular
values dropped. Each bake is checked against that bound, computed here from numpy's singular
values of delta W, and against the delta W the written LoRA factors actually give.
"""

from __future__ import annotations

import numpy as np
import pytest

from lorabridge.bake import bake_module, bake_to_lora, lora_only
from lorabridge.errors import LoraBridgeError
from lorabridge.model import LoraModel, LoraModule
from lorabridge.tensor import Tensor
from tests.fixtures.core import make_lora_module

LINEAR = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "unet.down_blocks.1.resnets.0.conv1"


def random_module(name: str, kind: str, shapes: dict, alpha: float = 3.0, dtype: str = "F32", seed: int = 0,
                  dora_axis: str | None = None) -> LoraModule:
    rng = np.random.default_rng(seed)
    tensors = {role: Tensor.from_numpy(rng.standard_normal(shape).astype("f4"), dtype) for role, shape in shapes.items()}
    return LoraModule(name, kind, tensors, alpha, dora_axis=dora_axis)


def loha(rank: int = 2, out: int = 48, inp: int = 40, **kwargs) -> LoraModule:
    return random_module(LINEAR, "loha", {"hada_w1_a": (out, rank), "hada_w1_b": (rank, inp),
                                          "hada_w2_a": (out, rank), "hada_w2_b": (rank, inp)}, **kwargs)


def lokr_conv() -> LoraModule:  # kron((4, 4), (6, 2, 3, 3)): a (24, 8, 3, 3) conv delta
    return random_module(CONV, "lokr", {"lokr_w1": (4, 4), "lokr_w2_a": (6, 2), "lokr_w2_b": (2, 2, 3, 3)})


def eckart_young(delta: np.ndarray, rank: int) -> float:
    s = np.linalg.svd(delta.reshape(delta.shape[0], -1).astype(np.float64), compute_uv=False)
    return float(np.sqrt((s[rank:] ** 2).sum() / (s ** 2).sum()))


@pytest.mark.parametrize("module", [loha(rank=3), lokr_conv(), loha(rank=3, out=9, alpha=-2.0)], ids=["loha", "lokr-conv", "loha-negative-alpha"])
@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_baking_reaches_the_eckart_young_bound_and_reports_the_error_it_has(module, rank):
    baked, report = bake_module(module, rank)
    delta, approx = module.delta_weight(), baked.delta_weight()
    measured = np.linalg.norm(delta - approx) / np.linalg.norm(delta)
    assert report.relative_error == pytest.approx(measured, rel=1e-4, abs=1e-6)
    assert report.relative_error == pytest.approx(eckart_young(delta, rank), rel=1e-3, abs=1e-6)
    assert (baked.kind, baked.rank, baked.alpha, baked.scale) == ("lora", rank, float(rank), 1.0)


def test_tucker_modules_bake_through_a_dense_svd():
    module = random_module(CONV, "loha", {"hada_w1_a": (2, 24), "hada_w1_b": (2, 8), "hada_t1": (2, 2, 3, 3),
                                          "hada_w2_a": (2, 24), "hada_w2_b": (2, 8), "hada_t2": (2, 2, 3, 3)})
    baked, report = bake_module(module, 6)
    assert report.relative_error == pytest.approx(eckart_young(module.delta_weight(), 6), rel=1e-3, abs=1e-6)
    assert baked.tensors["lora_A.weight"].shape == (6, 8, 3, 3)


def test_a_rank_2_loha_bakes_exactly_at_rank_4():
    """(w1a w1b) * (w2a w2b) has rank at most 2 * 2: a rank-4 LoRA holds it exactly."""
    _, report = bake_module(loha(rank=2), 4)
    assert report.relative_error < 1e-5


def test_conv_lokr_bakes_to_a_conv_lora_with_the_kernel_on_lora_a():
    module = lokr_conv()
    baked, report = bake_module(module, 16)  # kron((4, 4), rank-2 (6, 18)) has rank 4 * 2 = 8: exact at 8
    assert baked.tensors["lora_A.weight"].shape == (8, 8, 3, 3)
    assert baked.tensors["lora_B.weight"].shape == (24, 8, 1, 1)
    assert baked.weight_shape == module.weight_shape == (24, 8, 3, 3)
    np.testing.assert_allclose(baked.delta_weight(), module.delta_weight(), rtol=1e-4, atol=1e-4)
    assert report.relative_error < 1e-5


def test_a_rank_above_what_delta_w_has_is_clamped_to_it():
    assert bake_module(loha(rank=2), 64)[0].rank == 4  # a rank-2 LoHa: at most 2 * 2
    assert bake_module(loha(rank=3, out=6, inp=5), 64)[0].rank == 5  # at most the smaller side


def test_baked_factors_keep_the_module_dtype_and_the_error_is_measured_after_the_cast():
    module = loha(dtype="BF16")
    baked, report = bake_module(module, 4)
    assert {t.dtype for t in baked.tensors.values()} == {"BF16"}
    assert 1e-4 < report.relative_error < 1e-2  # bfloat16 rounding, not zero


def test_a_dora_magnitude_is_kept_with_its_axis():
    module = random_module(LINEAR, "loha", {"hada_w1_a": (8, 2), "hada_w1_b": (2, 6), "hada_w2_a": (8, 2),
                                            "hada_w2_b": (2, 6), "dora_scale": (1, 6)}, dora_axis="in")
    baked, _ = bake_module(module, 4)
    assert baked.dora_axis == "in" and baked.tensors["dora_scale"] is module.tensors["dora_scale"]


def test_bake_to_lora_leaves_lora_modules_untouched_and_reports_each_baked_one():
    rng = np.random.default_rng(0)
    plain = make_lora_module("unet.conv_in", (4, 32, 3, 3), 4, 4.0, rng)
    model = LoraModel()
    for module in (plain, loha(), lokr_conv()):
        model.add(module)
    baked, report = bake_to_lora(model, 2)
    assert baked.modules["unet.conv_in"] is plain
    assert [(r.name, r.from_kind, r.rank) for r in report] == [(LINEAR, "loha", 2), (CONV, "lokr", 2)]
    assert {m.kind for m in baked.modules.values()} == {"lora"}
    assert {m.kind for m in model.modules.values()} == {"lora", "loha", "lokr"}  # the input model is not changed


def test_a_rank_below_one_is_refused():
    model = LoraModel()
    model.add(loha())
    with pytest.raises(LoraBridgeError, match="at least 1"):
        bake_to_lora(model, 0)


def test_lora_only_refuses_other_kinds_listing_them_and_saying_what_to_do(tmp_path):
    model = LoraModel()
    for i in range(7):
        model.add(LoraModule(f"{LINEAR}{i}", "loha", loha().tensors, 1.0))
    with pytest.raises(LoraBridgeError, match=r"the diffusers format holds only plain LoRA, 7 module\(s\) are loha: .*to_q0 \(loha\), "
                                              r".* \(\+2 more\); pass --bake-to-lora RANK") as error:
        lora_only(model, "diffusers", None, tmp_path / "out.safetensors")
    assert error.value.path == str(tmp_path / "out.safetensors")


def test_lora_only_bakes_when_asked_and_returns_a_summary_and_a_line_per_module():
    model = LoraModel()
    model.add(loha())
    baked, lines = lora_only(model, "kohya", 3, None)
    assert baked.modules[LINEAR].kind == "lora"
    assert lines[0].startswith("baked 1 module(s) to plain LoRA by truncated SVD: relative error median")
    assert lines[1].startswith(f"{LINEAR}: loha baked to LoRA rank 3, relative error ")


@pytest.mark.torch
@pytest.mark.slow
def test_a_lycoris_loha_file_baked_to_kohya_loads_in_diffusers_with_the_loha_delta(lycoris_file, tiny_pipe_factory, tmp_path):
    """End to end with real tools: lycoris writes a LoHa, we bake it into kohya, diffusers fuses it.

    (Blocks only: diffusers' kohya loader cannot place SGM-spelled top-level layers such as conv_in.)
    """
    from lorabridge.converters import convert
    from lorabridge.formats.neutral import read_neutral
    from tests.fixtures.torch_lora import base_weights, diffusers_messages, torch_layer

    case = lycoris_file("loha", dim=2, blocks_only=True)  # LoHa rank 2 -> exact as LoRA rank 4
    neutral = convert(case.path, tmp_path / "n.safetensors", to="neutral", progress=False).output
    result = convert(neutral, tmp_path / "k.safetensors", to="kohya", bake_to_lora=4, progress=False)
    errors = [float(w.rsplit(" ", 1)[1]) for w in result.warnings if "baked to LoRA rank" in w]
    assert len(errors) == len(case.modules) and max(errors) < 1e-5
    model = read_neutral(neutral)
    pipe = tiny_pipe_factory()
    base = base_weights(pipe, model.modules)
    with diffusers_messages() as messages:
        pipe.load_lora_weights(str(tmp_path), weight_name="k.safetensors")
    assert not [m for m in messages if "unexpected" in m.lower() or "not loaded" in m.lower()]
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"])
    for name, module in model.modules.items():
        want = base[name] + module.delta_weight().reshape(base[name].shape)
        np.testing.assert_allclose(torch_layer(pipe, name).weight.detach().numpy(), want, rtol=1e-4, atol=1e-4, err_msg=name)
