"""The five toolbox commands on Flux.1: the tiny Flux pipeline (diffusers directory) and its transformer as a BFL
single file, where q/k/v (and a single block's q/k/v/MLP input) are row blocks of one fused ``qkv``/``linear1``.

- check: every module of the tiny LoRA fits both layouts; the fused rows are indexed per part.
- resize: a kohya Flux file (fused ``qkv``/``linear1`` with one shared lora_down, split on reading) reaches the
  Eckart-Young optimum per part.
- merge: two Flux LoRAs, exactly.
- fuse: equals diffusers' ``fuse_lora`` on ``FluxPipeline`` (transformer and CLIP-L, from our diffusers-format
  file, which diffusers loads whole); into the BFL file, each fused tensor's rows get their parts' deltas, DoRA
  parts included (each part normalised on its own rows, as on diffusers' separate layers).
- extract: (base, fuse(base, LoRA)) gives the LoRA back, in both layouts.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from lorabridge.architectures.flux1 import FLUX1
from lorabridge.converters.torch import neutral2pt
from lorabridge.deltas import dora_weight
from lorabridge.formats.neutral import read_neutral, write_neutral
from lorabridge.io.safetensors_file import SafetensorsFile
from lorabridge.model import LoraModel
from lorabridge.tensor import Tensor
from lorabridge.toolbox.base_index import index_base, open_weights
from lorabridge.toolbox.check import check_lora
from lorabridge.toolbox.extract import extract
from lorabridge.toolbox.files import read_lora
from lorabridge.toolbox.fuse import fuse
from lorabridge.toolbox.merge import merge_files
from tests.fixtures.flux import write_bfl_single_file

pytest.importorskip("diffusers")  # the tiny Flux pipeline
D0, S0 = "transformer.transformer_blocks.0", "transformer.single_transformer_blocks.0"


def weight(index, name: str) -> np.ndarray:
    """A module's weight in a model on disk (its rows of a fused tensor), found through the header index."""
    layer = index.layer(*name.split(".", 1))
    values = opened(layer.file).tensor(layer.key).to_float32()
    return values if layer.rows is None else values[layer.rows[0]:layer.rows[1]]


@functools.lru_cache(maxsize=8)
def opened(path):
    """Each weights file's header parsed once (a BFL file's 655 entries, for each of 228 modules otherwise)."""
    return open_weights(path)


def transformer_only(model: LoraModel) -> LoraModel:
    return LoraModel({n: m for n, m in model.modules.items() if m.component == "transformer"}, model.architecture)


@pytest.fixture(scope="module")
def bfl(tiny_flux_dir, tmp_path_factory):
    """The tiny Flux transformer as a BFL single file (bare double_blocks./single_blocks. names)."""
    return write_bfl_single_file(tiny_flux_dir, tmp_path_factory.mktemp("bfl") / "tiny-flux-bfl.safetensors")


@pytest.fixture(scope="module")
def transformer_lora(tiny_flux_lora_file, tmp_path_factory):
    """The tiny Flux LoRA's transformer modules (a BFL file has no text encoders)."""
    out = tmp_path_factory.mktemp("flux-t") / "transformer.safetensors"
    write_neutral(transformer_only(read_neutral(tiny_flux_lora_file)), out)
    return out


@pytest.fixture(scope="module")
def fused_dir(tiny_flux_lora_file, tiny_flux_dir, tmp_path_factory):
    return fuse(tiny_flux_lora_file, tiny_flux_dir, tmp_path_factory.mktemp("flux-fused") / "fused").output


# ---- check ---------------------------------------------------------------------------------------------------

def test_check_fits_the_directory_and_the_bfl_file_with_fused_rows_per_part(run_cli, tiny_flux_lora_file,
                                                                             transformer_lora, tiny_flux_dir, bfl):
    report = check_lora(tiny_flux_lora_file, base=tiny_flux_dir)
    assert report["loads"] and report["base"]["fits"] and report["base"]["architecture"] == FLUX1.name
    assert report["base"]["variant"] == "other widths than Flux.1-dev (696 layers differ, 278 missing)"
    index, directory = index_base(bfl), index_base(tiny_flux_dir)
    assert (index.layout, index.architecture) == ("single-file", FLUX1.name)
    assert index.layer("transformer", "transformer_blocks.0.attn.to_k").key == "double_blocks.0.img_attn.qkv.weight"
    assert [index.layer("transformer", f"single_transformer_blocks.5.{p}").rows
            for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")] == [(0, 32), (32, 64), (64, 96), (96, 224)]
    directory_tree = directory.tree()["transformer"]
    del directory_tree["norm_out.linear"]  # BFL's final_layer.adaLN_modulation.1 swaps its halves: no module of ours
    assert index.tree()["transformer"] == directory_tree
    result = run_cli("check", transformer_lora, "--base", bfl, "--target", "diffusers")
    assert result.exit_code == 0 and "fits" in result.output, result.output
    misfit = check_lora(tiny_flux_lora_file, base=bfl)  # its CLIP-L modules have no layer in a transformer file
    assert not misfit["loads"] and all(p.startswith("text_encoder.") for p in misfit["base"]["problems"])


def test_pt2neutral_and_neutral2pt_check_a_flux_base(run_cli, tiny_flux_lora_file, transformer_lora, bfl, tmp_path):
    result = run_cli("neutral2pt", transformer_lora, "--base", bfl, "--format", "kohya", "-o", tmp_path / "k.safetensors")
    assert result.exit_code == 0, result.output
    result = run_cli("pt2neutral", tmp_path / "k.safetensors", "--base", bfl, "-o", tmp_path / "n.safetensors")
    assert result.exit_code == 0, result.output
    result = run_cli("neutral2pt", tiny_flux_lora_file, "--base", bfl, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 1 and "does not fit the base" in result.output and not (tmp_path / "out.safetensors").exists()
    assert len(result.output.strip().splitlines()) == 1


# ---- resize, merge -------------------------------------------------------------------------------------------

def test_resize_a_kohya_flux_file_with_shared_fused_factors(run_cli, transformer_lora, tiny_flux_dir, tmp_path):
    model = read_neutral(transformer_lora)
    for block, parts in ((D0, ("attn.to_q", "attn.to_k", "attn.to_v")),
                         (S0, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))):
        shared = model.modules[f"{block}.{parts[0]}"].tensors["lora_A.weight"]
        for part in parts[1:]:  # kohya's default: one lora_down for the fused layer
            model.modules[f"{block}.{part}"].tensors["lora_A.weight"] = shared
    write_neutral(model, tmp_path / "shared.safetensors")
    kohya = neutral2pt(tmp_path / "shared.safetensors", tmp_path / "kohya.safetensors", format="kohya").output
    keys = SafetensorsFile(kohya).keys()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in keys
    read, _ = read_lora(kohya)  # the fused layers split back into their parts
    result = run_cli("resize", kohya, "--rank", "2", "-o", tmp_path / "r2.safetensors", "--json")
    assert result.exit_code == 0, result.output
    resized = read_neutral(tmp_path / "r2.safetensors")
    assert set(resized.modules) == set(read.modules) == set(model.modules)
    for name in (f"{D0}.attn.to_k", f"{S0}.proj_mlp", f"{D0}.ff.net.2"):
        want = read.modules[name].delta_weight()
        s = np.linalg.svd(want.astype(np.float64), compute_uv=False)
        got = resized.modules[name].delta_weight()
        assert resized.modules[name].rank == 2
        assert np.linalg.norm(got - want) / np.linalg.norm(want) == pytest.approx(np.sqrt(np.sum(s[2:] ** 2) / np.sum(s ** 2)),
                                                                                  rel=1e-4)
    assert check_lora(tmp_path / "r2.safetensors", base=tiny_flux_dir, targets=("diffusers",))["base"]["fits"]


def test_merge_two_flux_loras_exactly(tiny_flux_lora_file, tiny_flux_dir, tmp_path):
    from lorabridge.architectures.flux1.tiny import write_tiny_lora

    other = write_tiny_lora(tiny_flux_dir, tmp_path / "seed1.safetensors", seed=1)
    report = merge_files([tiny_flux_lora_file, other], tmp_path / "merged.safetensors", [0.7, -0.3])
    merged, a, b = (read_neutral(p) for p in (report.output, tiny_flux_lora_file, other))
    assert merged.architecture == FLUX1.name and set(merged.modules) == set(a.modules)
    for name in (f"{D0}.attn.to_q", f"{S0}.proj_mlp", "text_encoder.text_model.encoder.layers.1.self_attn.v_proj"):
        assert merged.modules[name].rank == a.modules[name].rank + b.modules[name].rank
        want = 0.7 * a.modules[name].delta_weight() - 0.3 * b.modules[name].delta_weight()
        np.testing.assert_allclose(merged.modules[name].delta_weight(), want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert check_lora(report.output, base=tiny_flux_dir, targets=("diffusers",))["base"]["fits"]


# ---- fuse, extract -------------------------------------------------------------------------------------------

@pytest.mark.torch
def test_fused_directory_equals_diffusers_fuse_lora_on_flux_pipeline(tiny_flux_lora_file, tiny_flux_dir, fused_dir,
                                                                     tmp_path):
    torch = pytest.importorskip("torch")
    from diffusers import FluxPipeline

    from tests.fixtures.torch_lora import torch_layer

    lora = neutral2pt(tiny_flux_lora_file, tmp_path / "pytorch_lora_weights.safetensors", format="diffusers").output
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora(components=["transformer", "text_encoder"])
    index, model = index_base(fused_dir), read_neutral(tiny_flux_lora_file)
    assert {m.component for m in model.modules.values()} == {"transformer", "text_encoder"}
    for name in model.modules:  # float32 sums in another order: a few ulps
        np.testing.assert_allclose(weight(index, name), torch_layer(pipe, name).weight.detach().numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


def test_fuse_into_bfl_gives_fused_rows_their_parts_deltas(transformer_lora, bfl, fused_dir, tmp_path):
    result = fuse(transformer_lora, bfl, tmp_path / "fused-bfl.safetensors")
    model = read_neutral(transformer_lora)
    assert result.fused_modules == len(model.modules)
    # 19 double blocks: img/txt qkv (3 parts each) + 6 more; 38 single blocks: linear1 (4 parts) + linear2
    assert result.fused_tensors == 19 * 8 + 38 * 2
    fused, directory, base = index_base(result.output), index_base(fused_dir), SafetensorsFile(bfl)
    for name in model.modules:  # the same float32 math on a row block as on the separate layer
        np.testing.assert_array_equal(weight(fused, name), weight(directory, name), err_msg=name)
    out = SafetensorsFile(result.output)
    targeted = {fused.layer(*n.split(".", 1)).key for n in model.modules}
    for key in base.keys():
        assert (bytes(out.tensor(key).data) == bytes(base.tensor(key).data)) != (key in targeted), key


def test_dora_parts_of_a_fused_layer_are_normalised_on_their_own_rows(transformer_lora, tiny_flux_dir, bfl, tmp_path):
    rng, model = np.random.default_rng(3), read_neutral(transformer_lora)
    parts = [f"{D0}.attn.to_{p}" for p in "qkv"] + [f"{S0}.attn.to_q", f"{S0}.proj_mlp"]
    dora = LoraModel({n: model.modules[n] for n in parts}, FLUX1.name)
    for name in parts:
        module = dora.modules[name]
        magnitude = rng.uniform(0.5, 2.0, (module.weight_shape[0], 1)).astype(np.float32)
        module.tensors["dora_scale"], module.dora_axis = Tensor.from_numpy(magnitude), "out"
    write_neutral(dora, tmp_path / "dora.safetensors")
    base = index_base(tiny_flux_dir)
    directory = index_base(fuse(tmp_path / "dora.safetensors", tiny_flux_dir, tmp_path / "dir").output)
    single = index_base(fuse(tmp_path / "dora.safetensors", bfl, tmp_path / "bfl.safetensors").output)
    for name, module in read_neutral(tmp_path / "dora.safetensors").modules.items():
        want = dora_weight(weight(base, name), module.delta_weight(), module.tensors["dora_scale"].to_float32(), "out")
        np.testing.assert_allclose(weight(directory, name), want, rtol=1e-6, atol=1e-7, err_msg=name)
        np.testing.assert_array_equal(weight(single, name), weight(directory, name), err_msg=name)
        assert np.allclose(np.linalg.norm(weight(single, name), axis=1), module.tensors["dora_scale"].to_float32()[:, 0])


def test_extract_gives_the_flux_lora_back_in_both_layouts(tiny_flux_lora_file, transformer_lora, tiny_flux_dir, bfl,
                                                          fused_dir, tmp_path):
    for lora, base, tuned in ((tiny_flux_lora_file, tiny_flux_dir, fused_dir),
                              (transformer_lora, bfl, fuse(transformer_lora, bfl, tmp_path / "tuned.safetensors").output)):
        want = read_neutral(lora)
        result = extract(base, tuned, tmp_path / f"x-{base.name}.safetensors", rank=4)
        got = read_neutral(result.output)
        assert set(got.modules) == set(want.modules) and got.architecture == FLUX1.name
        assert max(result.errors.values()) < 1e-5
        for name, module in want.modules.items():
            expected = module.delta_weight()
            np.testing.assert_allclose(got.modules[name].delta_weight(), expected,
                                       atol=1e-5 * float(np.abs(expected).max()), err_msg=name)
