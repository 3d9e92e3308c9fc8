"""The tiny SDXL: SDXL-base's module tree at small widths, reproducible, loadable by diffusers and mindone."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import numpy as np
import pytest

from lorabridge.formats.neutral import read_neutral
from lorabridge.architectures.sdxl.tiny import build_tiny, lora_shapes, make_tiny_lora
from tests.fixtures.sdxl import TINY_PROMPT, load_diffusers_pipeline

pytestmark = pytest.mark.torch


def tree_digest(path) -> dict[str, str]:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.rglob("*")) if f.is_file()}


def test_same_seed_gives_identical_files(tiny_sdxl_dir, tmp_path):
    again = build_tiny(tmp_path / "again", seed=0)
    assert tree_digest(again) == tree_digest(tiny_sdxl_dir)


def test_has_sdxl_base_transformer_depths_and_lora_targets(tiny_sdxl_dir):
    shapes = lora_shapes(tiny_sdxl_dir)
    blocks = Counter(re.match(r"unet\.((?:down|up)_blocks\.\d|mid_block)", name).group(1)
                     for name in shapes if name.endswith("attn1.to_q"))
    # SDXL-base: transformer depth 1/2/10 per level, two attention stacks down, three up, a 10-deep mid block.
    assert blocks == {"down_blocks.1": 2 * 2, "down_blocks.2": 2 * 10, "mid_block": 10,
                      "up_blocks.0": 3 * 10, "up_blocks.1": 3 * 2}
    assert len(shapes) == 560  # as many attention projections as the real SDXL UNet
    assert shapes["unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"] == (64, 80)  # 80 = 32 + 48, both encoders


def test_tokenizer_covers_every_byte_and_merges_words(tiny_sdxl_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_sdxl_dir / "tokenizer_2"))
    ids = tokenizer("a photo of a cat, 猫").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.convert_ids_to_tokens(ids[1:6]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]


def test_generates_in_diffusers(tiny_sdxl_dir):
    import torch

    pipe = load_diffusers_pipeline(tiny_sdxl_dir)
    images = pipe(TINY_PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3)  # native size: 8x8 latents, VAE factor 8 as in SDXL
    assert np.isfinite(images).all() and images.std() > 0.01


def test_tiny_lora_is_valid_non_zero_and_loads_in_diffusers(tiny_sdxl_dir, tiny_lora_file):
    model = read_neutral(tiny_lora_file, verify_hash=True)
    assert model.summary()["per_component"] == {"unet": 560, "text_encoder": 8, "text_encoder_2": 8}
    assert all(np.abs(m.tensors["lora_B.weight"].to_numpy()).max() > 0 for m in model.modules.values())
    assert make_tiny_lora(tiny_sdxl_dir, seed=0).tensors().keys() == model.tensors().keys()
    pipe = load_diffusers_pipeline(tiny_sdxl_dir)
    pipe.load_lora_weights(str(tiny_lora_file.parent), weight_name=tiny_lora_file.name, adapter_name="t")
    layers = [m for _, m in pipe.unet.named_modules() if "t" in getattr(m, "lora_A", {})]
    assert len(layers) == 560 and {m.scaling["t"] for m in layers} == {model.modules[next(iter(model.modules))].scale}


@pytest.mark.mindspore
@pytest.mark.slow
def test_loads_in_mindone_with_the_same_weights(tiny_sdxl_dir, mindspore_run):
    result = mindspore_run("""
        import sys, json
        import numpy as np
        from tests.fixtures.sdxl import load_mindone_pipeline
        pipe = load_mindone_pipeline(sys.argv[1])
        weights = {name: p.asnumpy() for name, p in pipe.unet.parameters_and_names()}
        print(json.dumps({"names": sorted(weights), "checksum": float(sum(np.abs(w).sum() for w in weights.values())),
                          "text_encoder_2": type(pipe.text_encoder_2).__name__}))
    """, tiny_sdxl_dir)
    torch_unet = load_diffusers_pipeline(tiny_sdxl_dir).unet
    weights = {name: p.detach().numpy() for name, p in torch_unet.named_parameters()}
    assert result["names"] == sorted(weights)
    assert result["checksum"] == pytest.approx(float(sum(np.abs(w).sum() for w in weights.values())), rel=1e-6)
    assert result["text_encoder_2"] == "CLIPTextModelWithProjection"


def test_cli_builds_refuses_to_overwrite_and_writes_a_lora(run_cli, tmp_path):
    out, lora = tmp_path / "tiny", tmp_path / "tiny-lora.safetensors"
    result = run_cli("make-tiny", out, "--make-lora", lora)
    assert result.exit_code == 0, result.output
    assert (out / "model_index.json").is_file() and read_neutral(lora).summary()["modules"] == 576
    again = run_cli("make-tiny", out)
    assert again.exit_code == 1 and "pass --force" in again.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "tiny-lora.safetensors"]  # no partial dirs left


def test_cli_writes_a_mindone_checkpoint_lora_that_ms2neutral_reads_back(run_cli, tiny_sdxl_dir, tmp_path):
    ckpt = tmp_path / "lora.ckpt"
    result = run_cli("make-tiny", tmp_path / "tiny", "--make-lora", ckpt)
    assert result.exit_code == 0, result.output
    assert run_cli("ms2neutral", ckpt, "-o", tmp_path / "lora.safetensors").exit_code == 0
    back, original = read_neutral(tmp_path / "lora.safetensors"), make_tiny_lora(tiny_sdxl_dir)
    assert back.summary()["per_component"] == original.summary()["per_component"]
    for name in ("unet.mid_block.attentions.0.transformer_blocks.9.attn2.to_v", "text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj"):
        np.testing.assert_allclose(back.modules[name].delta_weight(), original.modules[name].delta_weight(), rtol=1e-6, atol=1e-7)


def test_cli_refuses_an_unknown_lora_suffix_before_building(run_cli, tmp_path):
    result = run_cli("make-tiny", tmp_path / "tiny", "--make-lora", tmp_path / "lora.bin")
    assert result.exit_code == 1 and "must end in .safetensors or .ckpt" in result.output
    assert list(tmp_path.iterdir()) == []
