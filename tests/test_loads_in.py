"""Spec section 1's scope, checked against the real diffusers: what ``inspect`` says loads there, and what does not."""

from __future__ import annotations

import numpy as np
import pytest

from lorabridge.formats.neutral import write_neutral
from lorabridge.model import LoraModel, LoraModule
from lorabridge.report import inspection_report
from lorabridge.tensor import Tensor
from tests.fixtures.core import make_lora_module
from tests.fixtures.sdxl import load_diffusers_pipeline
from tests.fixtures.torch_lora import diffusers_messages

pytestmark = pytest.mark.torch

PATH = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def _random(rng, shape) -> Tensor:
    return Tensor.from_numpy(rng.standard_normal(shape).astype(np.float32))


@pytest.fixture()
def pipe(tiny_sdxl_dir):
    return load_diffusers_pipeline(tiny_sdxl_dir)


def neutral_file(tmp_path, module: LoraModule):
    model = LoraModel(provenance={"source_format": "test"})
    model.add(module)
    out = tmp_path / "lora.safetensors"
    write_neutral(model, out)
    return out


def test_plain_lora_is_said_to_load_and_loads(pipe, tmp_path):
    out_f, in_f = pipe.unet.get_submodule(PATH).weight.shape
    path = neutral_file(tmp_path, make_lora_module(f"unet.{PATH}", (in_f, out_f), 4, 4.0, np.random.default_rng(0)))
    assert inspection_report(path)["loads_in"]["diffusers"] == "yes"
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    assert pipe.unet.get_submodule(PATH).r["default_0"] == 4


def test_loha_is_said_not_to_load_and_diffusers_refuses_it(pipe, tmp_path):
    out_f, in_f = pipe.unet.get_submodule(PATH).weight.shape
    rng = np.random.default_rng(1)
    loha = LoraModule(f"unet.{PATH}", "loha", {"hada_w1_a": _random(rng, (out_f, 2)), "hada_w1_b": _random(rng, (2, in_f)),
                                               "hada_w2_a": _random(rng, (out_f, 2)), "hada_w2_b": _random(rng, (2, in_f))}, alpha=2.0)
    path = neutral_file(tmp_path, loha)
    assert inspection_report(path)["loads_in"]["diffusers"].startswith("no: loha modules")
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)


def test_dora_per_output_row_is_said_to_load_in_diffusers_only_and_diffusers_loads_the_magnitudes(pipe, tmp_path):
    """Spec 1.1 stores it as PEFT's lora_magnitude_vector, which diffusers loads (mindone.diffusers 0.5.0 has no DoRA)."""
    out_f, in_f = pipe.unet.get_submodule(PATH).weight.shape
    module = make_lora_module(f"unet.{PATH}", (in_f, out_f), 4, 4.0, np.random.default_rng(2))
    module.tensors["dora_scale"] = _random(np.random.default_rng(3), (out_f, 1))
    module.dora_axis = "out"
    path = neutral_file(tmp_path, module)
    loads_in = inspection_report(path)["loads_in"]
    assert loads_in["diffusers"] == "yes" and "DoRA" in loads_in["mindone.diffusers"]
    with diffusers_messages() as messages:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    assert not [m for m in messages if "dora" in m.lower()], messages
    magnitude = pipe.unet.get_submodule(PATH).lora_magnitude_vector["default_0"].weight.detach().numpy()
    np.testing.assert_array_equal(magnitude, module.tensors["dora_scale"].to_numpy().reshape(-1))


def test_full_is_said_not_to_load_and_diffusers_refuses_it(pipe, tmp_path):
    out_f, in_f = pipe.unet.get_submodule(PATH).weight.shape
    full = LoraModule(f"unet.{PATH}", "full", {"diff": _random(np.random.default_rng(4), (out_f, in_f))}, alpha=1.0)
    path = neutral_file(tmp_path, full)
    assert inspection_report(path)["loads_in"]["diffusers"].startswith("no: full modules")
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
