"""resize: per-module truncated SVD from the factors, checked against the Eckart-Young optimum
computed here with numpy's SVD of the dense delta W, and against the delta W the written factors give."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from lorabridge.bake import bake_module
from lorabridge.errors import LoraBridgeError
from lorabridge.formats.neutral import write_neutral
from lorabridge.model import LoraModule
from lorabridge.toolbox.files import read_lora
from lorabridge.toolbox.resize import resize_file, resize_model, resize_module
from lorabridge.toolbox.svd import RankTarget, spectrum
from tests.fixtures.core import make_lora_model
from tests.test_bake import CONV, LINEAR, eckart_young, loha, lokr_conv, random_module


def lora(rank=8, out=48, inp=40, alpha=4.0, kernel=(), seed=0, dtype="F32") -> LoraModule:
    b_shape = (out, rank, 1, 1) if kernel else (out, rank)
    return random_module(CONV if kernel else LINEAR, "lora", {"lora_A.weight": (rank, inp, *kernel), "lora_B.weight": b_shape},
                         alpha=alpha, seed=seed, dtype=dtype)


def measured(module: LoraModule, resized: LoraModule) -> float:
    delta = module.delta_weight().astype(np.float64)
    return float(np.linalg.norm(delta - resized.delta_weight()) / np.linalg.norm(delta))


@pytest.mark.parametrize("module", [lora(), lora(alpha=-3.0), lora(kernel=(3, 3), out=16, inp=6), lora(rank=12, out=10, inp=64)],
                         ids=["linear", "negative-alpha", "conv", "rank-above-out"])
@pytest.mark.parametrize("rank", [1, 3, 7])
def test_resize_error_is_the_eckart_young_optimum_and_what_the_factors_give(module, rank):
    resized, error = resize_module(module, RankTarget(rank=rank))
    optimum = eckart_young(module.delta_weight(), rank)
    assert resized.kind == "lora" and resized.rank == rank and error.rank_after == rank
    assert error.relative_error == pytest.approx(optimum, rel=1e-5, abs=1e-7)
    assert error.relative_error == pytest.approx(measured(module, resized), rel=1e-5, abs=1e-7)


def test_new_alpha_is_the_new_rank_so_the_kept_part_of_delta_w_is_unchanged():
    module = lora(rank=4, alpha=10.0)
    for rank in (1, 2, 3):
        resized, _ = resize_module(module, RankTarget(rank=rank))
        assert resized.alpha == rank and resized.scale == 1.0
        u, s, vt = np.linalg.svd(module.delta_weight().astype(np.float64), full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vt[:rank]
        np.testing.assert_allclose(resized.delta_weight(), best, rtol=0, atol=1e-5 * np.abs(best).max())


def test_a_rank_above_what_the_factors_hold_keeps_the_module_as_it_is():
    """kohya resize_lora's IndexError (#325) / PR #2422: never ask the spectrum for more than it has."""
    module = lora(rank=4)
    resized, error = resize_module(module, RankTarget(rank=64))
    assert resized is module and error.rank_after == 4 and error.relative_error == 0.0
    assert len(spectrum(lora(rank=12, out=10, inp=64))[1]) == 10  # out < rank: 10 singular values, not 12
    assert resize_module(lora(rank=12, out=10, inp=64), RankTarget(rank=11))[0].rank == 10


@pytest.mark.parametrize("max_error", [0.0, 0.2, 0.5, 0.9])
def test_max_error_keeps_the_lowest_rank_within_it(max_error):
    module = lora(rank=8)
    resized, error = resize_module(module, RankTarget(max_error=max_error))
    assert error.relative_error <= max_error + 1e-6
    if resized.rank > 1:
        assert eckart_young(module.delta_weight(), resized.rank - 1) > max_error


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_energy_keeps_the_lowest_rank_holding_that_share(energy):
    module = lora(rank=8)
    _, s, _ = spectrum(module)
    resized, _ = resize_module(module, RankTarget(energy=energy))
    share = np.cumsum(s ** 2) / (s ** 2).sum()
    assert share[resized.rank - 1] >= energy - 1e-9
    assert resized.rank == 1 or share[resized.rank - 2] < energy


def test_fp16_factors_are_measured_as_stored():
    module = lora(rank=8, dtype="F16")
    resized, error = resize_module(module, RankTarget(rank=3))
    assert resized.tensors["lora_A.weight"].dtype == "F16"
    assert error.relative_error == pytest.approx(measured(module, resized), rel=1e-4)


@pytest.mark.parametrize("module", [loha(rank=3), lokr_conv()], ids=["loha", "lokr-conv"])
def test_loha_and_lokr_resize_through_the_bake(module):
    resized, error = resize_module(module, RankTarget(rank=4))
    baked, report = bake_module(module, 4)
    assert resized.kind == "lora" and error.kind == module.kind
    for role in ("lora_A.weight", "lora_B.weight"):
        assert resized.tensors[role].same_as(baked.tensors[role])
    assert error.relative_error == pytest.approx(report.relative_error, rel=1e-4, abs=1e-7)


def test_a_full_delta_resizes_by_dense_svd():
    module = random_module(LINEAR, "full", {"diff": (20, 30)})
    resized, error = resize_module(module, RankTarget(rank=5))
    assert resized.kind == "lora" and error.rank_before == 0
    assert error.relative_error == pytest.approx(eckart_young(module.delta_weight(), 5), rel=1e-5)


def test_dora_magnitude_is_kept_and_only_delta_w_is_truncated():
    shapes = {"lora_A.weight": (8, 40), "lora_B.weight": (48, 8), "dora_scale": (48, 1)}
    module = random_module(LINEAR, "lora", shapes, dora_axis="out")
    resized, error = resize_module(module, RankTarget(rank=3))
    assert resized.tensors["dora_scale"] is module.tensors["dora_scale"] and resized.dora_axis == "out"
    assert error.relative_error == pytest.approx(eckart_young(module.delta_weight(), 3), rel=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "--rank must be at least 1, got 0"), ({"rank": -2}, "--rank must be at least 1"),
    ({"max_error": 1.5}, "--max-error must be in [0, 1)"), ({"energy": 0.0}, "--energy must be in (0, 1]"),
    ({}, "give exactly one of"), ({"rank": 4, "energy": 0.5}, "(got --rank, --energy)"),
])
def test_bad_targets_are_refused(kwargs, message):
    with pytest.raises(LoraBridgeError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        RankTarget(**kwargs)


def test_real_shape_sdxl_modules_rank_128_to_32_reach_the_bound():
    """The largest SDXL-base linear shapes (ff.net.0.proj 1280 -> 10240, ff.net.2 5120 -> 1280, a 1280 attention)."""
    shapes = {"unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": (1280, 10240),
              "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2": (5120, 1280),
              "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (1280, 1280)}
    model = make_lora_model(shapes, rank=128, alpha=64.0, dtype="F16")
    started = time.perf_counter()
    small, errors = resize_model(model, RankTarget(rank=32))
    assert time.perf_counter() - started < 30
    for error in errors:
        module = model.modules[error.name]
        assert small.modules[error.name].rank == 32 and small.modules[error.name].alpha == 32.0
        assert error.relative_error == pytest.approx(eckart_young(module.delta_weight(), 32), rel=1e-3)


def test_cli_resize_writes_neutral_or_any_format_and_reports(tmp_path, run_cli):
    src, out = tmp_path / "a.safetensors", tmp_path / "small.safetensors"
    write_neutral(make_lora_model(rank=8, seed=3), src)
    result = run_cli("resize", str(src), "--rank", "3", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["rank_after"] == 18 and len(report["modules"]) == 6 and 0 < report["overall_relative_error"] < 1
    model, _ = read_lora(out)
    assert {m.rank for m in model.modules.values()} == {3} and model.provenance["history"][-1]["operation"] == "resize --rank 3"
    kohya = tmp_path / "small_kohya.safetensors"
    assert run_cli("resize", str(src), "--energy", "0.9", "--to", "kohya", "-o", str(kohya)).exit_code == 0
    assert read_lora(kohya)[0].modules.keys() == model.modules.keys()


def test_cli_refuses_bad_input_in_one_line_and_overwrites_nothing(tmp_path, run_cli):
    src, out = tmp_path / "a.safetensors", tmp_path / "out.safetensors"
    write_neutral(make_lora_model(rank=4), src)
    out.write_bytes(b"keep me")
    for args, message in [(["--rank", "2"], "output exists; pass --force"), (["--rank", "0", "--force"], "--rank must be at least 1"),
                          (["--energy", "nan", "--force"], "not a finite number")]:
        result = run_cli("resize", str(src), "-o", str(out), *args)
        assert result.exit_code != 0 and message in result.output
        assert out.read_bytes() == b"keep me"
    (tmp_path / "junk.safetensors").write_bytes(b"not a lora")
    result = run_cli("resize", str(tmp_path / "junk.safetensors"), "--rank", "2", "-o", str(tmp_path / "x.safetensors"))
    assert result.exit_code == 1 and result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(LoraBridgeError, match="output would overwrite the input"):
        resize_file(src, src, RankTarget(rank=2), force=True)
