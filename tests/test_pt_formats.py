"""The diffusers, PEFT and old-diffusers formats as specifications: key grammars, alpha rules,
bit-exact round trips pt -> neutral -> pt in every dtype, and safe PEFT directory writing."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from lorabridge.converters.torch import neutral2pt, pt2neutral
from lorabridge.errors import LoraBridgeError, LoraBridgeWarning
from lorabridge.formats import diffusers, legacy_diffusers, peft
from lorabridge.formats.contract import WriteOptions
from lorabridge.formats.neutral import read_neutral, write_neutral
from lorabridge.io.safetensors_file import read_safetensors, write_safetensors
from lorabridge.io.torch_file import read_state_dict
from lorabridge.model import LoraModel, LoraModule
from lorabridge.architectures.sdxl import SDXL
from lorabridge.naming import diffusers_keys, legacy_diffusers_keys, peft_config, peft_keys
from lorabridge.tensor import Tensor
from tests.fixtures.core import make_lora_model, make_lora_module

FORMATS = ("diffusers", "peft", "legacy-diffusers")
DTYPES = ("F32", "F16", "BF16")


def varied(dtype="F32", alphas=(8.0, 3.0, 16.0, 1.0)) -> LoraModel:
    """The SDXL sample modules with ranks 4/2 and alphas varying per module."""
    model = make_lora_model(dtype=dtype)
    for i, module in enumerate(model.modules.values()):
        module.alpha = alphas[i % len(alphas)]
    return model


def state_dicts(path):
    """Every tensor of a written PyTorch-world output (a file, or a PEFT directory of adapters)."""
    if path.is_dir():
        return {f"{p.parent.name}/{k}": t for p in sorted(path.glob("*/adapter_model.safetensors"))
                for k, t in read_safetensors(p)[0].items()}
    return read_state_dict(path)[0]


# ---- key grammars ---------------------------------------------------------------------------


@pytest.mark.parametrize("key, parsed", [
    ("down_blocks.1.attentions.0.proj_in.lora_A.weight", ("down_blocks.1.attentions.0.proj_in", "lora_A.weight", None)),
    ("conv_in.lora_B.default.weight", ("conv_in", "lora_B.weight", "default")),
    ("text_model.encoder.layers.0.mlp.fc1.lora_A.default_0.weight", ("text_model.encoder.layers.0.mlp.fc1", "lora_A.weight", "default_0")),
    ("mid_block.attentions.0.proj_out.lora_magnitude_vector", ("mid_block.attentions.0.proj_out", "dora_scale", None)),
    ("mid_block.attentions.0.proj_out.lora_magnitude_vector.default.weight", ("mid_block.attentions.0.proj_out", "dora_scale", "default")),
    ("conv_in.weight", None),
    ("lora_unet_conv_in.lora_down.weight", None),
])
def test_peft_key_grammar(key, parsed):
    assert peft_keys.parse_key(key) == parsed


def test_pattern_lookup_is_pefts_own():
    get_pattern_key = pytest.importorskip("peft.utils.other").get_pattern_key
    patterns = {"attn2.to_k": 2, "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 8, "to_out.0": 1}
    for path in ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
                 "up_blocks.0.attentions.0.transformer_blocks.3.attn1.to_out.0", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                 "xattn2.to_k"]:
        key = get_pattern_key(list(patterns), path)
        assert peft_config.pattern_value(patterns, path, 4) == patterns.get(key, 4), path


def test_config_alpha_follows_alpha_pattern_and_rslora():
    config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"attn2.to_k": 2}}
    assert peft_config.config_alpha(config, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 4) == 8
    assert peft_config.config_alpha(config, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 4) == 2
    # rsLoRA scales by alpha / sqrt(r): the neutral alpha keeps alpha_neutral / r equal to it
    assert peft_config.config_alpha({**config, "use_rslora": True}, "conv_in", 16) == pytest.approx(8 * math.sqrt(16))
    assert peft_config.config_alpha({"r": 4}, "conv_in", 4) is None


def lora_layers(component: str) -> list[str]:
    types = SDXL.module_types(component)
    return [path for path, kind in types.items() if kind in ("Linear", "Conv2d")]


@pytest.mark.parametrize("component", ["unet", "text_encoder", "text_encoder_2"])
def test_old_diffusers_spelling_round_trips_for_every_sdxl_layer(component):
    for path in lora_layers(component):
        module = LoraModule(f"{component}.{path}", "lora", {}, 4.0)
        for role in ("lora_A.weight", "lora_B.weight"):
            assert legacy_diffusers_keys.parse_key(legacy_diffusers_keys.spell(module, role)) == (component, path, role)


def test_old_diffusers_spellings_are_the_seeds_and_diffusers():
    q = LoraModule("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "lora", {}, 4.0)
    out = LoraModule("unet.mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0", "lora", {}, 4.0)
    te = LoraModule("text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj", "lora", {}, 4.0)
    ff = LoraModule("unet.up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2", "lora", {}, 4.0)
    # first and eighth line of MindONE's pt_lora_params_ordered.txt, the seed's output names
    assert legacy_diffusers_keys.spell(q, "lora_A.weight") == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight"
    assert legacy_diffusers_keys.spell(out, "lora_B.weight") == "unet.mid_block.attentions.0.transformer_blocks.9.attn2.processor.to_out_lora.up.weight"
    assert legacy_diffusers_keys.spell(te, "lora_A.weight") == "text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj.lora_linear_layer.down.weight"
    assert legacy_diffusers_keys.spell(ff, "lora_B.weight") == "unet.up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2.lora.up.weight"
    # text encoders' old attention-processor spelling, and unprefixed (very old) UNet files
    assert legacy_diffusers_keys.parse_key("text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.up.weight") == \
        ("text_encoder", "text_model.encoder.layers.0.self_attn.out_proj", "lora_B.weight")
    assert legacy_diffusers_keys.parse_key("mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora.down.weight") == \
        (None, "mid_block.attentions.0.transformer_blocks.0.attn1.to_k", "lora_A.weight")


def test_diffusers_reader_takes_both_spellings_in_one_file():
    assert diffusers_keys.parse("unet.conv_in.lora_A.weight") == ("unet", "conv_in", "lora_A.weight", None)
    assert diffusers_keys.parse("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight") == \
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "lora_A.weight", None)
    assert diffusers_keys.parse("transformer.single_transformer_blocks.0.proj_out.lora_B.weight")[0] == "transformer"
    assert diffusers_keys.parse("down_blocks.1.attentions.0.proj_in.lora_A.weight") is None  # no component: PEFT's


# ---- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_pt_to_neutral_to_pt_is_bit_exact(tmp_path, fmt, dtype):
    model = varied(dtype, alphas=(4.0,) if fmt == "legacy-diffusers" else (8.0, 3.0, 16.0, 1.0))
    write_neutral(model, tmp_path / "start.safetensors")
    first = neutral2pt(tmp_path / "start.safetensors", tmp_path / "first", format=fmt, progress=False).output
    middle = pt2neutral(first, tmp_path / "middle.safetensors", progress=False)
    assert middle.source_format == fmt
    second = neutral2pt(middle.output, tmp_path / "second", format=fmt, progress=False).output
    a, b = state_dicts(first), state_dicts(second)
    assert list(a) == list(b)
    assert all(a[k].same_as(b[k]) for k in a)
    back = read_neutral(middle.output)
    for name, module in model.modules.items():
        assert back.modules[name].alpha == module.alpha
        assert all(back.modules[name].tensors[r].same_as(t) for r, t in module.tensors.items())


@pytest.mark.parametrize("suffix", [".ckpt", ".bin"])
def test_legacy_torch_pickle_round_trip_is_bit_exact(tmp_path, suffix):
    model = make_lora_model(alpha=4.0)
    write_neutral(model, tmp_path / "n.safetensors")
    first = neutral2pt(tmp_path / "n.safetensors", tmp_path / f"lora_pt{suffix}", format="legacy-diffusers", progress=False).output
    middle = pt2neutral(first, tmp_path / "m.safetensors", progress=False).output
    second = neutral2pt(middle, tmp_path / f"again_pt{suffix}", format="legacy-diffusers", progress=False).output
    a, b = read_state_dict(first)[0], read_state_dict(second)[0]
    assert list(a) == list(b) and all(a[k].same_as(b[k]) for k in a)
    assert all(m.alpha_source == "assumed" for m in read_neutral(middle).modules.values())


def test_dtype_option_casts_every_tensor(tmp_path):
    write_neutral(make_lora_model(), tmp_path / "n.safetensors")
    out = neutral2pt(tmp_path / "n.safetensors", tmp_path / "half.safetensors", dtype="bf16", progress=False).output
    tensors = read_safetensors(out)[0]
    assert {t.dtype for t in tensors.values()} == {"BF16"}
    a = tensors["unet.down_blocks.1.resnets.0.conv1.lora_A.weight"].to_float32()
    want = make_lora_model().modules["unet.down_blocks.1.resnets.0.conv1"].tensors["lora_A.weight"].to_float32()
    np.testing.assert_allclose(a, want, rtol=2 ** -8)


# ---- alpha -------------------------------------------------------------------------------------


def test_diffusers_metadata_is_prefixed_loraconfig_with_patterns(tmp_path):
    write_neutral(varied(), tmp_path / "n.safetensors")
    out = neutral2pt(tmp_path / "n.safetensors", tmp_path / "d.safetensors", progress=False).output
    tensors, metadata = read_safetensors(out)
    config = json.loads(metadata["lora_adapter_metadata"])
    assert metadata["format"] == "pt"
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] in (8.0, 3.0, 16.0, 1.0)
    assert set(config["unet.alpha_pattern"]) | {k for k in config["unet.target_modules"]
                                                if k not in config["unet.alpha_pattern"]} == set(config["unet.target_modules"])
    assert all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) and ".lora_" in k for k in tensors)


def test_alpha_comes_from_metadata_then_user_then_rank(tmp_path):
    model = varied()
    write_neutral(model, tmp_path / "n.safetensors")
    with_meta = neutral2pt(tmp_path / "n.safetensors", tmp_path / "d.safetensors", progress=False).output
    tensors, _ = read_safetensors(with_meta)
    write_safetensors(tmp_path / "bare.safetensors", tensors, {"format": "pt"})
    stored = read_neutral(pt2neutral(with_meta, tmp_path / "1.safetensors", progress=False).output)
    assert {m.alpha_source for m in stored.modules.values()} == {"stored"}
    assert {n: m.alpha for n, m in stored.modules.items()} == {n: m.alpha for n, m in model.modules.items()}
    user = read_neutral(pt2neutral(tmp_path / "bare.safetensors", tmp_path / "2.safetensors", alpha=6, progress=False).output)
    assert {(m.alpha, m.alpha_source) for m in user.modules.values()} == {(6.0, "user")}
    assumed = read_neutral(pt2neutral(tmp_path / "bare.safetensors", tmp_path / "3.safetensors", progress=False).output)
    assert all(m.alpha == m.rank and m.alpha_source == "assumed" for m in assumed.modules.values())


def test_user_alpha_never_overrides_a_stored_one(tmp_path):
    write_neutral(varied(), tmp_path / "n.safetensors")
    with_meta = neutral2pt(tmp_path / "n.safetensors", tmp_path / "d.safetensors", progress=False).output
    result = pt2neutral(with_meta, tmp_path / "1.safetensors", alpha=99, progress=False)
    assert all(m.alpha != 99 for m in result.model.modules.values())
    assert any("--alpha 99 applies only to the others" in w for w in result.warnings)


def test_legacy_writer_folds_alpha_into_up_with_a_warning(tmp_path):
    model = make_lora_model(alpha=8.0)  # rank 4: scale 2
    write_neutral(model, tmp_path / "n.safetensors")
    result = neutral2pt(tmp_path / "n.safetensors", tmp_path / "l.safetensors", format="legacy-diffusers", progress=False)
    assert any("folded into the up factor of 6 module(s)" in w for w in result.warnings)
    back = read_neutral(pt2neutral(result.output, tmp_path / "b.safetensors", progress=False).output)
    for name, module in model.modules.items():
        np.testing.assert_allclose(back.modules[name].delta_weight(), module.delta_weight(), rtol=1e-5, atol=1e-5)


def test_mixed_ranks_without_alpha_are_warned_about(tmp_path):
    write_neutral(varied(), tmp_path / "n.safetensors")
    with_meta = neutral2pt(tmp_path / "n.safetensors", tmp_path / "d.safetensors", progress=False).output
    tensors, _ = read_safetensors(with_meta)
    tensors = {k: t for k, t in tensors.items() if not k.startswith("unet.down_blocks.1.resnets")}
    tensors["unet.conv_in.lora_A.weight"] = Tensor.from_numpy(np.ones((2, 4, 3, 3), np.float32))
    tensors["unet.conv_in.lora_B.weight"] = Tensor.from_numpy(np.ones((320, 2, 1, 1), np.float32))
    write_safetensors(tmp_path / "bare.safetensors", tensors, {"format": "pt"})
    result = pt2neutral(tmp_path / "bare.safetensors", tmp_path / "o.safetensors", progress=False)
    assert any("ranks differ within unet" in w for w in result.warnings)


# ---- PEFT specifics ----------------------------------------------------------------------------


def test_peft_directory_layout_and_config(tmp_path):
    write_neutral(varied(), tmp_path / "n.safetensors")
    out = neutral2pt(tmp_path / "n.safetensors", tmp_path / "lora_peft", format="peft", progress=False).output
    assert sorted(p.name for p in out.iterdir()) == ["text_encoder", "text_encoder_2", "unet"]
    config = json.loads((out / "unet" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    keys = list(read_safetensors(out / "unet" / "adapter_model.safetensors")[0])
    assert all(k.startswith("base_model.model.") for k in keys)


@pytest.mark.parametrize("component", ["..", "/tmp/escaped", "a/b", "."])
def test_peft_writer_never_leaves_the_output_directory(tmp_path, component):
    model = LoraModel()
    model.add(make_lora_module(f"{component}.layer", (4, 4), 2, 2.0, np.random.default_rng(0)))
    with pytest.raises(LoraBridgeError, match="not a plain directory name"):
        peft.write(model, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no staging left behind


def test_peft_output_replaced_only_with_force(tmp_path, run_cli):
    write_neutral(make_lora_model(), tmp_path / "n.safetensors")
    out = tmp_path / "lora_peft"
    assert run_cli("neutral2pt", tmp_path / "n.safetensors", "--format", "peft", "-o", out).exit_code == 0
    (out / "unet" / "marker").write_text("old")
    refused = run_cli("neutral2pt", tmp_path / "n.safetensors", "--format", "peft", "-o", out)
    assert refused.exit_code == 1 and "pass --force" in refused.output and (out / "unet" / "marker").exists()
    assert run_cli("neutral2pt", tmp_path / "n.safetensors", "--format", "peft", "-o", out, "--force").exit_code == 0
    assert not (out / "unet" / "marker").exists() and (out / "unet" / "adapter_config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_adapter_name_suffixes_and_peft_prefix_are_understood(tmp_path):
    model = make_lora_model()
    raw = {f"base_model.model.{m.path}.{r.replace('.weight', '.default.weight')}": t
           for m in model.modules.values() if m.component == "unet" for r, t in m.tensors.items()}
    write_safetensors(tmp_path / "raw.safetensors", raw)
    result = pt2neutral(tmp_path / "raw.safetensors", tmp_path / "n.safetensors", progress=False)
    assert result.source_format == "peft"
    assert sorted(result.model.modules) == sorted(n for n in model.modules if n.startswith("unet."))


def test_text_encoder_of_an_unprefixed_peft_file_is_found_by_shape(tmp_path):
    rng = np.random.default_rng(0)
    clip_l = make_lora_module("x.text_model.encoder.layers.0.self_attn.q_proj", (768, 768), 4, 4.0, rng)
    big_g = make_lora_module("x.text_model.encoder.layers.0.self_attn.k_proj", (1280, 1280), 4, 4.0, rng)
    deep = make_lora_module("x.text_model.encoder.layers.20.mlp.fc2", (5120, 1280), 4, 4.0, rng)
    raw = {f"{m.path}.{r}": t for m in (clip_l, big_g, deep) for r, t in m.tensors.items()}
    write_safetensors(tmp_path / "te.safetensors", raw)
    model = peft.read(tmp_path / "te.safetensors")
    assert sorted(model.modules) == ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                                     "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj",
                                     "text_encoder_2.text_model.encoder.layers.20.mlp.fc2"]


def test_two_adapters_in_one_file_are_refused(tmp_path):
    model = make_lora_model()
    m1, m2 = list(model.modules.values())[:2]
    raw = {f"{m1.name}.lora_A.a.weight": m1.tensors["lora_A.weight"], f"{m1.name}.lora_B.a.weight": m1.tensors["lora_B.weight"],
           f"{m2.name}.lora_A.b.weight": m2.tensors["lora_A.weight"], f"{m2.name}.lora_B.b.weight": m2.tensors["lora_B.weight"]}
    write_safetensors(tmp_path / "two.safetensors", raw)
    with pytest.raises(LoraBridgeError, match="holds 2 adapters \\(a, b\\)"):
        diffusers.read(tmp_path / "two.safetensors")


def test_peft_dora_magnitudes_map_to_dora_scale_per_output_row(tmp_path):
    rng = np.random.default_rng(0)
    linear = make_lora_module("unet.down_blocks.1.attentions.0.proj_in", (640, 640), 4, 4.0, rng)
    conv = make_lora_module("unet.down_blocks.1.resnets.0.conv1", (320, 640, 3, 3), 4, 4.0, rng)
    raw = {}
    for m, peft_shape in ((linear, (640,)), (conv, (1, 640, 1, 1))):
        raw.update({f"{m.name}.{r}": t for r, t in m.tensors.items()})
        raw[f"{m.name}.lora_magnitude_vector"] = Tensor.from_numpy(rng.random(peft_shape).astype(np.float32))
    write_safetensors(tmp_path / "dora.safetensors", raw, {"format": "pt"})
    model = diffusers.read(tmp_path / "dora.safetensors")
    assert model.modules[linear.name].tensors["dora_scale"].shape == (640, 1)
    assert model.modules[conv.name].tensors["dora_scale"].shape == (640, 1, 1, 1)
    assert {m.dora_axis for m in model.modules.values()} == {"out"}
    diffusers.write(model, tmp_path / "again.safetensors")
    again = read_safetensors(tmp_path / "again.safetensors")[0]
    assert all(again[k].same_as(t) for k, t in raw.items())
    assert json.loads(read_safetensors(tmp_path / "again.safetensors")[1]["lora_adapter_metadata"])["unet.use_dora"]
    with pytest.raises(LoraBridgeError, match="stores no DoRA magnitudes"):
        legacy_diffusers.write(model, tmp_path / "old.safetensors")
    model.modules[linear.name].dora_axis = "in"
    with pytest.raises(LoraBridgeError, match="per output row only"):
        diffusers.write(model, tmp_path / "in.safetensors")


def test_loha_needs_baking_for_plain_lora_formats(tmp_path):
    rng = np.random.default_rng(0)
    model = make_lora_model()
    f = lambda *s: Tensor.from_numpy(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    model.add(LoraModule("unet.mid_block.attentions.0.proj_in", "loha",
                         {"hada_w1_a": f(1280, 4), "hada_w1_b": f(4, 1280), "hada_w2_a": f(1280, 4), "hada_w2_b": f(4, 1280)}, 4.0))
    for fmt in FORMATS:
        with pytest.raises(LoraBridgeError, match="1 module\\(s\\) are loha.*--bake-to-lora"):
            {"diffusers": diffusers, "peft": peft, "legacy-diffusers": legacy_diffusers}[fmt].write(model, tmp_path / fmt)
    assert list(tmp_path.iterdir()) == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LoraBridgeWarning)
        diffusers.write(model, tmp_path / "baked.safetensors", WriteOptions(bake_to_lora=8))
    assert any("baked 1 module(s)" in str(w.message) for w in caught)
    assert read_safetensors(tmp_path / "baked.safetensors")[0]["unet.mid_block.attentions.0.proj_in.lora_A.weight"].shape == (8, 1280)


def test_broken_configs_and_magnitudes_are_one_line_errors(tmp_path):
    model = make_lora_model()
    tensors = {f"{m.name}.{r}": t for m in model.modules.values() for r, t in m.tensors.items()}
    write_safetensors(tmp_path / "bad_alpha.safetensors", tensors, {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": "eight"})})
    with pytest.raises(LoraBridgeError, match="unusable alpha for unet.* in the LoRA config"):
        diffusers.read(tmp_path / "bad_alpha.safetensors")
    write_safetensors(tmp_path / "bad_json.safetensors", tensors, {"lora_adapter_metadata": "{not json"})
    with pytest.raises(LoraBridgeError, match="lora_adapter_metadata is not JSON"):
        diffusers.read(tmp_path / "bad_json.safetensors")
    q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    magnitude = {f"{q}.lora_magnitude_vector": Tensor.from_numpy(np.ones(7, np.float32))}
    write_safetensors(tmp_path / "bad_dora.safetensors", {**tensors, **magnitude})
    with pytest.raises(LoraBridgeError, match="DoRA magnitude has 7 values, expected 640"):
        diffusers.read(tmp_path / "bad_dora.safetensors")


def test_a_pattern_that_is_no_regex_is_taken_literally():
    assert peft_config.pattern_value({"attn1.to_q(": 2}, "mid_block.attn1.to_q(", 4) == 2
    assert peft_config.pattern_value({"attn1.to_q(": 2}, "mid_block.attn1.to_k", 4) == 4


def test_legacy_writer_warns_when_ranks_differ_within_a_component(tmp_path):
    rng = np.random.default_rng(0)
    model = LoraModel()
    model.add(make_lora_module("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (640, 640), 4, 4.0, rng))
    model.add(make_lora_module("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", (640, 640), 8, 8.0, rng))
    write_neutral(model, tmp_path / "n.safetensors")
    result = neutral2pt(tmp_path / "n.safetensors", tmp_path / "l.safetensors", format="legacy-diffusers", progress=False)
    assert any("ranks differ within unet" in w for w in result.warnings)


def test_peft_adapter_saved_as_a_torch_pickle_is_read(tmp_path):
    torch = pytest.importorskip("torch")
    write_neutral(varied(), tmp_path / "n.safetensors")
    out = neutral2pt(tmp_path / "n.safetensors", tmp_path / "lora_peft", format="peft", progress=False).output
    weights = out / "unet" / "adapter_model.safetensors"
    torch.save({k: torch.from_numpy(t.to_numpy().copy()) for k, t in read_safetensors(weights)[0].items()},
               out / "unet" / "adapter_model.bin")
    weights.unlink()
    model = read_neutral(pt2neutral(out / "unet", tmp_path / "back.safetensors", progress=False).output)
    assert sorted(model.modules) == sorted(n for n in varied().modules if n.startswith("unet."))
    assert {m.alpha_source for m in model.modules.values()} == {"stored"}
