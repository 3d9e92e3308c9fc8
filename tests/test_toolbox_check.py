"""``check``: per-target verdicts, loader scale rules, the fit to a real base (headers only), and the base index."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lorabridge.converters.torch import neutral2pt
from lorabridge.formats.neutral import write_neutral
from lorabridge.io.safetensors_file import SafetensorsFile, write_safetensors
from lorabridge.toolbox.base_index import index_base, single_file_modules
from lorabridge.toolbox.check import check_lora
from tests.fixtures.core import make_lora_model


def test_tiny_lora_fits_its_base_and_loads_everywhere_mindone_sgm_drops_bigg_qkv(tiny_lora_file, tiny_sdxl_dir):
    report = check_lora(tiny_lora_file, base=tiny_sdxl_dir)
    assert report["loads"] and report["base"]["fits"] and report["base"]["architecture"] == "stable-diffusion-xl-v1-base"
    assert all(t["loads"] and not t["unmatched"] for n, t in report["targets"].items() if n != "mindone-sgm")
    sgm = report["targets"]["mindone-sgm"]
    assert len(sgm["unmatched"]) == 6 and all("text_encoder_2" in n and "out_proj" not in n for n in sgm["unmatched"])
    assert any("folded into lora_B" in p for p in sgm["problems"])


def test_single_file_and_directory_index_alike(tiny_sdxl_dir, tiny_sdxl_single_file):
    directory, single = index_base(tiny_sdxl_dir), index_base(tiny_sdxl_single_file)
    assert (directory.layout, single.layout) == ("diffusers", "single-file")
    for component, modules in single.modules.items():
        for path, layer in modules.items():
            assert directory.layer(component, path).shape == layer.shape, (component, path)
    q = single.layer("text_encoder_2", "text_model.encoder.layers.0.self_attn.v_proj")
    assert q.key.endswith("attn.in_proj_weight") and q.rows == (2 * q.shape[0], 3 * q.shape[0])


def test_fp16_variant_and_shards_are_indexed(tiny_sdxl_dir, tmp_path):
    base = tmp_path / "variant"
    shutil.copytree(tiny_sdxl_dir, base)
    unet = base / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    encoder = SafetensorsFile(base / "text_encoder" / "model.safetensors").tensors()
    keys = list(encoder)
    halves = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        write_safetensors(base / "text_encoder" / name, {k: encoder[k] for k in part})
    (base / "text_encoder" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, part in halves.items() for k in part}}))
    (base / "text_encoder" / "model.safetensors").unlink()
    index = index_base(base)
    assert index.layer("unet", "conv_in").file.name == "diffusion_pytorch_model.fp16.safetensors"
    assert index.tree() == index_base(tiny_sdxl_dir).tree()
    assert len(index.files) == 5  # unet, two shards, text_encoder_2, vae


def test_flux_bfl_names_and_fused_rows():
    assert list(single_file_modules("double_blocks.0.img_attn.qkv", (9216, 3072))) == [
        ("flux-1-dev", "transformer", f"transformer_blocks.0.attn.to_{p}", (i * 3072, (i + 1) * 3072))
        for i, p in enumerate("qkv")]
    parts = list(single_file_modules("model.diffusion_model.single_blocks.3.linear1", (21504, 3072)))
    assert [p[3] for p in parts] == [(0, 3072), (3072, 6144), (6144, 9216), (9216, 21504)]
    assert list(single_file_modules("first_stage_model.decoder.conv_in", (512, 4, 3, 3))) == []


def test_misfit_base_is_named_and_exit_1(run_cli, tiny_sdxl_dir, tmp_path):
    real_size = tmp_path / "real.safetensors"
    write_neutral(make_lora_model(), real_size)
    result = run_cli("check", real_size, "--base", tiny_sdxl_dir, "--json")
    report = json.loads(result.output)
    assert result.exit_code == 1 and not report["loads"] and report["base"]["misfits"] == len(report["base"]["problems"]) > 0
    flux = make_lora_model({"transformer.transformer_blocks.0.attn.to_q": (3072, 3072)})
    flux.architecture = "flux-1-dev"
    write_neutral(flux, tmp_path / "flux.safetensors")
    report = check_lora(tmp_path / "flux.safetensors", base=tiny_sdxl_dir)
    assert not report["loads"] and report["base"]["made_for"].startswith("Flux.1")
    assert not report["targets"]["mindone-sgm"]["loads"] and report["targets"]["diffusers"]["loads"]


@pytest.mark.filterwarnings("ignore:.*no alpha stored")
def test_diffusers_alpha_rules_for_files_as_they_are(tiny_lora_file, tmp_path):
    kohya = neutral2pt(tiny_lora_file, tmp_path / "kohya.safetensors", format="kohya").output
    tensors, metadata = SafetensorsFile(kohya).tensors(), SafetensorsFile(kohya).metadata
    dropped = [k for k in tensors if k.endswith(".alpha")][:2]  # two modules lose their alpha (8; rank 4)
    partial = tmp_path / "partial.safetensors"
    write_safetensors(partial, {k: t for k, t in tensors.items() if k not in dropped}, metadata)
    problems = check_lora(partial, targets=("diffusers", "comfyui"))["targets"]
    assert any("most common alpha (8)" in p for p in problems["diffusers"]["problems"])
    assert not any("alpha" in p for p in problems["comfyui"]["problems"])

    # No metadata, first module cut to rank 2, the others rank 4: diffusers takes alpha = 2 for all.
    bare = neutral2pt(tiny_lora_file, tmp_path / "diffusers.safetensors").output
    plain = {k: t for k, t in SafetensorsFile(bare).tensors().items()}
    first = next(k for k in plain if k.endswith("lora_A.weight"))
    a = plain[first].to_numpy()[:2]
    plain[first] = type(plain[first]).from_numpy(np.ascontiguousarray(a))
    b_key = first.replace("lora_A", "lora_B")
    plain[b_key] = type(plain[b_key]).from_numpy(np.ascontiguousarray(plain[b_key].to_numpy()[:, :2]))
    write_safetensors(tmp_path / "bare.safetensors", plain)
    report = check_lora(tmp_path / "bare.safetensors", targets=("diffusers",))
    assert any("first module's rank (2)" in p for p in report["targets"]["diffusers"]["problems"])


def test_pt2neutral_and_neutral2pt_refuse_a_misfit_base(run_cli, tiny_sdxl_dir, tiny_lora_file, tmp_path):
    real_size = tmp_path / "real.safetensors"
    write_neutral(make_lora_model(), real_size)
    result = run_cli("neutral2pt", real_size, "--base", tiny_sdxl_dir, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 1 and "does not fit the base" in result.output and not (tmp_path / "out.safetensors").exists()
    result = run_cli("neutral2pt", tiny_lora_file, "--base", tiny_sdxl_dir, "--format", "kohya", "-o", tmp_path / "k.safetensors")
    assert result.exit_code == 0, result.output
    result = run_cli("pt2neutral", tmp_path / "k.safetensors", "--base", tiny_sdxl_dir, "-o", tmp_path / "n.safetensors")
    assert result.exit_code == 0, result.output


def test_bad_inputs_are_one_line(run_cli, tiny_lora_file, tmp_path):
    for args, expected in (((tiny_lora_file, "--base", tmp_path / "missing"), "base model not found"),
                           ((tiny_lora_file, "--target", "nope"), "unknown target"),
                           ((tmp_path / "none.safetensors",), "none.safetensors")):
        result = run_cli("check", *args)
        assert result.exit_code == 1 and expected in result.output and len(result.output.strip().splitlines()) == 1


def test_a_target_storing_no_alpha_does_not_load_an_fp8_lora_b_that_convert_cannot_fold(tmp_path):
    """MindONE files store no alpha: convert folds alpha/rank into lora_B, in numpy, which has no FP8 type, and so
    refuses an FP8 lora_B; check says so for those targets, and nothing changes for targets that store alpha."""
    from lorabridge.model import LoraModel, LoraModule
    from lorabridge.tensor import Tensor
    from lorabridge.toolbox.check import TARGETS, check_target

    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    a = Tensor.from_numpy(np.ones((4, 640), np.float32))
    model = LoraModel()
    for alpha in (8.0, 4.0):  # alpha != rank folds; alpha == rank has nothing to fold
        model.modules.clear()
        model.add(LoraModule(name, "lora", {"lora_A.weight": a, "lora_B.weight": Tensor("F8_E4M3", (640, 4), bytes(2560))}, alpha))
        verdicts = {target: check_target(model, TARGETS[target], "neutral") for target in ("mindone-sgm", "mindone-diffusers", "kohya")}
        folds = alpha != 4.0
        assert [v["loads"] for v in verdicts.values()] == [not folds, not folds, True]
        said = [p for v in verdicts.values() for p in v["problems"] if "F8_E4M3" in p]
        assert len(said) == (2 if folds else 0)
        assert all(f"{name}.lora_B.weight is F8_E4M3, which folding alpha/rank into lora_B for" in p for p in said)
