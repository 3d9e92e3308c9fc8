"""The neutral file: what the writer puts in it and what the reader checks and gives back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorabridge.errors import ValidationProblem
from lorabridge.formats.neutral import read_neutral, write_neutral
from lorabridge.io.safetensors_file import SafetensorsFile, write_safetensors
from lorabridge.manifest import MANIFEST_KEY, tensor_sha256
from tests.fixtures.core import make_lora_model


def test_round_trip_is_bit_exact(neutral_file, lora_model):
    back = read_neutral(neutral_file, verify_hash=True)
    assert list(back.modules) == list(lora_model.modules)
    for name, module in lora_model.modules.items():
        for role, tensor in module.tensors.items():
            assert back.modules[name].tensors[role].same_as(tensor)
        assert back.modules[name].alpha == module.alpha
    assert back.training == lora_model.training


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_every_float_dtype_round_trips(tmp_path, dtype):
    model = make_lora_model(dtype=dtype)
    write_neutral(model, tmp_path / "x.safetensors")
    back = read_neutral(tmp_path / "x.safetensors", verify_hash=True)
    assert all(t.dtype == dtype for t in back.tensors().values())
    assert all(back.tensors()[k].same_as(t) for k, t in model.tensors().items())


def test_file_loads_in_safetensors_library_with_the_same_values(neutral_file, lora_model):
    from safetensors.numpy import load_file

    loaded = load_file(str(neutral_file))
    for key, tensor in lora_model.tensors().items():
        assert np.array_equal(loaded[key], tensor.to_numpy())


def test_manifest_describes_modules_and_provenance(neutral_file):
    manifest = json.loads(SafetensorsFile(neutral_file).metadata[MANIFEST_KEY])
    entry = manifest["modules"]["unet.down_blocks.1.resnets.0.conv1"]
    assert entry == {"kind": "lora", "rank": 4, "alpha": 8.0, "alpha_source": "stored",
                     "in_features": 320, "out_features": 640, "kernel_size": [3, 3], "dtype": "F32"}
    assert manifest["base_model"] == {"architecture": "stable-diffusion-xl-v1-base",
                                      "components": ["unet", "text_encoder", "text_encoder_2"]}
    assert manifest["targets"]["unet"]["attn1.to_q"] == 1
    assert manifest["provenance"]["converter"].startswith("lorabridge ")


def test_interop_metadata_carries_alpha_for_peft_loaders(tmp_path):
    model = make_lora_model(rank=4, alpha=8.0)
    odd = model.modules["unet.down_blocks.1.resnets.0.conv1"]
    odd.alpha = 2.0
    write_neutral(model, tmp_path / "x.safetensors")
    metadata = SafetensorsFile(tmp_path / "x.safetensors").metadata
    assert metadata["format"] == "pt"
    peft = json.loads(metadata["lora_adapter_metadata"])
    assert peft["unet.r"] == 4 and peft["unet.lora_alpha"] == 8.0
    assert peft["unet.alpha_pattern"] == {"down_blocks.1.resnets.0.conv1": 2.0}
    assert peft["text_encoder.target_modules"] == ["text_model.encoder.layers.0.self_attn.q_proj"]
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_flipped_data_byte_is_reported_as_hash_mismatch(neutral_file):
    blob = bytearray(neutral_file.read_bytes())
    blob[-1] ^= 0x01
    neutral_file.write_bytes(bytes(blob))
    read_neutral(neutral_file)  # structure is fine without the hash check
    with pytest.raises(ValidationProblem, match="hash mismatch"):
        read_neutral(neutral_file, verify_hash=True)


def test_hash_binds_names_not_only_bytes(lora_model):
    tensors = lora_model.tensors()
    renamed = {k.replace("to_q", "to_k"): v for k, v in tensors.items()}
    assert tensor_sha256(tensors) != tensor_sha256(renamed)


def test_plain_safetensors_without_manifest_is_refused(tmp_path, lora_model):
    write_safetensors(tmp_path / "plain.safetensors", lora_model.tensors(), {"format": "pt"})
    with pytest.raises(ValidationProblem, match="not a neutral LoRA"):
        read_neutral(tmp_path / "plain.safetensors")


def test_lora_modules_compute_delta_w(lora_model):
    module = lora_model.modules["unet.down_blocks.1.resnets.0.conv1"]
    a, b = module.tensors["lora_A.weight"].to_numpy(), module.tensors["lora_B.weight"].to_numpy()
    expected = np.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * (8.0 / 4)
    np.testing.assert_allclose(module.delta_weight(), expected, rtol=1e-5, atol=1e-5)
