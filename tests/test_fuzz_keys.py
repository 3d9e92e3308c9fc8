"""Key parsers under hypothesis: files with arbitrary key names, shapes and metadata never crash a
reader; they convert or give the project's own error. (bench/fuzz_atheris.py runs longer.)"""

from __future__ import annotations

import json
import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorabridge.converters.registry import get_format
from lorabridge.errors import LoraBridgeError
from lorabridge.io.safetensors_file import write_safetensors
from lorabridge.tensor import Tensor

READERS = ["kohya", "lycoris", "diffusers", "peft", "legacy-diffusers", "mindone-sgm", "mindone-diffusers", "mindone-kohya"]
FRAGMENTS = ["lora_unet_", "lora_te1_", "lora_te2_", "lycoris_", "unet.", "text_encoder.", "text_encoder_2.",
             "base_model.model.", "model.diffusion_model.", "conditioner.embedders.1.model.transformer.resblocks.0.",
             "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
             "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "text_model.encoder.layers.0.self_attn.q_proj",
             "attn.in_proj", "processor.to_q_lora", ".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight",
             ".lora_B.weight", ".lora_A.default.weight", ".hada_w1_a", ".hada_w1_b", ".lokr_w1", ".dora_scale",
             ".lora_magnitude_vector", ".down.weight", ".up.weight", "_", ".", "0", "12"]
KEYS = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=6), min_size=1, max_size=5).map("".join)
SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)
META_VALUES = st.text(max_size=20) | st.sampled_from(['{"unet.r": 4}', '{"unet.r": "x", "unet.lora_alpha": null}',
                                                      '{"unet.rank_pattern": [1], "unet.alpha_pattern": 3}', "[]", "null"])
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(keys=st.dictionaries(KEYS, SHAPES, min_size=1, max_size=6),
       metadata=st.dictionaries(st.sampled_from(["lora_adapter_metadata", "format", "ss_network_dim", "x"]), META_VALUES),
       dtype=st.sampled_from(["F32", "F16", "BF16"]))
def test_arbitrary_keys_give_our_error_or_a_model(keys, metadata, dtype, tmp_path):
    rng = np.random.default_rng(0)
    tensors = {k: Tensor.from_numpy(rng.standard_normal(shape).astype(np.float32), dtype) for k, shape in keys.items()}
    path = tmp_path / "fuzz.safetensors"
    write_safetensors(path, tensors, metadata)
    for name in READERS:
        fmt = get_format(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if fmt.detect(path):
                    fmt.read(path)
            except LoraBridgeError:
                pass


def test_the_fuzz_reaches_the_parsers(tmp_path):
    """A well-formed kohya key among the fragments really converts, so the fuzz exercises real parsing."""
    rng = np.random.default_rng(0)
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{stem}.lora_down.weight": Tensor.from_numpy(rng.standard_normal((2, 640)).astype(np.float32)),
               f"{stem}.lora_up.weight": Tensor.from_numpy(rng.standard_normal((640, 2)).astype(np.float32))}
    write_safetensors(tmp_path / "k.safetensors", tensors, {"x": json.dumps({})})
    model = get_format("kohya").read(tmp_path / "k.safetensors")
    assert list(model.modules) == ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
