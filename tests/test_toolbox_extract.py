"""``extract``: tuned - base per layer by truncated SVD, checked on (base, fuse(base, LoRA)) and Eckart-Young."""

from __future__ import annotations

import numpy as np
import pytest

from lorabridge.errors import LoraBridgeError
from lorabridge.formats.neutral import read_neutral
from lorabridge.toolbox.extract import extract
from lorabridge.toolbox.fuse import fuse

pytest.importorskip("diffusers")  # the tiny pipeline fixtures


@pytest.fixture(scope="module")
def tuned(tiny_lora_file, tiny_sdxl_dir, tmp_path_factory):
    """The tiny base with the rank-4 tiny LoRA fused in (float32)."""
    return fuse(tiny_lora_file, tiny_sdxl_dir, tmp_path_factory.mktemp("tuned") / "tuned").output


def test_rank_at_least_the_loras_recovers_its_delta(tiny_lora_file, tiny_sdxl_single_file, tuned, tmp_path):
    lora = read_neutral(tiny_lora_file)
    for rank in (4, 6):  # the base as a single file, the tuned model as a directory: any mix of layouts
        result = extract(tiny_sdxl_single_file, tuned, tmp_path / f"r{rank}.safetensors", rank=rank)
        got = read_neutral(result.output)
        assert set(got.modules) == set(lora.modules) and result.skipped > 0
        assert {m.rank for m in got.modules.values()} == {rank}  # above 4: fp32 rounding noise, near-zero values
        for name, module in lora.modules.items():
            want = module.delta_weight()
            np.testing.assert_allclose(got.modules[name].delta_weight(), want, atol=1e-5 * float(np.abs(want).max()),
                                       err_msg=name)
        assert max(result.errors.values()) < 1e-5


def test_lower_rank_error_is_the_eckart_young_optimum(tiny_lora_file, tiny_sdxl_dir, tuned, tmp_path):
    lora = read_neutral(tiny_lora_file)
    result = extract(tiny_sdxl_dir, tuned, tmp_path / "r2.safetensors", rank=2)
    got = read_neutral(result.output)
    for name, module in list(lora.modules.items())[::25]:
        want = module.delta_weight().astype(np.float64)
        s = np.linalg.svd(want.reshape(want.shape[0], -1), compute_uv=False)
        optimum = np.sqrt(np.sum(s[2:] ** 2)) / np.sqrt(np.sum(s ** 2))
        assert result.errors[name] == pytest.approx(optimum, rel=1e-4), name
        actual = np.linalg.norm(got.modules[name].delta_weight() - want) / np.linalg.norm(want)
        assert actual == pytest.approx(optimum, rel=1e-3), name
    assert got.modules[name].rank == 2 and got.modules[name].alpha == 2


def test_min_diff_unchanged_models_and_outputs_refused(run_cli, tiny_sdxl_dir, tuned, tmp_path):
    with pytest.raises(LoraBridgeError, match="nothing to extract"):
        extract(tiny_sdxl_dir, tiny_sdxl_dir, tmp_path / "none.safetensors", rank=4)
    with pytest.raises(LoraBridgeError, match="nothing to extract"):
        extract(tiny_sdxl_dir, tuned, tmp_path / "none.safetensors", rank=4, min_diff=1e3)
    assert not (tmp_path / "none.safetensors").exists()
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep")
    result = run_cli("extract", "--base", tiny_sdxl_dir, "--tuned", tuned, "--rank", "4", "-o", out)
    assert result.exit_code == 1 and "output exists" in result.output and out.read_bytes() == b"keep"
    result = run_cli("extract", "--base", tiny_sdxl_dir, "--tuned", tuned, "--rank", "4", "-o", out, "--force", "--json")
    assert result.exit_code == 0 and '"skipped_unchanged"' in result.output


def test_conv_extracts_resnet_conv_loras_only_when_asked(tiny_sdxl_dir, tmp_path):
    from lorabridge.formats.neutral import write_neutral
    from lorabridge.toolbox.base_index import index_base
    from tests.fixtures.core import make_lora_model

    index = index_base(tiny_sdxl_dir)  # the first resnet of each UNet block, as (in, out, kh, kw)
    convs = {f"unet.{p}": (layer.shape[1], layer.shape[0], *layer.shape[2:]) for p, layer in index.modules["unet"].items()
             if ".resnets.0.conv" in p and len(layer.shape) == 4}
    assert {s[2:] for s in convs.values()} == {(3, 3), (1, 1)}  # conv1/conv2 and the 1x1 conv_shortcut
    lora = make_lora_model(convs, rank=2, alpha=4.0)
    lora.architecture = index.architecture
    write_neutral(lora, tmp_path / "conv.safetensors")
    tuned = fuse(tmp_path / "conv.safetensors", tiny_sdxl_dir, tmp_path / "tuned").output
    with pytest.raises(LoraBridgeError, match="nothing to extract"):  # Linear layers only: none changed
        extract(tiny_sdxl_dir, tuned, tmp_path / "linear.safetensors", rank=2)
    result = extract(tiny_sdxl_dir, tuned, tmp_path / "conv-r2.safetensors", rank=2, conv=True)
    got = read_neutral(result.output)
    assert set(got.modules) == set(lora.modules) and max(result.errors.values()) < 1e-5
    for name, module in lora.modules.items():
        assert got.modules[name].tensors["lora_B.weight"].shape[2:] == (1, 1)
        want = module.delta_weight()
        np.testing.assert_allclose(got.modules[name].delta_weight(), want, atol=1e-5 * float(np.abs(want).max()), err_msg=name)
