"""The neutral file itself loads unchanged in diffusers and mindone.diffusers, with each module's alpha.

Ranks and alphas differ per module here, so the loaders must use the rank/alpha patterns of
``lora_adapter_metadata``; fused weights are compared with W + alpha/rank * B @ A computed with numpy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorabridge.formats.neutral import read_neutral, write_neutral
from lorabridge.model import LoraModel
from tests.fixtures.core import make_lora_module
from tests.fixtures.sdxl import load_diffusers_pipeline
from tests.fixtures.torch_lora import diffusers_messages

pytestmark = pytest.mark.torch

# (component, module path, rank, alpha): linear, conv, feed-forward, resnet and text-encoder layers.
TARGETS = [
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 4, 4.0),
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", 2, 8.0),
    ("unet", "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj", 8, 1.0),
    ("unet", "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0", 4, 4.0),
    ("unet", "down_blocks.1.resnets.0.conv1", 2, 3.0),
    ("unet", "up_blocks.1.resnets.2.time_emb_proj", 4, 2.0),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", 4, 4.0),
    ("text_encoder", "text_model.encoder.layers.1.mlp.fc2", 2, 0.5),
    ("text_encoder_2", "text_model.encoder.layers.0.self_attn.v_proj", 4, 16.0),
]


def weight_shape(module) -> tuple:
    """(in, out[, kh, kw]) as make_lora_module wants it, from a real torch layer."""
    w = module.weight
    return (w.shape[1], w.shape[0], *w.shape[2:])


@pytest.fixture(scope="module")
def mixed_neutral(tiny_sdxl_dir, tmp_path_factory):
    pipe = load_diffusers_pipeline(tiny_sdxl_dir)
    rng = np.random.default_rng(3)
    model = LoraModel(provenance={"source_format": "test"})
    for component, path, rank, alpha in TARGETS:
        layer = getattr(pipe, component).get_submodule(path)
        model.add(make_lora_module(f"{component}.{path}", weight_shape(layer), rank, alpha, rng))
    out = tmp_path_factory.mktemp("interop") / "mixed.safetensors"
    write_neutral(model, out)
    return out


def expected_weights(neutral_path, base_weights: dict) -> dict:
    """W + alpha/rank * B @ A from the neutral tensors, with numpy only (no lorabridge math)."""
    model = read_neutral(neutral_path)
    out = {}
    for name, module in model.modules.items():
        a = module.tensors["lora_A.weight"].to_float32()
        b = module.tensors["lora_B.weight"].to_float32()
        delta = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(b.shape[0], *a.shape[1:])
        out[name] = base_weights[name] + module.alpha / a.shape[0] * delta
    return out


def test_diffusers_loads_the_neutral_file_with_per_module_alpha(tiny_sdxl_dir, mixed_neutral):
    pipe = load_diffusers_pipeline(tiny_sdxl_dir)
    base = {f"{c}.{p}": getattr(pipe, c).get_submodule(p).weight.detach().numpy().copy() for c, p, _, _ in TARGETS}
    with diffusers_messages() as messages:
        # diffusers in offline mode wants the directory plus weight_name, not a file path
        pipe.load_lora_weights(str(mixed_neutral.parent), weight_name=mixed_neutral.name)
    assert not [m for m in messages if "key" in m.lower()], messages
    for component, path, rank, alpha in TARGETS:
        layer = getattr(pipe, component).get_submodule(path)
        assert layer.r["default_0"] == rank and layer.scaling["default_0"] == pytest.approx(alpha / rank)
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"])
    assert_fused_weights(pipe, expected_weights(mixed_neutral, base))


def assert_fused_weights(pipe, expected: dict) -> None:
    """Every fused layer of ``pipe`` (canonical name -> weight computed with numpy) holds the expected weight."""
    for name, want in expected.items():
        component, path = name.split(".", 1)
        got = getattr(pipe, component).get_submodule(path).weight.detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)

@pytest.mark.mindspore
def test_mindone_loads_the_neutral_file_with_per_module_alpha(tiny_sdxl_dir, mixed_neutral, mindspore_run):
    result = mindspore_run("""
        import json, sys
        from pathlib import Path
        import numpy as np
        from tests.fixtures.sdxl import load_mindone_pipeline
        pipe = load_mindone_pipeline(sys.argv[1])
        targets = json.loads(sys.argv[3])
        def layer(c, p):  # MindSpore cells have no get_submodule
            node = getattr(pipe, c)
            for part in p.split("."):
                node = node[int(part)] if part.isdigit() else getattr(node, part)
            return node
        base = {f"{c}.{p}": layer(c, p).weight.asnumpy().copy() for c, p, _, _ in targets}
        lora = Path(sys.argv[2])
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)  # offline mode wants weight_name
        scaling = {f"{c}.{p}": [layer(c, p).r["default_0"], float(layer(c, p).scaling["default_0"])] for c, p, _, _ in targets}
        pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"])
        fused = {f"{c}.{p}": layer(c, p).weight.asnumpy() for c, p, _, _ in targets}
        np.savez(sys.argv[4], **{k + "|base": v for k, v in base.items()}, **{k + "|fused": v for k, v in fused.items()})
        print(json.dumps({"scaling": scaling}))
    """, tiny_sdxl_dir, mixed_neutral, json.dumps(TARGETS), mixed_neutral.with_suffix(".npz"))
    for component, path, rank, alpha in TARGETS:
        assert result["scaling"][f"{component}.{path}"] == [rank, pytest.approx(alpha / rank)]
    arrays = np.load(mixed_neutral.with_suffix(".npz"), allow_pickle=False)
    base = {k.split("|")[0]: arrays[k] for k in arrays.files if k.endswith("|base")}
    for name, want in expected_weights(mixed_neutral, base).items():
        np.testing.assert_allclose(arrays[name + "|fused"], want, rtol=1e-4, atol=1e-5, err_msg=name)


# --- DoRA: the magnitude per output row is stored as diffusers loads it (spec 1.1) ----------------------------
# Every LoRA module of a component must have one: PEFT's use_dora covers a whole component.
DORA_TARGETS = [
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 4, 8.0),
    ("unet", "down_blocks.1.resnets.0.conv1", 2, 2.0),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2", 4, 4.0),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.k_proj", 2, 1.0),
]


@pytest.fixture(scope="module")
def dora_neutral(tiny_sdxl_dir, tmp_path_factory):
    """A neutral file of DoRA modules, magnitudes per output row near the norms of W + delta W (as trained)."""
    from lorabridge.tensor import Tensor

    pipe = load_diffusers_pipeline(tiny_sdxl_dir)
    rng = np.random.default_rng(5)
    model = LoraModel(provenance={"source_format": "test"})
    for component, path, rank, alpha in DORA_TARGETS:
        layer = getattr(pipe, component).get_submodule(path)
        module = make_lora_module(f"{component}.{path}", weight_shape(layer), rank, alpha, rng)
        w = layer.weight.detach().numpy()
        norms = np.linalg.norm((w + module.delta_weight()).reshape(w.shape[0], -1), axis=1)
        magnitude = norms * rng.uniform(0.5, 1.5, norms.shape)
        module.tensors["dora_scale"] = Tensor.from_numpy(magnitude.reshape(w.shape[0], *[1] * (w.ndim - 1)).astype(np.float32))
        module.dora_axis = "out"
        model.add(module)
    out = tmp_path_factory.mktemp("interop-dora") / "dora.safetensors"
    write_neutral(model, out)
    return out


def expected_dora_weights(neutral_path, base_weights: dict) -> dict:
    """m * V / ||V|| per output row, V = W + alpha/rank * B @ A, from the stored tensors with numpy only."""
    from safetensors.numpy import load_file

    stored = load_file(str(neutral_path))
    manifest = read_neutral(neutral_path)
    out = {}
    for name, module in manifest.modules.items():
        a, b = stored[f"{name}.lora_A.weight"], stored[f"{name}.lora_B.weight"]
        v = base_weights[name] + module.alpha / a.shape[0] * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(base_weights[name].shape)
        norm = np.linalg.norm(v.reshape(v.shape[0], -1), axis=1)
        magnitude = stored[f"{name}.lora_magnitude_vector"].reshape(-1)
        out[name] = v * (magnitude / norm).reshape(v.shape[0], *[1] * (v.ndim - 1))
    return out


def test_diffusers_loads_the_neutral_file_with_dora_magnitudes(tiny_sdxl_dir, dora_neutral):
    pipe = load_diffusers_pipeline(tiny_sdxl_dir)
    base = {f"{c}.{p}": getattr(pipe, c).get_submodule(p).weight.detach().numpy().copy() for c, p, _, _ in DORA_TARGETS}
    with diffusers_messages() as messages:
        pipe.load_lora_weights(str(dora_neutral.parent), weight_name=dora_neutral.name)
    assert not [m for m in messages if "key" in m.lower() and "No LoRA keys associated" not in m], messages
    assert not [m for m in messages if "dora" in m.lower()], messages
    pipe.fuse_lora(components=["unet", "text_encoder"])
    assert_fused_weights(pipe, expected_dora_weights(dora_neutral, base))


@pytest.mark.mindspore
def test_mindone_cannot_load_dora_at_all(tiny_sdxl_dir, dora_neutral, mindspore_run):
    """mindone 0.5.0's PEFT port has no DoRA: LoraLayer.dora_init raises NotImplementedError (so validate warns)."""
    result = mindspore_run("""
        import json, sys, traceback
        from pathlib import Path
        from tests.fixtures.sdxl import load_mindone_pipeline
        pipe = load_mindone_pipeline(sys.argv[1])
        lora = Path(sys.argv[2])
        try:
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
            print(json.dumps({"loaded": True}))
        except NotImplementedError:
            print(json.dumps({"loaded": False, "raised_in": traceback.extract_tb(sys.exc_info()[2])[-1].name}))
    """, tiny_sdxl_dir, dora_neutral)
    assert result == {"loaded": False, "raised_in": "dora_init"}
