"""``infer --backend mindspore`` on CPU (through lorabridge's op adapter) and parity with the torch backend.

The seed's consistency test made automatic: one neutral file, one prompt, the same initial
latents, SDXL's DDPM discretization (``euler``), fp32. MindSpore runs only in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lorabridge.compare import compare_paths
from tests.fixtures.sdxl import TINY_PROMPT

pytestmark = [pytest.mark.torch, pytest.mark.mindspore, pytest.mark.slow]


def cli_subprocess(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    """The lorabridge CLI in a fresh Python (MindSpore never enters the test process)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GLOG_v": "3", "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-c", "from lorabridge.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def parity_images(tiny_sdxl_dir, tiny_lora_file, tmp_path_factory):
    """torch LoRA / torch base / mindspore LoRA images of the tiny SDXL from one noise file."""
    pytest.importorskip("mindspore")
    from click.testing import CliRunner

    from lorabridge.cli import cli

    tmp = tmp_path_factory.mktemp("parity")
    common = ["--base", tiny_sdxl_dir, "--prompt", TINY_PROMPT, "--steps", "3", "--scheduler", "euler", "--dtype", "fp32"]
    torch_run = CliRunner().invoke(cli, list(map(str, ["infer", "--backend", "torch", *common, "--lora", tiny_lora_file,
                                                       "--save-latents", tmp / "noise.npy", "-o", tmp / "torch"])))
    assert torch_run.exit_code == 0, torch_run.output
    base_run = CliRunner().invoke(cli, list(map(str, ["infer", "--backend", "torch", *common,
                                                      "--init-latents", tmp / "noise.npy", "-o", tmp / "base"])))
    assert base_run.exit_code == 0, base_run.output
    ms_run = cli_subprocess("infer", "--backend", "mindspore", "--device", "CPU", *common, "--lora", tiny_lora_file,
                            "--init-latents", tmp / "noise.npy", "-o", tmp / "mindspore")
    assert ms_run.returncode == 0, ms_run.stderr[-3000:]
    return {"dir": tmp, "log": ms_run.stderr, "stdout": ms_run.stdout}


def test_mindspore_backend_applies_every_module_and_writes_the_image(parity_images):
    assert "LoRA applied (mindspore): 8 modules in text_encoder, 8 modules in text_encoder_2\n" in parity_images["log"]
    assert "LoRA applied (mindspore): 560 modules in unet\n" in parity_images["log"]
    assert parity_images["stdout"].split() == [str(parity_images["dir"] / "mindspore" / "000-seed0.png")]


def test_torch_and_mindspore_images_agree_below_half_a_level(parity_images):
    d = parity_images["dir"]
    report = compare_paths(d / "torch", d / "mindspore", output=d / "diff", max_mae=0.5)
    row, = report["pairs"]
    print(f"\nparity torch vs mindspore (tiny SDXL, fp32, 3 euler steps): MAE {row['mae']:.6f}, max {row['max_error']}")
    assert report["passed"], row
    assert (d / "diff" / "000-seed0.png").is_file()


def test_the_lora_matters_far_more_than_the_backend(parity_images):
    d = parity_images["dir"]
    cross = compare_paths(d / "torch", d / "mindspore")["pairs"][0]["mae"]
    lora_effect_torch = compare_paths(d / "torch", d / "base")["pairs"][0]["mae"]
    lora_effect_mindspore = compare_paths(d / "mindspore", d / "base")["pairs"][0]["mae"]
    assert lora_effect_torch > 5 and lora_effect_mindspore > 5
    assert min(lora_effect_torch, lora_effect_mindspore) > 20 * max(cross, 0.05)


def test_cli_compare_exit_status(parity_images, run_cli):
    d = parity_images["dir"]
    assert run_cli("compare", d / "torch", d / "mindspore").exit_code == 0
    result = run_cli("compare", d / "torch", d / "base", "--json")
    assert result.exit_code == 1 and json.loads(result.output)["pairs"][0]["mae"] > 5


def test_fused_lora_and_bad_input_in_mindspore(tiny_sdxl_dir, tiny_lora_file, parity_images, mindspore_run, tmp_path):
    from lorabridge.formats.neutral import write_neutral
    from lorabridge.architectures.sdxl.tiny import make_tiny_lora

    other = make_tiny_lora(tiny_sdxl_dir, components=("unet",))
    wrong = other.modules.pop("unet.mid_block.attentions.0.transformer_blocks.9.attn2.to_k")
    wrong.name = "unet.mid_block.attentions.0.transformer_blocks.10.attn2.to_k"  # SDXL has 10 blocks, numbered 0-9
    other.add(wrong)
    write_neutral(other, tmp_path / "mismatch.safetensors")
    result = mindspore_run("""
        import sys, json
        from pathlib import Path
        from lorabridge.adapters.infer import infer
        from lorabridge.adapters.options import InferOptions
        from lorabridge.errors import LoraBridgeError
        base, lora, noise, tmp = map(Path, sys.argv[1:5])
        def run(**kw):
            options = dict(backend="mindspore", base=base, prompt=sys.argv[5], steps=3, dtype="fp32", lora=lora,
                           init_latents=noise, output=tmp / "fused")
            try:
                return str(infer(InferOptions(**{**options, **kw})).images[0])
            except LoraBridgeError as exc:
                return "error: " + exc.one_line()
        print(json.dumps({"fused": run(fuse=True), "ascend": run(device="Ascend", output=tmp / "a"),
                          "mismatch": run(lora=tmp / "mismatch.safetensors", output=tmp / "m")}))
    """, tiny_sdxl_dir, tiny_lora_file, parity_images["dir"] / "noise.npy", tmp_path, TINY_PROMPT)
    assert result["mismatch"].startswith("error:") and "does not match the base model: 1 of 560 modules" in result["mismatch"]
    assert "transformer_blocks.10.attn2.to_k (not in base)" in result["mismatch"]
    assert result["ascend"].startswith("error:") and "'Ascend' is not available" in result["ascend"]
    fused = compare_paths(parity_images["dir"] / "torch" / "000-seed0.png", result["fused"])["pairs"][0]
    assert fused["mae"] < 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused", "mismatch.safetensors"]


def test_mindspore_needs_a_pipeline_directory(run_cli, tmp_path):
    pytest.importorskip("mindspore")
    from lorabridge.formats.neutral import write_neutral
    from lorabridge.io.safetensors_file import write_safetensors
    from lorabridge.tensor import Tensor
    from tests.fixtures.core import make_lora_model

    single = tmp_path / "sdxl.safetensors"
    write_safetensors(single, {"conditioner.embedders.1.model.positional_embedding": Tensor.from_numpy(np.zeros((77, 8), np.float32))}, {})
    write_neutral(make_lora_model(), tmp_path / "lora.safetensors")
    result = cli_subprocess("infer", "--backend", "mindspore", "--base", single, "--lora", tmp_path / "lora.safetensors",
                            "--prompt", "x", "-o", tmp_path / "o")
    last = result.stderr.splitlines()[-1]
    assert result.returncode == 1 and "needs a diffusers pipeline directory" in last
    assert f"StableDiffusionXLPipeline.from_single_file('{single}').save_pretrained('{tmp_path / 'sdxl'}')" in last
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def scheduler_images(tiny_sdxl_dir, parity_images, tmp_path_factory):
    """Every scheduler but euler (the parity fixture's) for 2 steps on both backends, from the parity noise.

    torch runs in the test process; MindSpore runs all schedulers in one subprocess (one start-up).
    """
    from lorabridge.adapters.infer import infer
    from lorabridge.adapters.options import SCHEDULERS, InferOptions
    from tests.fixtures.mindspore import run_mindspore

    tmp, noise = tmp_path_factory.mktemp("schedulers"), parity_images["dir"] / "noise.npy"
    names = [name for name in SCHEDULERS if name != "euler"]
    common = dict(base=tiny_sdxl_dir, prompt=TINY_PROMPT, steps=2, dtype="fp32", init_latents=noise)
    torch_images = {name: str(infer(InferOptions(backend="torch", scheduler=name, output=tmp / f"torch-{name}",
                                                  **common)).images[0]) for name in names}
    ms_images = run_mindspore("""
        import json, sys
        from pathlib import Path
        from lorabridge.adapters.infer import infer
        from lorabridge.adapters.options import InferOptions
        base, noise, out, prompt, names = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5:]
        print(json.dumps({name: str(infer(InferOptions(backend="mindspore", device="CPU", scheduler=name, base=base,
                                                       prompt=prompt, steps=2, dtype="fp32", init_latents=noise,
                                                       output=out / f"mindspore-{name}")).images[0]) for name in names}))
    """, tiny_sdxl_dir, noise, tmp, TINY_PROMPT, *names)
    return {name: (torch_images[name], ms_images[name]) for name in names}


def test_every_scheduler_runs_on_both_backends_and_deterministic_ones_agree(scheduler_images):
    from lorabridge.adapters.options import SCHEDULERS

    assert sorted(scheduler_images) == sorted(name for name in SCHEDULERS if name != "euler")
    for name, (torch_image, ms_image) in scheduler_images.items():
        row, = compare_paths(torch_image, ms_image)["pairs"]
        print(f"\n{name}: torch vs mindspore MAE {row['mae']:.4f}, max {row['max_error']}")
        if SCHEDULERS[name][2]:  # deterministic: the same noise gives the same image
            assert row["mae"] < 0.5, (name, row)
