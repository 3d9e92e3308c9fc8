"""Broken and mixed Flux.1 LoRA files through the CLI get the same one-line errors as SDXL's
(``error: <file>: <problem>``, exit 1, no traceback, nothing written; see tests/test_hostile_input.py).

The files are kohya sd-scripts' Flux layout (``networks/lora_flux.py``: ``lora_unet_double_blocks_N_img_attn_qkv``
fused q/k/v, ``single_blocks_N_linear1``) at real Flux.1-dev shapes, so fused row counts are checked against
the Flux.1-dev module tree, not against a narrower test model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lorabridge.io.safetensors_file import write_safetensors
from lorabridge.tensor import Tensor
from tests.test_hostile_input import assert_refused

RANK = 2
GOOD = {  # kohya stem -> (out, in) of the BFL weight it adapts, at Flux.1-dev size
    "lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072),
    "lora_unet_double_blocks_0_img_attn_proj": (3072, 3072),
    "lora_unet_double_blocks_0_txt_mod_lin": (18432, 3072),
    "lora_unet_single_blocks_0_linear1": (21504, 3072),
    "lora_unet_single_blocks_0_linear2": (3072, 15360),
}
SDXL_STEM, SDXL_SHAPE = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", (640, 640)


def pair(stem: str, out: int, inp: int, rng, *, up_rank: int = RANK) -> dict[str, np.ndarray]:
    return {f"{stem}.lora_down.weight": rng.standard_normal((RANK, inp)).astype("f2") * 0.01,
            f"{stem}.lora_up.weight": rng.standard_normal((out, up_rank)).astype("f2") * 0.01,
            f"{stem}.alpha": np.array(RANK, "f2")}


def kohya_flux(path: Path, **extra: tuple[int, int]) -> dict[str, np.ndarray]:
    """A kohya Flux.1 file with the GOOD modules plus ``extra`` stems (name -> (out, in)); returns its arrays."""
    rng = np.random.default_rng(3)
    arrays = {}
    for stem, (out, inp) in {**GOOD, **extra}.items():
        arrays.update(pair(stem, out, inp, rng))
    save(path, arrays)
    return arrays


def save(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    write_safetensors(path, {k: Tensor.from_numpy(v) for k, v in arrays.items()}, {"ss_network_module": "networks.lora_flux"})
    return path


@pytest.fixture
def flux_file(tmp_path) -> Path:
    path = tmp_path / "flux_kohya.safetensors"
    kohya_flux(path)
    return path


def test_the_good_file_converts(tmp_path, flux_file, run_cli):
    """The base of every case below is a valid Flux.1 LoRA: what is refused is the damage, not the file."""
    result = run_cli("convert", flux_file, "--to", "diffusers", "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("keep, expected", [
    (4, "neither safetensors nor a torch pickle"),  # not even the header length
    (60, "truncated: header claims"),  # the header cut
    (2000, "data ends at byte"),  # the header whole, the data cut
    (-10, "but the file holds"),  # the last tensor 10 bytes short
], ids=["length cut", "header cut", "data cut", "last tensor short"])
@pytest.mark.parametrize("source", [(), ("--from", "kohya")], ids=["detected", "from kohya"])
def test_a_truncated_flux_file_gives_one_line(tmp_path, flux_file, run_cli, keep, expected, source):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(flux_file.read_bytes()[:keep])
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", bad, *source, "--to", "diffusers", "-o", out)
    assert_refused(result.output, result.exit_code, bad, out, expected)


def test_nan_in_a_fused_flux_layer_warns_and_strict_refuses(tmp_path, run_cli):
    arrays = kohya_flux(tmp_path / "ok.safetensors")
    arrays["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"][5, 0] = np.nan
    bad = save(tmp_path / "nan.safetensors", arrays)
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", bad, "--to", "diffusers", "-o", out)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "NaN" in line]  # the reader's, and the writer's
    assert warnings and all(line.startswith("warning: ") and "transformer.transformer_blocks.0.attn.to_q.lora_B.weight "
                            "(1 of 6144)" in line for line in warnings), result.output
    out.unlink()
    result = run_cli("convert", bad, "--to", "diffusers", "--strict", "-o", out)
    assert_refused(result.output, result.exit_code, bad, out, "hold NaN or Inf values")
    assert "refused (--strict)" in result.output


@pytest.mark.parametrize("stem, rows, expected", [
    ("lora_unet_double_blocks_1_img_attn_qkv", 9000, "transformer.transformer_blocks.1.attn.to_q adapts a [3000, 3072] "
                                                     "weight, Flux.1's is [3072, 3072]"),
    ("lora_unet_double_blocks_1_txt_attn_qkv", 3072, "transformer.transformer_blocks.1.attn.add_q_proj adapts a [1024, 3072]"),
    ("lora_unet_double_blocks_1_img_attn_qkv", 9217, "fused q/k/v lora_B has shape [9217, 2], rows not divisible in the "
                                                     "ratio 3072:3072:3072"),
    ("lora_unet_single_blocks_1_linear1", 9216, "fused (to_q, to_k, to_v, proj_mlp) lora_B has shape [9216, 2], rows "
                                                "not divisible in the ratio 3072:3072:3072:12288"),
], ids=["qkv 9000 rows", "qkv 3072 rows", "qkv 9217 rows", "linear1 9216 rows"])
def test_a_fused_layer_with_the_wrong_row_count_gives_one_line(tmp_path, run_cli, stem, rows, expected):
    """Rows are checked against Flux.1-dev's tree: 9000 rows split evenly, but into parts Flux.1 has not."""
    bad = tmp_path / "rows.safetensors"
    kohya_flux(bad, **{stem: (rows, 3072)})
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", bad, "--to", "diffusers", "-o", out)
    assert_refused(result.output, result.exit_code, bad, out, expected)


@pytest.mark.parametrize("stem, out_features, expected", [
    ("lora_unet_double_blocks_1_img_attn_proj", 3072, "transformer.transformer_blocks.1.attn.to_out.0: rank mismatch, "
                                                      "lora_A is [2, 3072] but lora_B is [3072, 4]"),
    ("lora_unet_double_blocks_1_img_attn_qkv", 9216, "transformer.double_blocks.1.img_attn.qkv: rank mismatch, "
                                                     "lora_A is [2, 3072] but lora_B is [9216, 4]"),
], ids=["proj", "fused qkv"])
def test_down_and_up_of_different_ranks_give_one_line(tmp_path, run_cli, stem, out_features, expected):
    arrays = kohya_flux(tmp_path / "ok.safetensors")
    arrays.update(pair(stem, out_features, 3072, np.random.default_rng(0), up_rank=2 * RANK))
    bad = save(tmp_path / "ranks.safetensors", arrays)
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", bad, "--to", "diffusers", "-o", out)
    assert_refused(result.output, result.exit_code, bad, out, expected)


@pytest.mark.parametrize("argv", [("convert", "--to", "mindone-sgm"), ("convert", "--to", "mindone-kohya"),
                                  ("neutral2ms",), ("neutral2ms", "--naming", "mindone-kohya")])
def test_a_flux_lora_given_to_an_sdxl_only_writer_gives_one_line(tmp_path, flux_file, run_cli, argv):
    neutral = tmp_path / "flux_neutral.safetensors"
    assert run_cli("pt2neutral", flux_file, "-o", neutral).exit_code == 0
    src = flux_file if argv[0] == "convert" else neutral
    out = tmp_path / "out.ckpt"
    result = run_cli(argv[0], src, *argv[1:], "-o", out)
    assert_refused(result.output, result.exit_code, src, out, "names only stable-diffusion-xl-v1-base layers; "
                                                              "this LoRA is for flux-1-dev")


def test_an_sdxl_module_in_a_flux_file_is_refused_or_dropped_with_skip_unknown(tmp_path, run_cli):
    """Mixed architectures, mostly Flux.1: the SDXL module matches no Flux.1 layer; it is named, never dropped
    silently; --skip-unknown drops it with a warning and converts the Flux.1 modules."""
    bad = tmp_path / "mixed.safetensors"
    kohya_flux(bad, **{SDXL_STEM: SDXL_SHAPE})
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", bad, "--to", "diffusers", "-o", out)
    assert_refused(result.output, result.exit_code, bad, out, "1 module(s) match no Flux.1 layer: "
                   "transformer.down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q (--skip-unknown drops them")
    result = run_cli("convert", bad, "--to", "diffusers", "--skip-unknown", "-o", out)
    assert result.exit_code == 0, result.output
    assert "dropped 1 module(s) that match no Flux.1 layer" in result.output and out.exists()


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip-unknown"])
def test_a_flux_module_in_an_sdxl_file_is_refused_as_pointing_at_flux(tmp_path, run_cli, skip):
    """Mixed architectures, mostly SDXL: refused, --skip-unknown or not (a Flux.1 name is evidence of another model)."""
    rng = np.random.default_rng(1)
    arrays = {**pair(SDXL_STEM, *SDXL_SHAPE, rng), **pair(SDXL_STEM.replace("to_q", "to_k"), *SDXL_SHAPE, rng),
              **pair("lora_unet_double_blocks_0_img_attn_proj", 3072, 3072, rng)}
    bad = save(tmp_path / "mixed.safetensors", arrays)
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", bad, "--to", "diffusers", *(("--skip-unknown",) if skip else ()), "-o", out)
    assert_refused(result.output, result.exit_code, bad, out, "not an SDXL LoRA: 1 of 3 modules do not fit SDXL-base: "
                   "unet.double_blocks_0_img_attn_proj (no such SDXL layer); looks like Flux.1")


def test_diffusers_names_of_two_architectures_are_refused(tmp_path, run_cli):
    """Mixed architectures in diffusers names: the SDXL ``unet.`` module is a component Flux.1 has not."""
    rng = np.random.default_rng(2)
    shapes = {"transformer.transformer_blocks.0.attn.to_q": (3072, 3072),
              "transformer.single_transformer_blocks.0.proj_mlp": (12288, 3072),
              "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": SDXL_SHAPE}
    arrays = {}
    for name, (out_features, inp) in shapes.items():
        arrays[f"{name}.lora_A.weight"] = rng.standard_normal((RANK, inp)).astype("f4")
        arrays[f"{name}.lora_B.weight"] = rng.standard_normal((out_features, RANK)).astype("f4")
    bad = tmp_path / "mixed_diffusers.safetensors"
    write_safetensors(bad, {k: Tensor.from_numpy(v) for k, v in arrays.items()}, {})
    out = tmp_path / "out.safetensors"
    for skip in ((), ("--skip-unknown",)):
        result = run_cli("convert", bad, "--to", "kohya", *skip, "-o", out)
        assert_refused(result.output, result.exit_code, bad, out, "not a Flux.1 LoRA: 1 of 3 modules do not fit "
                       "Flux.1-dev: unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q (component 'unet'")
