"""Base directories as users download them: fp16 variants (sharded too), pickled components, single files.

The tiny pipelines are saved by diffusers itself (``save_pretrained(variant="fp16")`` of the pipeline in
fp16, Flux's transformer in shards); images from them must match the plain base within fp16 rounding.
MindSpore runs once, in a subprocess (CLI, stderr a pipe): the SDXL fp16 variant with a UNet-only LoRA, its
image against torch's from the plain base, and its log (a line per step, no third-party noise).
"""

from __future__ import annotations

import shutil

import pytest

from lorabridge.adapters.base_model import describe_base
from lorabridge.compare import compare_paths
from lorabridge.errors import LoraBridgeError
from tests.fixtures.sdxl import TINY_PROMPT
from tests.test_infer_logs import STEP_LINE, unet_only_lora  # noqa: F401 (fixture)
from tests.test_infer_mindspore import cli_subprocess

FP16_MAE = 1.0  # on 0..255: fp16 weights against fp32 ones, 2 steps on the tiny pipelines


def save_as(src, dst, **save):
    """``src`` reloaded by diffusers and saved with ``save`` (``variant=``, ``safe_serialization=``), weights in fp16
    when the variant is fp16."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(src), local_files_only=True)
    if save.get("variant") == "fp16":
        pipe = pipe.to(torch.float16)
    pipe.save_pretrained(str(dst), **save)
    return dst


@pytest.fixture(scope="module")
def variants(tiny_sdxl_dir, tiny_flux_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("variants")
    return {"sdxl": save_as(tiny_sdxl_dir, tmp / "sdxl-fp16", variant="fp16"),
            "flux": save_as(tiny_flux_dir, tmp / "flux-fp16", variant="fp16", max_shard_size="1MB"),
            "bin": save_as(tiny_sdxl_dir, tmp / "sdxl-bin", safe_serialization=False)}


def run_torch(run_cli, base, out, *args):
    result = run_cli("infer", "--backend", "torch", "--device", "cpu", "--base", base, "--prompt", TINY_PROMPT,
                     "--steps", "2", "--width", "64", "--height", "64", "-o", out, *args)
    assert result.exit_code == 0, result.output
    return result.output


def refusal(result) -> str:
    assert result.exit_code == 1, result.output
    return result.output.strip().splitlines()[-1]


@pytest.mark.torch
@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_fp16_variant_directory_loads_and_matches_the_plain_base(arch, variants, tiny_sdxl_dir, tiny_flux_dir,
                                                                 run_cli, tmp_path):
    plain = {"sdxl": tiny_sdxl_dir, "flux": tiny_flux_dir}[arch]
    names = sorted(p.name for p in (variants[arch] / ("unet" if arch == "sdxl" else "transformer")).iterdir())
    assert all(".fp16" in n for n in names if n != "config.json") and (arch == "sdxl" or len(names) > 3), names
    log = run_torch(run_cli, variants[arch], tmp_path / "fp16")
    assert "loading the fp16 variant weights" in log
    run_torch(run_cli, plain, tmp_path / "plain")
    assert run_torch(run_cli, variants[arch], tmp_path / "explicit", "--variant", "fp16")
    row, = compare_paths(tmp_path / "plain", tmp_path / "fp16", max_mae=FP16_MAE)["pairs"]
    print(f"\n{arch} fp16 variant vs plain base: MAE {row['mae']:.4f}")
    assert row["mae"] <= FP16_MAE and compare_paths(tmp_path / "fp16", tmp_path / "explicit")["pairs"][0]["mae"] == 0


def _renamed(tiny_sdxl_dir, tmp_path, name, renames):
    """A copy of the tiny SDXL whose weight files get other names: {component: new file name}."""
    base = shutil.copytree(tiny_sdxl_dir, tmp_path / name)
    for component, new in renames.items():
        old = next(p for p in (base / component).iterdir() if p.suffix == ".safetensors")
        if new is None:
            old.unlink()
        else:
            old.rename(old.with_name(new))
    return base


def test_variant_is_read_from_the_file_names_and_ambiguity_is_refused(tiny_sdxl_dir, tmp_path):
    half = _renamed(tiny_sdxl_dir, tmp_path, "half", {"unet": "diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
                                                        "text_encoder": "model-00001-of-00001.fp16.safetensors"})
    assert describe_base(half).variant == "fp16"  # new and legacy shard names; plain files elsewhere
    assert describe_base(tiny_sdxl_dir).variant is None
    shutil.copy(half / "unet/diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
                half / "unet/diffusion_pytorch_model.bf16.safetensors")
    with pytest.raises(LoraBridgeError, match="unet holds bf16 and fp16 weights and no plain ones: choose one with --variant"):
        describe_base(half)
    assert describe_base(half, variant="fp16").variant == "fp16"
    with pytest.raises(LoraBridgeError, match=r"text_encoder has no bf16 weights nor plain ones \(it has fp16\)"):
        describe_base(half, variant="bf16")
    mixed = _renamed(tiny_sdxl_dir, tmp_path, "mixed", {"unet": "diffusion_pytorch_model.fp16.safetensors",
                                                          "vae": "diffusion_pytorch_model.bf16.safetensors"})
    with pytest.raises(LoraBridgeError, match=r"components hold different variants \(unet fp16, vae bf16\)"):
        describe_base(mixed)
    with pytest.raises(LoraBridgeError, match="no component has ema weights"):
        describe_base(tiny_sdxl_dir, variant="ema")


@pytest.mark.torch
def test_pickled_components_are_refused_unless_allowed_and_never_on_mindspore(variants, tiny_sdxl_dir, run_cli, tmp_path):
    args = ("infer", "--backend", "torch", "--base", variants["bin"], "--prompt", TINY_PROMPT, "--steps", "2")
    line = refusal(run_cli(*args, "-o", tmp_path / "refused"))
    assert "text_encoder/pytorch_model.bin is a pickle (.bin) (and 3 more)" in line and "--allow-pickle" in line
    run_torch(run_cli, variants["bin"], tmp_path / "allowed", "--allow-pickle")
    run_torch(run_cli, tiny_sdxl_dir, tmp_path / "plain")
    assert compare_paths(tmp_path / "plain", tmp_path / "allowed")["pairs"][0]["mae"] == 0
    ms = cli_subprocess("infer", "--backend", "mindspore", "--base", variants["bin"], "--prompt", "x", "--allow-pickle",
                        "-o", tmp_path / "ms")
    last = ms.stderr.strip().splitlines()[-1]
    assert ms.returncode == 1 and "mindone.diffusers reads safetensors only" in last and "save_pretrained(" in last, ms.stderr
    assert not (tmp_path / "refused").exists() and not (tmp_path / "ms").exists()


def test_flux_single_file_is_refused_with_how_to_convert(tmp_path):
    import numpy as np

    from lorabridge.io.safetensors_file import write_safetensors
    from lorabridge.tensor import Tensor

    single = tmp_path / "flux1-dev.safetensors"
    write_safetensors(single, {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight":
                               Tensor.from_numpy(np.zeros((6, 2), np.float32))}, {})
    with pytest.raises(LoraBridgeError, match=r"Flux.1 single-file checkpoint .* FluxTransformer2DModel.from_single_file"):
        describe_base(single)
    with pytest.raises(LoraBridgeError, match="--variant selects weight files in a diffusers directory"):
        describe_base(single, variant="fp16")


@pytest.mark.torch
@pytest.mark.mindspore
@pytest.mark.slow
def test_mindspore_loads_the_fp16_variant_matches_torch_and_logs_cleanly(variants, tiny_sdxl_dir, unet_only_lora,  # noqa: F811
                                                                          run_cli, tmp_path):
    pytest.importorskip("mindspore")
    run_torch(run_cli, tiny_sdxl_dir, tmp_path / "torch", "--lora", unet_only_lora, "--save-latents", tmp_path / "z.npy")
    ms = cli_subprocess("infer", "--backend", "mindspore", "--device", "CPU", "--base", variants["sdxl"], "--prompt",
                        TINY_PROMPT, "--steps", "2", "--width", "64", "--height", "64", "--lora", unet_only_lora,
                        "--init-latents", tmp_path / "z.npy", "-o", tmp_path / "mindspore")
    assert ms.returncode == 0, ms.stderr[-3000:]
    assert "loading the fp16 variant weights" in ms.stderr and "560 modules in unet" in ms.stderr
    assert [s[:2] for s in STEP_LINE.findall(ms.stderr)] == [("1", "2"), ("2", "2")], ms.stderr
    for noise in ("Config not found for parakeet", "No LoRA keys associated", "Defaulting to unsafe serialization"):
        assert noise not in ms.stderr + ms.stdout
    assert ms.stdout.split() == [str(tmp_path / "mindspore" / "000-seed0.png")]
    row, = compare_paths(tmp_path / "torch", tmp_path / "mindspore", max_mae=FP16_MAE)["pairs"]
    print(f"\nmindspore fp16 variant vs torch plain base (SDXL, UNet LoRA): MAE {row['mae']:.4f}")
    assert row["mae"] <= FP16_MAE
