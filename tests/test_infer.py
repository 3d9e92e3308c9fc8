"""``infer --backend torch``: images from the tiny SDXL plus one neutral LoRA, and every bad input refused.

The MindSpore backend and cross-framework parity are in test_infer_mindspore.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from lorabridge.adapters.base_model import SDXL_SINGLE_FILE_KEY
from lorabridge.adapters.png import read_png
from lorabridge.io.safetensors_file import write_safetensors
from lorabridge.tensor import Tensor
from lorabridge.formats.neutral import write_neutral
from lorabridge.architectures.sdxl.tiny import make_tiny_lora
from tests.fixtures.core import make_lora_model
from tests.fixtures.sdxl import TINY_PROMPT

pytestmark = pytest.mark.torch


@pytest.fixture
def infer(run_cli, tiny_sdxl_dir):
    """infer(*extra args) on the tiny SDXL, 2 steps, torch on CPU -> click Result."""
    def run(*args):
        return run_cli("infer", "--backend", "torch", "--base", tiny_sdxl_dir, "--prompt", TINY_PROMPT,
                       "--steps", "2", "--device", "cpu", *args)
    return run


def pixels(path) -> np.ndarray:
    return read_png(path)[0].astype(np.float64)


def mae(a, b) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def test_writes_pngs_with_their_parameters_and_logs_modules_per_component(infer, tiny_lora_file, tmp_path):
    out = tmp_path / "images"
    result = infer("--lora", tiny_lora_file, "--num-images", "2", "--seed", "7", "-o", out,
                   "--save-latents", tmp_path / "noise.npy")
    assert result.exit_code == 0, result.output
    # loaded in halves (adapters/staging.py): each half takes its part of the LoRA, in the order they load
    applied = [line for line in result.output.splitlines() if line.startswith("LoRA applied")]
    assert applied == ["LoRA applied (torch): 8 modules in text_encoder, 8 modules in text_encoder_2",
                       "LoRA applied (torch): 560 modules in unet"]
    assert sorted(p.name for p in out.iterdir()) == ["000-seed7.png", "001-seed8.png"]
    image, text = read_png(out / "001-seed8.png")
    assert image.shape == (64, 64, 3)
    assert text["prompt"] == TINY_PROMPT and text["seed"] == "8" and text["steps"] == "2"
    assert text["backend"] == "torch" and text["lora"] == tiny_lora_file.name
    assert text["lora_sha256"] == hashlib.sha256(tiny_lora_file.read_bytes()).hexdigest()
    noise = np.load(tmp_path / "noise.npy")
    assert noise.shape == (2, 4, 8, 8) and noise.dtype == np.float32


def test_default_output_is_beside_the_lora_file_and_size_is_free(infer, tiny_lora_file, tmp_path):
    lora = shutil.copy(tiny_lora_file, tmp_path / "mine.safetensors")
    assert infer("--lora", lora, "--width", "96", "--negative-prompt", "blurry").exit_code == 0
    image, text = read_png(tmp_path / "mine.safetensors-gen-images" / "000-seed0.png")
    assert image.shape == (64, 96, 3) and text["size"] == "96x64" and text["negative_prompt"] == "blurry"


def test_same_seed_same_image_and_saved_latents_reproduce_it(infer, tmp_path):
    assert infer("--seed", "3", "-o", tmp_path / "a", "--save-latents", tmp_path / "z.npy").exit_code == 0
    assert infer("--seed", "3", "-o", tmp_path / "b").exit_code == 0
    assert infer("--seed", "99", "--init-latents", tmp_path / "z.npy", "-o", tmp_path / "c").exit_code == 0
    assert infer("--seed", "4", "-o", tmp_path / "d").exit_code == 0
    assert mae(tmp_path / "a/000-seed3.png", tmp_path / "b/000-seed3.png") == 0
    assert mae(tmp_path / "a/000-seed3.png", tmp_path / "c/000-seed99.png") == 0  # the noise file decides, not --seed
    assert mae(tmp_path / "a/000-seed3.png", tmp_path / "d/000-seed4.png") > 1


def test_lora_changes_the_image_scale_zero_is_the_base_and_fused_equals_unfused(infer, tiny_lora_file, tmp_path):
    runs = {"base": (), "lora": ("--lora", tiny_lora_file), "zero": ("--lora", tiny_lora_file, "--lora-scale", "0"),
            "fused": ("--lora", tiny_lora_file, "--fuse"), "half": ("--lora", tiny_lora_file, "--lora-scale", "0.5")}
    for name, args in runs.items():
        result = infer(*args, "-o", tmp_path / name)
        assert result.exit_code == 0, result.output
    image = {name: tmp_path / name / "000-seed0.png" for name in runs}
    assert mae(image["lora"], image["base"]) > 5
    assert mae(image["zero"], image["base"]) < 0.01
    assert mae(image["fused"], image["lora"]) < 0.5
    assert mae(image["half"], image["base"]) > 1 and mae(image["half"], image["lora"]) > 1


def test_single_file_base_gives_the_same_image_as_the_pipeline_directory(run_cli, infer, tiny_sdxl_dir,
                                                                         tiny_sdxl_single_file, tiny_lora_file, tmp_path):
    assert infer("--lora", tiny_lora_file, "-o", tmp_path / "dir").exit_code == 0
    result = run_cli("infer", "--backend", "torch", "--base", tiny_sdxl_single_file, "--config", tiny_sdxl_dir,
                     "--lora", tiny_lora_file, "--prompt", TINY_PROMPT, "--steps", "2", "-o", tmp_path / "single")
    assert result.exit_code == 0, result.output
    assert "(single file)" in result.output and "560 modules in unet" in result.output
    assert mae(tmp_path / "dir/000-seed0.png", tmp_path / "single/000-seed0.png") == 0


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++2m-karras", "euler-a", "unipc"])
def test_schedulers(infer, tmp_path, scheduler):
    result = infer("--scheduler", scheduler, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert ("same seed gives different images on the two backends" in result.output) == (scheduler == "euler-a")
    assert read_png(tmp_path / "out/000-seed0.png")[1]["scheduler"] == scheduler


def test_alpha_is_honoured_a_lora_with_double_alpha_acts_like_scale_two(infer, tiny_sdxl_dir, tmp_path):
    model = make_tiny_lora(tiny_sdxl_dir, alpha=4.0, components=("unet",), strength=0.3)
    write_neutral(model, tmp_path / "a4.safetensors")
    for m in model.modules.values():
        m.alpha = 8.0
    write_neutral(model, tmp_path / "a8.safetensors")
    assert infer("--lora", tmp_path / "a4.safetensors", "--lora-scale", "2", "-o", tmp_path / "x").exit_code == 0
    assert infer("--lora", tmp_path / "a8.safetensors", "-o", tmp_path / "y").exit_code == 0
    assert mae(tmp_path / "x/000-seed0.png", tmp_path / "y/000-seed0.png") < 0.01


# --- bad input: one line, exit 1, nothing left behind -------------------------------------------------

def assert_refused(result, *words, tmp_path=None, before=()):
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert all(word in lines[0] for word in words), lines[0]
    if tmp_path is not None:
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_missing_and_non_sdxl_bases(run_cli, tmp_path, tiny_lora_file):
    def infer_on(base):
        return run_cli("infer", "--backend", "torch", "--base", base, "--lora", tiny_lora_file, "--prompt", "x",
                       "-o", tmp_path / "out")

    assert_refused(infer_on(tmp_path / "nowhere"), "base model not found")
    sd15 = tmp_path / "sd15"
    sd15.mkdir()
    (sd15 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert_refused(infer_on(sd15), "not an SDXL base model", "StableDiffusionPipeline")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04 pickle")
    assert_refused(infer_on(tmp_path / "model.ckpt"), "must be .safetensors")
    assert_refused(infer_on(tiny_lora_file), "not an SDXL base checkpoint")
    fake = tmp_path / "fake-sdxl.safetensors"  # the SDXL marker tensor and nothing else: diffusers' own error, one line
    write_safetensors(fake, {SDXL_SINGLE_FILE_KEY: Tensor.from_numpy(np.zeros((77, 48), np.float32))}, {})
    assert_refused(infer_on(fake), "diffusers cannot load this base model")
    assert not (tmp_path / "out").exists()


def test_lora_failing_validate_or_not_matching_the_base(infer, tiny_lora_file, tmp_path):
    broken = tmp_path / "broken.safetensors"
    data = bytearray(tiny_lora_file.read_bytes())
    data[-3] ^= 0xFF
    broken.write_bytes(bytes(data))
    assert_refused(infer("--lora", broken, "-o", tmp_path / "o"), "hash mismatch", tmp_path=tmp_path, before=["broken.safetensors"])
    # Real SDXL-base shapes on a tiny base: every module listed as a shape mismatch, or as absent.
    write_neutral(make_lora_model(), tmp_path / "big.safetensors")
    result = infer("--lora", tmp_path / "big.safetensors", "-o", tmp_path / "o")
    assert_refused(result, "does not match the base model", "6 of 6 modules",
                   "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q (LoRA 640x640, base 64x64)")
    assert not (tmp_path / "o").exists()


def test_init_latents_of_wrong_shape_or_dtype(infer, tmp_path):
    np.save(tmp_path / "small.npy", np.zeros((1, 4, 4, 4), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((1, 4, 8, 8), np.int64))
    assert_refused(infer("--init-latents", tmp_path / "small.npy", "-o", tmp_path / "o"), "shape [1, 4, 4, 4]", "[1, 4, 8, 8]")
    assert_refused(infer("--init-latents", tmp_path / "ints.npy", "-o", tmp_path / "o"), "int64")
    assert_refused(infer("--init-latents", tmp_path / "none.npy", "-o", tmp_path / "o"), "no such file")
    assert not (tmp_path / "o").exists()


def test_unknown_backend_device_scheduler(run_cli, infer, tiny_sdxl_dir, tmp_path):
    """--backend, --scheduler and --dtype are click choices (test_cli_core.py); a library caller gets the same
    refusals from InferOptions.check and load_backend; --device is checked by the backend."""
    from lorabridge.adapters.infer import load_backend
    from lorabridge.adapters.options import InferOptions
    from lorabridge.errors import LoraBridgeError

    with pytest.raises(LoraBridgeError, match="unknown backend 'jax'; choose one of: torch, mindspore"):
        load_backend("jax")
    for field, value in (("scheduler", "lms"), ("dtype", "fp8")):
        with pytest.raises(LoraBridgeError, match=f"unknown {field} '{value}'; choose one of: .*"):
            InferOptions(backend="torch", base=tiny_sdxl_dir, prompt="x", **{field: value}).check()
    assert_refused(run_cli("infer", "--backend", "torch", "--base", tiny_sdxl_dir, "--prompt", "x", "--device", "tpu",
                           "-o", tmp_path / "o"), "unknown torch device 'tpu'")
    assert not (tmp_path / "o").exists()


def test_missing_framework_names_the_extra(infer, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    assert_refused(infer("-o", tmp_path / "o"), "needs diffusers", "pip install 'lorabridge[torch]'")


def test_refuses_to_overwrite_output_without_force_and_replaces_only_images(infer, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_refused(infer("-o", out), "pass --force")
    assert_refused(infer("-o", out, "--force"), "not a directory of .png images")
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    (out / "old.png").write_bytes(b"")
    assert infer("-o", out, "--force").exit_code == 0
    assert [p.name for p in out.iterdir()] == ["000-seed0.png"]


def test_saved_latents_never_replace_a_file_a_racing_run_wrote_meanwhile(infer, tmp_path, monkeypatch):
    """--save-latents is checked before sampling; a file that appears there during sampling (another run
    writing the same path) is kept, and this run says "output exists" instead of replacing it."""
    from lorabridge.adapters import infer as infer_module

    noise = tmp_path / "noise.npy"
    sample = infer_module.sample

    def racing_sample(*args, **kwargs):
        noise.write_bytes(b"the other run's file")
        return sample(*args, **kwargs)

    monkeypatch.setattr(infer_module, "sample", racing_sample)
    result = infer("-o", tmp_path / "images", "--save-latents", noise)
    assert result.exit_code == 1 and "output exists" in result.output
    assert noise.read_bytes() == b"the other run's file"


def test_make_tiny_sdxl_lora_never_replaces_a_file_a_racing_run_wrote_meanwhile(tiny_sdxl_dir, tmp_path, monkeypatch):
    from lorabridge.architectures.sdxl import tiny as tiny_sdxl
    from lorabridge.errors import LoraBridgeError
    from lorabridge.io.atomic import replacing

    out = tmp_path / "lora.ckpt"
    make = tiny_sdxl.make_tiny_lora

    def racing_make(*args, **kwargs):
        out.write_bytes(b"the other run's file")
        return make(*args, **kwargs)

    monkeypatch.setattr(tiny_sdxl, "make_tiny_lora", racing_make)
    with replacing(True), pytest.raises(LoraBridgeError, match="output exists"):  # the library default would replace
        tiny_sdxl.write_tiny_lora(tiny_sdxl_dir, out)
    assert out.read_bytes() == b"the other run's file"
