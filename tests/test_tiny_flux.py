"""The tiny Flux.1 pipeline (``make-tiny --arch flux``): seeded, Flux.1-dev's module names, offline tokenizers,
loads in diffusers' FluxPipeline (mindone.diffusers: tests/test_infer_flux.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from lorabridge.architectures.flux1 import FLUX1
from lorabridge.formats.neutral import read_neutral
from tests.test_tiny_sdxl import tree_digest

pytestmark = pytest.mark.torch


def test_same_seed_gives_identical_files(tiny_flux_dir, tmp_path):
    from lorabridge.architectures.flux1.tiny import build_tiny

    assert tree_digest(build_tiny(tmp_path / "again", seed=0)) == tree_digest(tiny_flux_dir)


def test_every_flux1_dev_transformer_module_name_exists_at_smaller_widths(tiny_flux_dir):
    from safetensors import safe_open

    with safe_open(tiny_flux_dir / "transformer" / "diffusion_pytorch_model.safetensors", "np") as weights:
        tiny = {key.removesuffix(".weight"): weights.get_slice(key).get_shape() for key in weights.keys()
                if key.endswith(".weight")}
    real = FLUX1.modules("transformer")
    assert set(real) <= set(tiny)  # every module a Flux.1-dev LoRA can name (19 double, 38 single blocks)
    assert all(a <= b for path in real for a, b in zip(tiny[path], real[path]))


def test_tokenizers_are_built_offline_and_load_as_flux_expects(tiny_flux_dir):
    from transformers import CLIPTokenizer, T5TokenizerFast

    t5 = T5TokenizerFast.from_pretrained(tiny_flux_dir / "tokenizer_2")
    ids = t5("a photo of a cat", padding="max_length", max_length=12).input_ids
    assert ids[:6] == [t5.convert_tokens_to_ids(f"▁{w}") for w in "a photo of a cat".split()] + [t5.eos_token_id]
    assert ids[6:] == [t5.pad_token_id] * 6 and t5.pad_token_id == 0 and t5.eos_token_id == 1
    assert t5("Zebra #9!").input_ids[-1] == 1 and t5.unk_token_id not in t5("Zebra #9!").input_ids
    clip = CLIPTokenizer.from_pretrained(tiny_flux_dir / "tokenizer")
    assert clip.model_max_length == 77


def test_loads_in_diffusers_flux_pipeline_with_t5_embedding_saved_untied(tiny_flux_dir):
    import torch
    from diffusers import FluxPipeline
    from safetensors import safe_open

    with safe_open(tiny_flux_dir / "text_encoder_2" / "model.safetensors", "np") as weights:
        assert {"shared.weight", "encoder.embed_tokens.weight"} <= set(weights.keys())  # mindone's T5 reads the latter
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, torch_dtype=torch.float32, local_files_only=True)
    assert pipe.vae.config.latent_channels == 16 and pipe.transformer.config.in_channels == 64
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.transformer.config.guidance_embeds


def test_tiny_lora_reads_as_flux1_on_every_block(tiny_flux_lora_file):
    model = read_neutral(tiny_flux_lora_file)
    assert model.architecture == FLUX1.name
    assert model.summary()["per_component"] == {"transformer": 418, "text_encoder": 8}  # FluxPipeline loads no T5 LoRA
    blocks = Counter(name.split(".")[1] for name in model.modules if name.startswith("transformer."))
    assert blocks == {"transformer_blocks": 19 * 12, "single_transformer_blocks": 38 * 5}


def test_cli_make_tiny_flux_writes_pipeline_and_lora_and_refuses_a_ckpt(run_cli, tmp_path):
    result = run_cli("make-tiny", tmp_path / "tiny", "--arch", "flux", "--make-lora", tmp_path / "lora.ckpt")
    assert result.exit_code == 1 and "must end in .safetensors" in result.output and list(tmp_path.iterdir()) == []
    result = run_cli("make-tiny", tmp_path / "tiny", "--arch", "flux", "--make-lora", tmp_path / "lora.safetensors")
    assert result.exit_code == 0, result.output
    assert "tiny Flux.1 pipeline" in result.output
    assert read_neutral(tmp_path / "lora.safetensors").architecture == FLUX1.name
    assert run_cli("make-tiny", tmp_path / "x", "--arch", "sd3").exit_code == 2


def test_text_encoder_size_overrides_include_vocab_size(tmp_path):
    """Issue 16 item 5: a vocab_size override gave "got multiple values for keyword argument 'vocab_size'"."""
    from lorabridge.architectures.tiny_parts import clip_text_config

    config = clip_text_config({"hidden_size": 32, "vocab_size": 49408})
    assert config.vocab_size == 49408 and config.eos_token_id == 541
