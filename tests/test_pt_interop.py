"""Real third-party checks on the tiny SDXL pipeline: what neutral2pt writes loads in diffusers and PEFT
with every module's alpha; what diffusers/PEFT training writes converts exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorabridge.converters.torch import neutral2pt, pt2neutral
from lorabridge.formats.neutral import read_neutral, write_neutral
from lorabridge.model import LoraModel
from tests.fixtures.torch_lora import COMPONENTS, assert_fused, base_weights, diffusers_messages, torch_layer

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.torch, pytest.mark.slow]

# What diffusers says when a state dict and a model disagree; none of it may appear.
KEY_TROUBLE = ("missing keys", "unexpected keys", "not loaded", "No LoRA keys associated", "not found")


def key_trouble(messages: list[str]) -> list[str]:
    return [m for m in messages if any(t.lower() in m.lower() for t in KEY_TROUBLE)]


def load_lora(pipe, path) -> list[str]:
    """pipe.load_lora_weights(path) (offline mode wants directory + weight_name), returning what it said."""
    with diffusers_messages() as messages:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    return messages


def test_diffusers_export_loads_with_every_module_and_alpha(varied_neutral, tiny_pipe_factory, tmp_path, run_cli):
    out = tmp_path / "pytorch_lora_weights.safetensors"
    assert run_cli("neutral2pt", varied_neutral, "-o", out).exit_code == 0
    model = read_neutral(varied_neutral)
    pipe = tiny_pipe_factory()
    base = base_weights(pipe, model.modules)
    assert key_trouble(load_lora(pipe, out)) == []
    for name, module in model.modules.items():
        component, path = name.split(".", 1)
        layer = getattr(pipe, component).get_submodule(path)
        assert (layer.r["default_0"], layer.scaling["default_0"]) == (module.rank, pytest.approx(module.alpha / module.rank)), name
    assert len({m.rank for m in model.modules.values()}) > 1 and len({m.alpha for m in model.modules.values()}) > 1
    pipe.fuse_lora(components=list(COMPONENTS))
    assert_fused(pipe, model, base)


def test_peft_export_loads_with_peftmodel_from_pretrained(varied_neutral, tiny_pipe_factory, tmp_path):
    from peft import PeftModel

    out = neutral2pt(varied_neutral, tmp_path / "lora_peft", format="peft", progress=False).output
    model = read_neutral(varied_neutral)
    for component in COMPONENTS:
        pipe = tiny_pipe_factory()
        names = [n for n in model.modules if n.startswith(component + ".")]
        base = base_weights(pipe, names)
        with diffusers_messages() as messages:
            wrapped = PeftModel.from_pretrained(getattr(pipe, component), str(out / component))
        assert key_trouble(messages) == []
        setattr(pipe, component, wrapped.merge_and_unload())
        assert_fused(pipe, LoraModel(modules={n: model.modules[n] for n in names}), base)


def test_peft_export_loads_with_set_peft_model_state_dict(varied_neutral, tiny_pipe_factory, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    out = neutral2pt(varied_neutral, tmp_path / "lora_peft", format="peft", progress=False).output
    model = read_neutral(varied_neutral)
    pipe = tiny_pipe_factory()
    for component in COMPONENTS:
        config = json.loads((out / component / "adapter_config.json").read_text())
        config = {k: v for k, v in config.items() if k in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora")}
        target = getattr(pipe, component)
        inject_adapter_in_model(LoraConfig(**config), target)
        state = {k.removeprefix("base_model.model."): v for k, v in load_file(out / component / "adapter_model.safetensors").items()}
        result = set_peft_model_state_dict(target, state)
        assert [k for k in result.unexpected_keys if "lora_" in k] == []
        assert [k for k in result.missing_keys if "lora_" in k] == []
    for name, module in model.modules.items():
        component, path = name.split(".", 1)
        layer = getattr(pipe, component).get_submodule(path)
        np.testing.assert_array_equal(layer.lora_A["default"].weight.detach().numpy(), module.tensors["lora_A.weight"].to_numpy())
        assert layer.scaling["default"] == pytest.approx(module.alpha / module.rank), name


def test_legacy_export_loads_in_diffusers_and_load_attn_procs(tiny_pipe_factory, varied_neutral, tmp_path):
    """Old spelling, alpha folded into up: same weights as the neutral math, where ranks agree per component
    (diffusers gives an alpha-less file one rank as alpha for every module, see the writer's warning)."""
    varied = read_neutral(varied_neutral)
    model = LoraModel()
    for module in varied.modules.values():
        if module.rank == 4:  # one rank, still many alphas
            model.add(module)
    write_neutral(model, tmp_path / "rank4.safetensors")
    for suffix in (".safetensors", ".ckpt"):
        out = neutral2pt(tmp_path / "rank4.safetensors", tmp_path / f"lora_pt{suffix}", format="legacy-diffusers", progress=False).output
        pipe = tiny_pipe_factory()
        base = base_weights(pipe, model.modules)
        assert key_trouble(load_lora(pipe, out)) == []
        pipe.fuse_lora(components=list(COMPONENTS))
        assert_fused(pipe, model, base, rtol=1e-5, atol=1e-5)
    pipe = tiny_pipe_factory()
    with diffusers_messages() as messages:
        pipe.unet.load_attn_procs(str(tmp_path), weight_name="lora_pt.ckpt", use_safetensors=False)  # the seed's loader
    assert key_trouble(messages) == []
    unet_modules = [n for n in model.modules if n.startswith("unet.")]
    assert all(hasattr(getattr(pipe.unet.get_submodule(n.split(".", 1)[1]), "lora_A", None), "keys") for n in unet_modules)


@pytest.mark.parametrize("variant", ["diffusers-script", "diffusers-peft", "diffusers-nometa", "peft-state-dict", "peft-dir"])
def test_files_written_by_diffusers_and_peft_training_convert_exactly(trained_lora, tmp_path, variant):
    result = pt2neutral(trained_lora.files[variant], tmp_path / "n.safetensors", progress=False)
    model = read_neutral(result.output)
    truth = {n: t for n, t in trained_lora.truth.items() if variant.startswith("diffusers") or n.startswith("unet.")}
    assert sorted(model.modules) == sorted(truth)
    for name, (a, b, scaling) in truth.items():
        module = model.modules[name]
        np.testing.assert_array_equal(module.tensors["lora_A.weight"].to_numpy(), a, err_msg=name)
        np.testing.assert_array_equal(module.tensors["lora_B.weight"].to_numpy(), b, err_msg=name)
        if variant in ("diffusers-nometa", "peft-state-dict"):  # no config: alpha unknown
            assert (module.alpha, module.alpha_source) == (module.rank, "assumed")
        else:
            assert module.alpha_source == "stored" and module.scale == pytest.approx(scaling), name
    assert len({s for _, _, s in truth.values()}) > 2  # per-module patterns really were exercised


def test_trained_lora_round_trips_back_into_diffusers(trained_lora, tiny_pipe_factory, tmp_path):
    """diffusers training output -> neutral -> diffusers: the pipeline ends with the trained weights."""
    neutral = pt2neutral(trained_lora.files["diffusers-script"], tmp_path / "n.safetensors", progress=False).output
    out = neutral2pt(neutral, tmp_path / "again.safetensors", progress=False).output
    pipe = tiny_pipe_factory()
    base = base_weights(pipe, trained_lora.truth)
    assert key_trouble(load_lora(pipe, out)) == []
    pipe.fuse_lora(components=list(COMPONENTS))
    for name, (a, b, scaling) in trained_lora.truth.items():
        want = base[name] + scaling * (b.astype(np.float64) @ a.astype(np.float64))
        np.testing.assert_allclose(torch_layer(pipe, name).weight.detach().numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_seed_pickled_pt_ckpt_converts_and_comes_back(trained_lora, tiny_pipe_factory, tmp_path):
    """The seed's convert_lora_ms2pt.py output: torch.save of old attention-processor names."""
    processor = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    seed = {}
    for name, (a, b, _) in trained_lora.truth.items():
        for leaf, old_name in processor.items():
            if name.startswith("unet.") and name.endswith("." + leaf):
                stem = f"{name.removesuffix('.' + leaf)}.processor.{old_name}"
                seed[f"{stem}.down.weight"], seed[f"{stem}.up.weight"] = torch.tensor(a), torch.tensor(b)
    torch.save(seed, tmp_path / "sdxl_lora_pt.ckpt")
    result = pt2neutral(tmp_path / "sdxl_lora_pt.ckpt", tmp_path / "n.safetensors", progress=False)
    assert result.source_format == "legacy-diffusers" and len(result.model.modules) == len(seed) // 2
    assert {m.alpha_source for m in result.model.modules.values()} == {"assumed"}
    back = neutral2pt(result.output, tmp_path / "again_pt.ckpt", format="legacy-diffusers", progress=False).output
    again = torch.load(back, weights_only=True)
    assert list(again) == list(seed)
    assert all(torch.equal(again[k], seed[k]) and again[k].dtype == seed[k].dtype for k in seed)


def test_peft_dora_round_trips_through_neutral_into_diffusers(tiny_pipe_factory, tmp_path):
    """PEFT DoRA (linear and conv magnitudes) -> neutral dora_scale -> diffusers: identical fused weights."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(0)
    pipe = tiny_pipe_factory()
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", use_dora=True, target_modules=["to_q", "to_out.0", "conv1"])
    pipe.unet.add_adapter(config)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn_like(p) * 0.1)
    state = get_peft_model_state_dict(pipe.unet)
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "dora", unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict())
    names = [f"unet.{k.rsplit('.lora_A', 1)[0]}" for k in state if ".lora_A." in k]
    pipe.fuse_lora(components=["unet"])
    want = {n: torch_layer(pipe, n).weight.detach().numpy().copy() for n in names}
    neutral = pt2neutral(tmp_path / "dora" / "pytorch_lora_weights.safetensors", tmp_path / "n.safetensors", progress=False)
    assert {m.dora_axis for m in neutral.model.modules.values()} == {"out"}
    out = neutral2pt(neutral.output, tmp_path / "again.safetensors", progress=False).output
    fresh = tiny_pipe_factory()
    messages = load_lora(fresh, out)
    assert [m for m in key_trouble(messages) if "No LoRA keys associated" not in m] == []  # UNet-only file
    fresh.fuse_lora(components=["unet"])
    for name in names:
        np.testing.assert_allclose(torch_layer(fresh, name).weight.detach().numpy(), want[name], rtol=1e-6, atol=1e-6)


def test_text_encoder_lora_of_mlp_layers_only_loads(tiny_pipe_factory, tmp_path):
    """diffusers 0.35 cannot infer the spelling of a text-encoder state dict without q/k/v/out_proj
    ("Could not automatically infer state dict type"); the writer spells such a component the old way."""
    from tests.fixtures.core import make_lora_module

    pipe = tiny_pipe_factory()
    rng = np.random.default_rng(0)
    model = LoraModel()
    for name in ("text_encoder_2.text_model.encoder.layers.0.mlp.fc2", "text_encoder.text_model.encoder.layers.1.mlp.fc1",
                 "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"):
        w = torch_layer(pipe, name).weight
        model.add(make_lora_module(name, (w.shape[1], w.shape[0]), 4, 8.0, rng))
    write_neutral(model, tmp_path / "mlp.safetensors")
    out = neutral2pt(tmp_path / "mlp.safetensors", tmp_path / "mlp_diffusers.safetensors", progress=False).output
    base = base_weights(pipe, model.modules)
    assert key_trouble(load_lora(pipe, out)) == []
    pipe.fuse_lora(components=list(COMPONENTS))
    assert_fused(pipe, model, base)
    assert pt2neutral(out, tmp_path / "back.safetensors", progress=False).model.modules.keys() == model.modules.keys()
