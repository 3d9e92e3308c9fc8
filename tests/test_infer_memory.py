"""``infer``'s memory: text encoders freed once the prompt is encoded, the denoiser before the VAE decodes (same
images), the peak logged, and the ``--dtype`` choices each backend refuses or notes on CPU (issue 16, item 3).

The real-size figures are bench/RESULTS-infer-realsize.md (``make realsize``).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from lorabridge.adapters import mindspore_backend, torch_backend
from lorabridge.adapters.latents import draw_latents
from lorabridge.adapters.options import InferOptions
from lorabridge.errors import LoraBridgeError
from tests.fixtures.sdxl import TINY_PROMPT


@pytest.mark.torch
def test_frees_text_encoders_after_encoding_and_the_denoiser_after_the_last_step_images_unchanged(tiny_sdxl_dir, tmp_path):
    from lorabridge.adapters.pipeline import sample

    options = InferOptions("torch", tiny_sdxl_dir, TINY_PROMPT, steps=2, output=tmp_path)
    latents = draw_latents(0, (2, 4, 8, 8))
    kept, fw = torch_backend.load_pipeline(str(tiny_sdxl_dir), "fp32", "cpu")
    expected = sample(kept, fw, options, latents, (64, 64))
    assert kept.text_encoder is not None and kept.unet is not None  # not asked to free: the pipeline stays whole

    pipe, fw = torch_backend.load_pipeline(str(tiny_sdxl_dir), "fp32", "cpu")
    during, lines = [], []

    def on_step(p, step, timestep, kwargs):
        during.append((p.text_encoder, p.text_encoder_2, p.unet is not None))
        return kwargs

    images = sample(pipe, fw, options, latents, (64, 64), on_step=on_step, free_memory=True, log=lines.append)
    assert during == [(None, None, True)] * 2  # encoders gone from the first step on; the UNet ran every step
    assert pipe.unet is None and pipe.vae is not None
    assert "encode_prompt" not in vars(pipe)  # the class's own method again
    steps = [line for line in lines if line.startswith("step ")]  # off a terminal, one line per step (adapters/progress.py)
    assert len(steps) == 2 and steps[-1].startswith("step 2/2")
    assert [line for line in lines if line not in steps] == ["prompt encoded; text_encoder, text_encoder_2 freed",
                                                             "denoising done; unet freed before the VAE decodes"]
    assert lines.index(steps[-1]) < lines.index("denoising done; unet freed before the VAE decodes")
    np.testing.assert_array_equal(images, expected)


@pytest.mark.torch
def test_logs_the_peak_memory_last(run_cli, tiny_sdxl_dir, tmp_path):
    result = run_cli("infer", "--backend", "torch", "--base", tiny_sdxl_dir, "--prompt", TINY_PROMPT, "--steps", "1",
                     "--device", "cpu", "-o", tmp_path / "images")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "it/s]" not in line]
    assert "prompt encoded; text_encoder, text_encoder_2 freed" in lines
    assert re.fullmatch(r"peak memory \d+\.\d GB \(resident, this process\)", lines[-2])  # then the image path


def test_mindspore_refuses_bf16_on_cpu_in_one_line_and_runs_fp16():
    with pytest.raises(LoraBridgeError, match=r"^--dtype bf16 does not run on MindSpore's CPU backend .*use --dtype fp16 or fp32$"):
        mindspore_backend.resolve_dtype("bf16", "CPU")
    assert mindspore_backend.resolve_dtype("fp16", "CPU") == "fp16"
    assert mindspore_backend.resolve_dtype("bf16", "Ascend") == "bf16"
    assert mindspore_backend.dtype_note("fp16", "CPU") is None


def test_torch_runs_half_precision_on_cpu_with_a_one_line_note():
    assert torch_backend.resolve_dtype("fp16", "cpu") == "fp16" and torch_backend.resolve_dtype("auto", "cpu") == "fp32"
    assert torch_backend.dtype_note("bf16", "cpu") == ("note: torch on CPU runs bf16 far slower than fp32 "
                                                       "(20-55x measured where the CPU has no native bf16)")
    assert torch_backend.dtype_note("fp32", "cpu") is None and torch_backend.dtype_note("fp16", "cuda") is None
