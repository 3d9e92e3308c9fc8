"""``fuse``: the base with a LoRA merged in, in the base's own layout, against diffusers' fuse_lora and infer."""

from __future__ import annotations

import numpy as np
import pytest

from lorabridge.converters.torch import neutral2pt
from lorabridge.errors import LoraBridgeError
from lorabridge.formats.neutral import read_neutral, write_neutral
from lorabridge.io.ms_ckpt import write_ms_checkpoint
from lorabridge.io.safetensors_file import SafetensorsFile
from lorabridge.toolbox.base_index import index_base, open_weights
from lorabridge.toolbox.fuse import fuse
from tests.fixtures.core import make_lora_model
from tests.fixtures.sdxl import TINY_PROMPT
from tests.fixtures.torch_lora import COMPONENTS, torch_layer

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def weight(index, name: str) -> np.ndarray:
    """A module's weight in a (fused) model on disk, found through its header index."""
    layer = index.layer(*name.split(".", 1))
    values = open_weights(layer.file).tensor(layer.key).to_float32()
    return values if layer.rows is None else values[layer.rows[0]:layer.rows[1]]


@pytest.fixture(scope="module")
def fused_dir(varied_neutral, tiny_sdxl_dir, tmp_path_factory):
    return fuse(varied_neutral, tiny_sdxl_dir, tmp_path_factory.mktemp("fused") / "fused").output


def test_fused_directory_equals_diffusers_fuse_lora(varied_neutral, tiny_pipe_factory, fused_dir, tmp_path):
    model = read_neutral(varied_neutral)
    lora = neutral2pt(varied_neutral, tmp_path / "pytorch_lora_weights.safetensors").output
    pipe = tiny_pipe_factory()
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora(components=list(COMPONENTS))
    index = index_base(fused_dir)
    for name in model.modules:  # float32 sums in another order: a few ulps (measured: max 3.8e-6 on |W| up to ~10)
        np.testing.assert_allclose(weight(index, name), torch_layer(pipe, name).weight.detach().numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


def test_untouched_tensors_and_files_are_the_base_bytes(varied_neutral, tiny_sdxl_dir, fused_dir):
    model = read_neutral(varied_neutral)
    for path in tiny_sdxl_dir.rglob("*"):
        out = fused_dir / path.relative_to(tiny_sdxl_dir)
        assert out.exists(), out
        if path.suffix != ".safetensors":
            assert path.is_dir() or out.read_bytes() == path.read_bytes()
            continue
        base, fused = SafetensorsFile(path), SafetensorsFile(out)
        assert fused.keys() == base.keys() and fused.metadata == base.metadata
        component = path.parent.name
        for key in base.keys():
            targeted = f"{component}.{key.removesuffix('.weight')}" in model.modules
            assert fused.header_entry(key) == base.header_entry(key)
            assert (bytes(fused.tensor(key).data) == bytes(base.tensor(key).data)) != targeted, key


def test_single_file_and_mindone_ckpt_fuse_like_the_directory(varied_neutral, tiny_sdxl_single_file, fused_dir, tmp_path):
    model = read_neutral(varied_neutral)
    ckpt = tmp_path / "tiny-sdxl.ckpt"  # the single file's tensors under the same SGM names, as a MindONE .ckpt
    write_ms_checkpoint(ckpt, SafetensorsFile(tiny_sdxl_single_file).tensors())
    directory = index_base(fused_dir)
    for base, out in ((tiny_sdxl_single_file, tmp_path / "fused.safetensors"), (ckpt, tmp_path / "fused.ckpt")):
        result = fuse(varied_neutral, base, out)
        assert result.fused_modules == len(model.modules)
        index = index_base(out)
        assert index.layout == ("mindone-ckpt" if out.suffix == ".ckpt" else "single-file")
        for name in model.modules:  # bigG's q/k/v are row blocks of one in_proj there
            np.testing.assert_array_equal(weight(index, name), weight(directory, name), err_msg=name)


def test_fused_base_without_lora_draws_the_unfused_base_with_lora(run_cli, tiny_sdxl_dir, tiny_lora_file, tmp_path):
    from lorabridge.adapters.png import read_png

    fused = fuse(tiny_lora_file, tiny_sdxl_dir, tmp_path / "fused-base").output
    images = {}
    for name, args in {"fused": ("--base", fused), "lora": ("--base", tiny_sdxl_dir, "--lora", tiny_lora_file),
                       "base": ("--base", tiny_sdxl_dir)}.items():
        result = run_cli("infer", "--backend", "torch", *args, "--prompt", TINY_PROMPT, "--steps", "2", "--device", "cpu",
                         "-o", tmp_path / name)
        assert result.exit_code == 0, result.output
        images[name] = read_png(tmp_path / name / "000-seed0.png")[0].astype(np.float64)
    assert np.abs(images["fused"] - images["lora"]).mean() <= 0.5
    assert np.abs(images["lora"] - images["base"]).mean() > 5


def test_scale_and_dtype_kept(tiny_lora_file, tiny_sdxl_single_file, tmp_path):
    half = fuse(tiny_lora_file, tiny_sdxl_single_file, tmp_path / "half.safetensors", scale=0.5).output
    whole = fuse(tiny_lora_file, tiny_sdxl_single_file, tmp_path / "whole.safetensors").output
    base, half_index, whole_index = index_base(tiny_sdxl_single_file), index_base(half), index_base(whole)
    name = next(iter(read_neutral(tiny_lora_file).modules))
    np.testing.assert_allclose(weight(half_index, name) - weight(base, name),
                               0.5 * (weight(whole_index, name) - weight(base, name)), atol=1e-6)
    assert SafetensorsFile(half).header_entry(base.layer(*name.split(".", 1)).key)[0] == "F32"


def test_refuses_a_lora_that_does_not_fit_and_an_existing_output(run_cli, tiny_sdxl_dir, tiny_lora_file, tmp_path):
    real_size = tmp_path / "real-size.safetensors"  # SDXL-base widths: no layer of the tiny base has them
    write_neutral(make_lora_model(), real_size)
    result = run_cli("fuse", real_size, "--base", tiny_sdxl_dir, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "does not fit the base" in result.output and not (tmp_path / "out").exists()
    assert len(result.output.strip().splitlines()) == 1
    (tmp_path / "taken").mkdir()
    result = run_cli("fuse", tiny_lora_file, "--base", tiny_sdxl_dir, "-o", tmp_path / "taken")
    assert result.exit_code == 1 and "output exists" in result.output and not any((tmp_path / "taken").iterdir())
    with pytest.raises(LoraBridgeError, match="base model not found"):
        fuse(tiny_lora_file, tmp_path / "missing", tmp_path / "x")


def test_pickled_weights_beside_the_safetensors_are_refused_in_one_line(run_cli, tiny_sdxl_dir, tiny_lora_file, tmp_path):
    import shutil

    base = tmp_path / "with-bin"
    shutil.copytree(tiny_sdxl_dir, base)
    (base / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"stale")  # fuse would copy it unfused
    result = run_cli("fuse", tiny_lora_file, "--base", base, "-o", tmp_path / "out")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "unet/diffusion_pytorch_model.bin" in result.output and "copied unfused" in result.output
    assert not (tmp_path / "out").exists()
