"""Our kohya export loads in diffusers' ``load_lora_weights`` (its kohya SDXL converter) on the tiny
pipeline: every module, text encoders and resnet convs included, with fused weights equal to
W + alpha/rank * B @ A computed from the neutral tensors.

diffusers 0.35.2 turns kohya text-encoder keys into its old ``to_q_lora`` spelling and then guesses
that spelling from the presence of a ``to_out_lora`` key: an encoder whose LoRA has attention
layers and MLP layers but no ``out_proj`` loses its attention layers ("unexpected keys"). kohya
trains every CLIPAttention linear, out_proj included, so the LoRA here does too.

diffusers 0.35.2 also gives every UNet module of a kohya file the most common alpha: its alpha
patterns are keyed by the old ``processor.to_q_lora`` names, which match no PEFT module. kohya
files from one training run share one alpha (ranks may vary, as in resized "Dynamic" LoRAs), which
loads right; per-module alphas need the diffusers format (``neutral2pt --format diffusers``).
"""

from __future__ import annotations

import pytest

import numpy as np

from lorabridge.formats.neutral import write_neutral
from tests.fixtures.core import make_lora_module
from tests.fixtures.torch_lora import COMPONENTS, assert_fused, base_weights, diffusers_messages, torch_layer, varied_model

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.torch, pytest.mark.slow]

# What diffusers says when it drops or cannot place keys; none of it may appear.
KEY_TROUBLE = ("missing keys", "unexpected keys", "not loaded", "no lora keys", "not found", "unsupported")


def kohya_like_model(pipe, alpha: float | None = 8.0):
    """The varied LoRA (8 UNet layer types, resnet convs, ranks per module) with one ``alpha`` (None: the
    varied alphas), every attention of an adapted text-encoder layer completed with its out_proj."""
    model, rng = varied_model(pipe), np.random.default_rng(1)
    for name in [n for n in model.modules if n.startswith("text_encoder") and "self_attn" in n]:
        out_proj = name.rsplit(".", 1)[0] + ".out_proj"
        if out_proj not in model.modules:
            width = torch_layer(pipe, out_proj).weight.shape[0]
            model.add(make_lora_module(out_proj, (width, width), 2, 3.0, rng))
    for module in model.modules.values():
        module.alpha = module.alpha if alpha is None else alpha
    return model


def load_kohya_export(pipe, model, tmp_path, run_cli) -> list[str]:
    """neutral2pt --format kohya, then pipe.load_lora_weights; what diffusers said about keys."""
    write_neutral(model, tmp_path / "neutral.safetensors")
    out = tmp_path / "lora_kohya.safetensors"
    result = run_cli("neutral2pt", tmp_path / "neutral.safetensors", "--format", "kohya", "-o", out)
    assert result.exit_code == 0, result.output
    with diffusers_messages() as messages:
        pipe.load_lora_weights(str(out.parent), weight_name=out.name)
    return [m for m in messages if any(t in m.lower() for t in KEY_TROUBLE)]


def test_kohya_export_loads_in_diffusers_with_every_module_and_alpha(tiny_pipe_factory, tmp_path, run_cli):
    pipe = tiny_pipe_factory()
    model = kohya_like_model(pipe)
    assert {m.component for m in model.modules.values()} == set(COMPONENTS)
    assert any(m.kernel_size for m in model.modules.values())  # resnet convs too
    assert len({m.rank for m in model.modules.values()}) > 1
    base = base_weights(pipe, model.modules)
    assert load_kohya_export(pipe, model, tmp_path, run_cli) == []
    for name in model.modules:  # every module became a LoRA layer in diffusers
        component, path = name.split(".", 1)
        assert hasattr(getattr(pipe, component).get_submodule(path), "lora_A"), name
    pipe.fuse_lora(components=list(COMPONENTS))
    assert_fused(pipe, model, base)


@pytest.mark.xfail(strict=True, reason="diffusers 0.35.2 applies the most common alpha to every UNet module of a kohya file")
def test_per_module_alphas_of_a_kohya_file_reach_diffusers(tiny_pipe_factory, tmp_path, run_cli):
    pipe = tiny_pipe_factory()
    model = kohya_like_model(pipe, alpha=None)
    assert len({m.alpha for m in model.modules.values()}) > 1
    base = base_weights(pipe, model.modules)
    load_kohya_export(pipe, model, tmp_path, run_cli)
    pipe.fuse_lora(components=list(COMPONENTS))
    assert_fused(pipe, model, base)


def test_diffusers_output_kohya_format_reads_as_the_file_it_came_from(trained_lora, tmp_path):
    """train_dreambooth_lora_sdxl.py --output_kohya_format: diffusers' own kohya keys (glued
    ``..._attn1_to_k_lora.down.weight`` for old-spelled layers, int64 ``.alpha``) were refused as
    "none of its keys is a LoRA key"; they read to the same modules and tensors as the diffusers file.

    Alphas are what diffusers' converter wrote: ``.alpha`` = rank as int64 (it writes ``len(down)``, not
    the training alpha) where it wrote one, none (so alpha = rank, assumed) beside the glued keys.
    """
    from lorabridge.converters import convert
    from lorabridge.formats.neutral import read_neutral

    kohya = read_neutral(convert(trained_lora.files["diffusers-kohya"], tmp_path / "k.safetensors", to="neutral",
                                 progress=False).output)
    script = read_neutral(convert(trained_lora.files["diffusers-script"], tmp_path / "s.safetensors", to="neutral",
                                  progress=False).output)
    assert set(kohya.modules) == set(script.modules) == set(trained_lora.truth)
    for name, module in kohya.modules.items():
        assert all(module.tensors[r].same_as(t) for r, t in script.modules[name].tensors.items()), name
        assert module.alpha == module.rank
    sources = {m.component: m.alpha_source for m in kohya.modules.values()}
    assert sources == {"unet": "assumed", "text_encoder": "stored", "text_encoder_2": "stored"}
    assert {m.extra.get("alpha_dtype") for m in kohya.modules.values() if m.alpha_source == "stored"} == {"I64"}


def test_a_neutral_file_with_full_deltas_is_refused_by_diffusers_as_a_whole(tiny_pipe_factory, tmp_path):
    """diffusers 0.35.2's load_lora_weights has no full-delta kind: it refuses such a neutral file as a
    whole ("Invalid LoRA checkpoint.") rather than loading part of it; the README says to convert."""
    from lorabridge.model import LoraModule
    from lorabridge.tensor import Tensor

    pipe = tiny_pipe_factory()
    model = varied_model(pipe)
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
    shape = tuple(torch_layer(pipe, name).weight.shape)
    model.modules.pop(name, None)
    model.add(LoraModule(name, "full", {"diff": Tensor.from_numpy(np.ones(shape, "f4"))}, 0.0, "assumed"))
    write_neutral(model, tmp_path / "full.safetensors")
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipe.load_lora_weights(str(tmp_path), weight_name="full.safetensors")
