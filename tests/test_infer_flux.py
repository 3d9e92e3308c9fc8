"""``infer`` on the tiny Flux.1 with both backends: parity, the LoRA's effect, mixed ranks/alphas, refusals.

One neutral Flux.1 LoRA whose modules have different ranks and alphas; the torch run saves its initial
noise (16 channels, packed 2x2 by lorabridge for both backends) and MindSpore (CPU, in a subprocess, as
tests/test_infer_mindspore.py) starts from that file. ``apply_lora`` checks on each backend that every
module landed with scaling alpha / rank, so the MindSpore run passing is the per-module rank/alpha check.
"""

from __future__ import annotations

import pytest

from lorabridge.compare import compare_paths
from tests.fixtures.sdxl import TINY_PROMPT
from tests.test_infer_mindspore import cli_subprocess

pytestmark = [pytest.mark.torch]

SIZE = ("--width", "64", "--height", "64", "--steps", "2", "--dtype", "fp32")


@pytest.fixture(scope="module")
def mixed_lora(tiny_flux_dir, tmp_path_factory):
    """A neutral Flux.1 LoRA with three (rank, alpha) pairs: 2/1 on double blocks, 8/16 on single blocks, 4/3 on CLIP-L."""
    from lorabridge.architectures.flux1 import FLUX1
    from lorabridge.architectures.flux1.tiny import LORA_TARGETS, WEIGHT_FILES
    from lorabridge.architectures.tiny_parts import random_lora, weight_shapes
    from lorabridge.formats.neutral import write_neutral

    shapes = weight_shapes(tiny_flux_dir, WEIGHT_FILES, LORA_TARGETS, ("transformer", "text_encoder"))
    shapes = {n: s for n, s in shapes.items() if not n.endswith(".proj_out") or ".single_transformer_blocks." in n}
    groups = {(2, 1.0): ".transformer_blocks.", (8, 16.0): ".single_transformer_blocks.", (4, 3.0): "text_encoder."}
    model = None
    for seed, ((rank, alpha), marker) in enumerate(groups.items()):
        part = random_lora({n: s for n, s in shapes.items() if marker in n}, rank, alpha, seed, 0.5,
                           provenance={"source_format": "test"}, training={})
        if model is None:
            model = part
        else:
            for module in part.modules.values():
                model.add(module)
    model.architecture = FLUX1.name
    path = tmp_path_factory.mktemp("mixed") / "mixed-flux.safetensors"
    write_neutral(model, path)
    return path


@pytest.fixture(scope="module")
def flux_images(tiny_flux_dir, mixed_lora, tmp_path_factory):
    from click.testing import CliRunner

    from lorabridge.cli import cli

    tmp = tmp_path_factory.mktemp("flux-parity")
    common = ["--base", tiny_flux_dir, "--prompt", TINY_PROMPT, *SIZE]
    torch_run = CliRunner().invoke(cli, list(map(str, ["infer", "--backend", "torch", *common, "--lora", mixed_lora,
                                                       "--save-latents", tmp / "noise.npy", "-o", tmp / "torch"])))
    assert torch_run.exit_code == 0, torch_run.output
    base_run = CliRunner().invoke(cli, list(map(str, ["infer", "--backend", "torch", *common,
                                                      "--init-latents", tmp / "noise.npy", "-o", tmp / "base"])))
    assert base_run.exit_code == 0, base_run.output
    return {"dir": tmp, "torch_log": torch_run.output, "common": common}


def test_torch_runs_flux_with_mixed_ranks_and_16_channel_noise(flux_images, mixed_lora):
    import numpy as np

    from lorabridge.formats.neutral import read_neutral

    assert "LoRA applied (torch): 8 modules in text_encoder\n" in flux_images["torch_log"]
    assert "LoRA applied (torch): 418 modules in transformer\n" in flux_images["torch_log"]
    assert np.load(flux_images["dir"] / "noise.npy").shape == (1, 16, 8, 8)
    pairs = {(m.rank, m.alpha) for m in read_neutral(mixed_lora).modules.values()}
    assert pairs == {(2, 1.0), (8, 16.0), (4, 3.0)}


@pytest.mark.mindspore
@pytest.mark.slow
def test_mindspore_matches_torch_and_the_lora_matters_20x_more(flux_images, mixed_lora):
    pytest.importorskip("mindspore")
    d = flux_images["dir"]
    ms_run = cli_subprocess("infer", "--backend", "mindspore", "--device", "CPU", *flux_images["common"],
                            "--lora", mixed_lora, "--init-latents", d / "noise.npy", "-o", d / "mindspore")
    assert ms_run.returncode == 0, ms_run.stderr[-3000:]
    # apply_lora refuses any module whose PEFT scaling is not the file's alpha / rank: all three pairs landed.
    assert "LoRA applied (mindspore): 8 modules in text_encoder\n" in ms_run.stderr
    assert "LoRA applied (mindspore): 418 modules in transformer\n" in ms_run.stderr
    cross = compare_paths(d / "torch", d / "mindspore", max_mae=0.5)
    effect = compare_paths(d / "torch", d / "base")["pairs"][0]["mae"]
    row, = cross["pairs"]
    print(f"\nFlux.1 parity torch vs mindspore (tiny, fp32, 2 euler steps, 64x64): MAE {row['mae']:.4f}, "
          f"max {row['max_error']}; LoRA effect MAE {effect:.2f}")
    assert cross["passed"], row
    assert effect > 5 and effect >= 20 * max(row["mae"], 0.05)


def test_flux_refusals_are_one_line(run_cli, tiny_flux_dir, tiny_flux_lora_file, tiny_sdxl_dir, tiny_lora_file, tmp_path):
    def refused(*args):
        result = run_cli("infer", "--backend", "torch", "--prompt", "x", "-o", tmp_path / "out", *map(str, args))
        assert result.exit_code == 1, result.output
        return result.output.strip().splitlines()[-1]

    flux = ("--base", tiny_flux_dir, "--lora", tiny_flux_lora_file)
    assert "takes no negative prompt" in refused(*flux, "--negative-prompt", "blurry")
    assert "--scheduler ddim does not sample a Flux.1 base" in refused(*flux, "--scheduler", "ddim")
    assert "--width must be a multiple of 16 for a Flux.1 base" in refused(*flux, "--width", "72")
    assert "this is a Flux.1 LoRA (flux-1-dev); the base model is an SDXL pipeline" in \
        refused("--base", tiny_sdxl_dir, "--lora", tiny_flux_lora_file)
    assert "this is an SDXL LoRA (stable-diffusion-xl-v1-base); the base model is a Flux.1 pipeline" in \
        refused("--base", tiny_flux_dir, "--lora", tiny_lora_file)
    assert not (tmp_path / "out").exists()
