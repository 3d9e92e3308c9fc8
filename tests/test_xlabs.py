"""XLabs (x-flux) Flux.1 LoRA files: read-only. Test inputs are built from x-flux's own key grammar, written
below as data with its source, and cross-checked against diffusers' converter (the real consumer):
``FluxLoraLoaderMixin.lora_state_dict`` on the same file gives the same diffusers keys, tensors and scale.

Source: ``XLabs-AI/x-flux@47495425dbed499be1e8e5a6e52628b07349cba2``:
``src/flux/modules/layers.py`` (``LoRALinearLayer``: ``down`` = Linear(in, rank), ``up`` = Linear(rank, out),
scaled by ``network_alpha / rank`` only when ``network_alpha`` is set; ``DoubleStreamBlockLoraProcessor``:
``qkv_lora1``/``proj_lora1`` image stream, ``qkv_lora2``/``proj_lora2`` text stream, dim -> 3 dim and dim -> dim;
``SingleStreamBlockLoraProcessor``: ``qkv_lora`` dim -> 3 dim added to linear1's q, k, v rows only,
``proj_lora`` 15360 -> dim beside linear2), ``src/flux/model.py`` (processor names ``<block>.processor``),
``train_flux_lora_deepspeed.py`` (processors built with ``rank=args.rank`` and no ``network_alpha``; saves the
``_lora`` keys with ``safetensors.torch.save_file``, no metadata). diffusers 0.35.2
``loaders/lora_conversion_utils.py::_convert_xlabs_flux_lora_to_diffusers`` (alphas=None).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from lorabridge.converters import convert
from lorabridge.converters.registry import get_format
from lorabridge.converters.torch import neutral2pt
from lorabridge.errors import LoraBridgeError
from lorabridge.formats.contract import ReadOptions
from lorabridge.formats.neutral import read_neutral
from lorabridge.io.safetensors_file import write_safetensors
from lorabridge.tensor import Tensor

HIDDEN = 3072  # Flux.1-dev; x-flux's trainer passes dim=3072
# x-flux's keys: <block>.N.processor.<layer>.{down,up}.weight -> (out, in) of the LoRALinearLayer.
XLABS_LAYERS = {
    "double_blocks": {"qkv_lora1": (3 * HIDDEN, HIDDEN), "proj_lora1": (HIDDEN, HIDDEN),
                      "qkv_lora2": (3 * HIDDEN, HIDDEN), "proj_lora2": (HIDDEN, HIDDEN)},
    "single_blocks": {"qkv_lora": (3 * HIDDEN, HIDDEN), "proj_lora": (HIDDEN, 15360)},
}
# What each layer adds to, in diffusers names (the row blocks of a qkv LoRA, in order): x-flux's forward passes.
DIFFUSERS_TARGETS = {
    "qkv_lora1": ("attn.to_q", "attn.to_k", "attn.to_v"), "proj_lora1": ("attn.to_out.0",),
    "qkv_lora2": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "proj_lora2": ("attn.to_add_out",),
    "qkv_lora": ("attn.to_q", "attn.to_k", "attn.to_v"), "proj_lora": ("proj_out",),
}
DIFFUSERS_BLOCKS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}
BLOCKS = {"double_blocks": (0, 18), "single_blocks": (1, 37)}  # first and last of Flux.1-dev's 19 and 38


def xlabs_file(path: Path, rank: int = 4, prefix: str = "", dtype: str = "f4", drop: str | None = None,
               nan: bool = False) -> dict[str, np.ndarray]:
    """An x-flux LoRA file as its trainer saves one: every layer of two blocks of each kind, no metadata."""
    rng = np.random.default_rng(12)
    arrays = {}
    for blocks, layers in XLABS_LAYERS.items():
        for n in BLOCKS[blocks]:
            for layer, (out, inp) in layers.items():
                stem = f"{prefix}{blocks}.{n}.processor.{layer}"
                arrays[f"{stem}.down.weight"] = (rng.standard_normal((rank, inp)) / rank).astype(dtype)
                arrays[f"{stem}.up.weight"] = rng.standard_normal((out, rank)).astype(dtype)
    if drop:
        del arrays[drop]
    if nan:
        arrays["double_blocks.0.processor.proj_lora1.up.weight"][0, 0] = np.nan
    write_safetensors(path, {k: Tensor.from_numpy(v) for k, v in arrays.items()}, {})
    return arrays


def quietly(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_an_xlabs_file_is_detected_and_its_qkv_loras_split_exactly(tmp_path, prefix):
    arrays = xlabs_file(tmp_path / "lora.safetensors", prefix=prefix)
    result = convert(tmp_path / "lora.safetensors", tmp_path / "n.safetensors", "neutral", progress=False)
    model = result.model
    assert result.source_format == "xlabs" and model.architecture == "flux-1-dev" and not result.warnings
    expected = {f"transformer.{DIFFUSERS_BLOCKS[b]}.{n}.{t}" for b, layers in XLABS_LAYERS.items() for n in BLOCKS[b]
                for layer in layers for t in DIFFUSERS_TARGETS[layer]}
    assert set(model.modules) == expected
    # No alpha in x-flux (network_alpha=None: up(down(x)) unscaled): alpha = rank, scale 1, recorded as assumed.
    assert {(m.alpha, m.alpha_source, m.scale) for m in model.modules.values()} == {(4.0, "assumed", 1.0)}
    for blocks, layers in XLABS_LAYERS.items():
        for n in BLOCKS[blocks]:
            for layer in layers:
                stem = f"{prefix}{blocks}.{n}.processor.{layer}"
                down, up = arrays[f"{stem}.down.weight"], arrays[f"{stem}.up.weight"]
                parts = [model.modules[f"transformer.{DIFFUSERS_BLOCKS[blocks]}.{n}.{t}"] for t in DIFFUSERS_TARGETS[layer]]
                # shared A, B's row blocks: bit-exact
                assert all(p.tensors["lora_A.weight"].to_numpy().tobytes() == down.tobytes() for p in parts)
                assert np.concatenate([p.tensors["lora_B.weight"].to_numpy() for p in parts]).tobytes() == up.tobytes()


def test_alpha_given_by_the_user_is_recorded_as_theirs(tmp_path):
    xlabs_file(tmp_path / "lora.safetensors")
    model = get_format("xlabs").read(tmp_path / "lora.safetensors", ReadOptions(alpha=2.0))
    assert {(m.alpha, m.alpha_source) for m in model.modules.values()} == {(2.0, "user")}


def test_read_to_neutral_to_diffusers_and_back_is_bit_exact(tmp_path):
    xlabs_file(tmp_path / "lora.safetensors", dtype="f2")
    read = convert(tmp_path / "lora.safetensors", tmp_path / "n.safetensors", "neutral", progress=False).model
    convert(tmp_path / "n.safetensors", tmp_path / "d.safetensors", "diffusers", progress=False)
    back = convert(tmp_path / "d.safetensors", tmp_path / "n2.safetensors", "neutral", progress=False).model
    neutral = read_neutral(tmp_path / "n.safetensors")
    for other in (back, neutral):
        assert list(other.modules) == list(read.modules)
        for name, module in read.modules.items():
            theirs = other.modules[name]
            assert theirs.alpha == module.alpha and theirs.kind == module.kind
            assert {r: (t.dtype, t.shape, bytes(t.data)) for r, t in theirs.tensors.items()} == \
                   {r: (t.dtype, t.shape, bytes(t.data)) for r, t in module.tensors.items()}


@pytest.mark.torch
@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_diffusers_converter_agrees_on_keys_tensors_and_scale(tmp_path, prefix):
    torch = pytest.importorskip("torch")
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    xlabs_file(tmp_path / "lora.safetensors", prefix=prefix)
    ours = get_format("xlabs").read(tmp_path / "lora.safetensors")
    state_dict, alphas = FluxLoraLoaderMixin.lora_state_dict(str(tmp_path), weight_name="lora.safetensors", return_alphas=True)
    assert alphas is None  # "xlabs doesn't use `alpha`": PEFT then uses lora_alpha = r, scale 1, as x-flux does
    assert {m.scale for m in ours.modules.values()} == {1.0}
    assert sorted(state_dict) == sorted(f"{name}.{role}" for name, m in ours.modules.items() for role in m.tensors)
    for name, module in ours.modules.items():
        for role, tensor in module.tensors.items():
            assert torch.equal(state_dict[f"{name}.{role}"], torch.from_numpy(tensor.to_numpy().copy())), (name, role)


def test_xlabs_is_read_only_everywhere_it_could_be_a_target(tmp_path, run_cli):
    fmt = get_format("xlabs")
    assert not fmt.writable and fmt.write is None and fmt.write_options == frozenset()
    xlabs_file(tmp_path / "lora.safetensors")
    convert(tmp_path / "lora.safetensors", tmp_path / "n.safetensors", "neutral", progress=False)
    message = "xlabs is read-only: lorabridge reads xlabs files but does not write them; write comfyui, diffusers, "
    result = run_cli("convert", tmp_path / "n.safetensors", "--to", "xlabs", "-o", tmp_path / "x.safetensors")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
    with pytest.raises(LoraBridgeError, match=message):
        neutral2pt(tmp_path / "n.safetensors", tmp_path / "x.safetensors", format="xlabs")
    assert not (tmp_path / "x.safetensors").exists()


def test_from_xlabs_reads_with_detection_skipped(run_cli, tmp_path):
    xlabs_file(tmp_path / "lora.safetensors")
    result = run_cli("pt2neutral", tmp_path / "lora.safetensors", "--from", "xlabs", "-o", tmp_path / "n.safetensors")
    assert result.exit_code == 0, result.output
    assert read_neutral(tmp_path / "n.safetensors").provenance["source_format"] == "xlabs"


def test_other_layouts_are_not_taken_for_xlabs(tmp_path):
    write_safetensors(tmp_path / "other.safetensors", {"double_blocks.0.img_attn.qkv.lora_down.weight":
                                                        Tensor.from_numpy(np.ones((4, 8), "f4"))}, {})
    assert not get_format("xlabs").detect(tmp_path / "other.safetensors")


@pytest.mark.parametrize("broken, expected", [
    ({"drop": "double_blocks.0.processor.qkv_lora1.up.weight"},
     "transformer.double_blocks.0.processor.qkv_lora1 has lora_A.weight but no lora_B.weight"),
    ({"drop": "single_blocks.1.processor.proj_lora.down.weight"},
     "transformer.single_transformer_blocks.1.proj_out has lora_B.weight but no lora_A.weight"),
])
def test_a_missing_half_is_one_line(run_cli, tmp_path, broken, expected):
    xlabs_file(tmp_path / "bad.safetensors", **broken)
    result = run_cli("pt2neutral", tmp_path / "bad.safetensors", "-o", tmp_path / "n.safetensors")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'bad.safetensors'}: ")
    assert expected in lines[0] and not (tmp_path / "n.safetensors").exists()


def test_wrong_shapes_are_one_line(run_cli, tmp_path):
    arrays = {"double_blocks.0.processor.proj_lora1.down.weight": np.ones((4, HIDDEN), "f4"),
              "double_blocks.0.processor.proj_lora1.up.weight": np.ones((HIDDEN, 5), "f4"),  # rank 5 != 4
              "single_blocks.0.processor.proj_lora.down.weight": np.ones((4, 999), "f4"),  # not linear2's 15360
              "single_blocks.0.processor.proj_lora.up.weight": np.ones((HIDDEN, 4), "f4")}
    write_safetensors(tmp_path / "bad.safetensors", {k: Tensor.from_numpy(v) for k, v in arrays.items()}, {})
    result = run_cli("pt2neutral", tmp_path / "bad.safetensors", "-o", tmp_path / "n.safetensors")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "to_out.0" in lines[0] and not (tmp_path / "n.safetensors").exists()


def test_nan_is_warned_about_and_refused_with_strict(run_cli, tmp_path):
    xlabs_file(tmp_path / "nan.safetensors", nan=True)
    refused = run_cli("pt2neutral", tmp_path / "nan.safetensors", "--strict", "-o", tmp_path / "n.safetensors")
    lines = refused.stderr.strip().splitlines()
    assert refused.exit_code == 1 and len(lines) == 1 and "NaN" in lines[0] and not (tmp_path / "n.safetensors").exists()
    warned = quietly(convert, tmp_path / "nan.safetensors", tmp_path / "n.safetensors", "neutral", progress=False)
    assert any("NaN" in w for w in warned.warnings)
