"""``infer``'s log off a terminal: one line per denoising step, and no harmless third-party noise.

The torch run is a subprocess (stderr a pipe, as in a log file or CI job); the MindSpore log is checked in
tests/test_infer_variants.py's MindSpore run (mindone's "Config not found for parakeet" and LoRA notices).
"""

from __future__ import annotations

import logging
import re

import pytest

from lorabridge.adapters.noise import printed_to_stderr, quiet_logs
from lorabridge.adapters.progress import StepLog
from tests.fixtures.sdxl import TINY_PROMPT
from tests.test_infer_mindspore import cli_subprocess

STEP_LINE = re.compile(r"^step (\d+)/(\d+): \d+\.\d s, (ETA \d+\.\d s|done in \d+\.\d s)$", re.M)


@pytest.fixture(scope="module")
def unet_only_lora(tiny_sdxl_dir, tmp_path_factory):
    """A neutral LoRA for the tiny SDXL's UNet alone: load_lora_weights warns for both text encoders."""
    from lorabridge.architectures.sdxl.tiny import make_tiny_lora
    from lorabridge.formats.neutral import write_neutral

    path = tmp_path_factory.mktemp("unet-only") / "unet-only.safetensors"
    write_neutral(make_tiny_lora(tiny_sdxl_dir, components=("unet",)), path)
    return path


@pytest.mark.torch
def test_torch_logs_one_line_per_step_and_no_lora_key_notices(tiny_sdxl_dir, unet_only_lora, tmp_path):
    run = cli_subprocess("infer", "--backend", "torch", "--device", "cpu", "--base", tiny_sdxl_dir, "--prompt", TINY_PROMPT,
                         "--steps", "2", "--lora", unet_only_lora, "-o", tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    steps = STEP_LINE.findall(run.stderr)
    assert [s[:2] for s in steps] == [("1", "2"), ("2", "2")], run.stderr
    assert steps[0][2].startswith("ETA") and steps[1][2].startswith("done in")
    assert "LoRA applied (torch): 560 modules in unet" in run.stderr
    assert "No LoRA keys associated" not in run.stderr


def test_step_log_times_each_step_and_calls_the_next_callback():
    lines, seen = [], []
    clock = iter([10.0, 12.0, 13.0, 13.5]).__next__
    steps = StepLog(3, lines.append, clock, then=lambda pipe, i, t, kwargs: seen.append(i) or {"latents": i})
    assert [steps(None, i, 0, {}) for i in range(3)] == [{"latents": 0}, {"latents": 1}, {"latents": 2}]
    assert lines == ["step 1/3: 2.0 s, ETA 4.0 s", "step 2/3: 1.0 s, ETA 1.5 s", "step 3/3: 0.5 s, done in 3.5 s"]
    assert seen == [0, 1, 2]


def test_noise_filters_drop_only_the_known_messages(capsys):
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("mindone.diffusers.loaders.lora_base")
    handler = Keep()
    logger.addHandler(handler)
    try:
        with quiet_logs("mindone.diffusers"):
            logger.warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. ...")
            logger.warning("Loading adapter weights led to unexpected keys")
        logger.warning("No LoRA keys associated to CLIPTextModel found after the load")  # the filter is gone
    finally:
        logger.removeHandler(handler)
    assert records == ["Loading adapter weights led to unexpected keys", "No LoRA keys associated to CLIPTextModel found after the load"]
    with printed_to_stderr():
        print("🚨 Config not found for parakeet. You can manually add it to HARDCODED_CONFIG_FOR_MODELS in utils/auto_docstring.py")
        print("Config not found for clip", end="")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "Config not found for clip"
