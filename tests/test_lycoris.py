"""LyCORIS files written by lycoris-lora on the tiny SDXL pipeline convert correctly, and back.

Inputs come from lycoris-lora 4.1.3 itself (tests/fixtures/lycoris.py): LoRA/LoCon, LoHa, LoKr,
DoRA with the magnitude on either axis, Tucker variants, ``lora_unet_``/``lora_te1_``/``lora_te2_``
and ``lycoris_`` prefixes, fp32/fp16/bf16. For every module lycoris created, the layer it adapts
(taken from the module object, not its name) must be in the neutral file under its diffusers name,
and running the layer with the neutral weights must give what the layer gives with the LyCORIS
module applied.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lycoris")
pytestmark = pytest.mark.torch

from lorabridge.converters import convert  # noqa: E402
from lorabridge.errors import LoraBridgeError  # noqa: E402
from lorabridge.formats.neutral import read_neutral  # noqa: E402
from lorabridge.io.safetensors_file import read_safetensors  # noqa: E402
from tests.fixtures.lycoris import effective_weight, layer_input, load_torch_components, run_layer  # noqa: E402


CASES = {  # id -> (algo, prefix, lycoris options)
    "lora": ("lora", "lora_unet", {}),
    "loha": ("loha", "lora_unet", {}),
    "lokr": ("lokr", "lora_unet", {"factor": 4}),
    "lokr-decompose-both-bf16": ("lokr", "lora_unet", {"factor": 8, "decompose_both": True, "dtype": "bfloat16"}),
    "dora-out": ("lora", "lora_unet", {"dora_wd": True}),
    "dora-in": ("lora", "lora_unet", {"dora_wd": True, "wd_on_output": False}),
    "loha-dora-in-fp16": ("loha", "lora_unet", {"dora_wd": True, "wd_on_output": False, "dtype": "float16"}),
    "loha-tucker": ("loha", "lora_unet", {"use_tucker": True}),
    "lokr-tucker": ("lokr", "lora_unet", {"factor": 4, "use_tucker": True}),
    "lycoris-lora": ("lora", "lycoris", {}),
    "lycoris-loha": ("loha", "lycoris", {}),
    "lycoris-lokr-fp16": ("lokr", "lycoris", {"factor": 4, "dtype": "float16"}),
}


def assert_same_outputs(model, case):
    """Every lycoris module's layer output equals the layer run with the neutral module's weight."""
    assert set(model.modules) == set(case.modules)
    worst = 0.0
    with torch.no_grad():
        for name, lyco in case.modules.items():
            layer, x = case.layers[name], layer_input(case.layers[name])
            expected = lyco(x)
            got = run_layer(layer, effective_weight(model.modules[name], layer), x)
            worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    assert worst < 1e-4, worst


@pytest.mark.parametrize("case_id", CASES)
def test_lycoris_files_convert_to_neutral_modules_computing_what_lycoris_computes(case_id, lycoris_file, tmp_path):
    algo, prefix, options = CASES[case_id]
    case = lycoris_file(algo, prefix, **options)
    result = convert(case.path, tmp_path / "neutral.safetensors", to="neutral", progress=False)
    # A LyCORIS LoRA/LoCon under lora_unet_ keys is a kohya file (diffusers spelling): either reader gives this model.
    assert result.source_format == ("kohya" if (algo, prefix) == ("lora", "lora_unet") and "use_tucker" not in options else "lycoris")
    model = read_neutral(result.output, verify_hash=True)
    kinds = {"lora": "lora", "loha": "loha", "lokr": "lokr"}
    assert set(model.summary()["kinds"]) == {kinds[algo]}
    if "dora_wd" in options:
        axis = "out" if options.get("wd_on_output", True) else "in"
        assert {m.dora_axis for m in model.modules.values()} == {axis}
    if prefix == "lora_unet":  # create_network adapted both text encoders too
        assert set(model.components) == {"unet", "text_encoder", "text_encoder_2"}
    assert model.training["ss_algo"] == algo
    assert_same_outputs(model, case)


def test_tucker_locon_converts_with_its_mid_folded_and_a_warning(lycoris_file, tmp_path):
    case = lycoris_file("lora", use_tucker=True)
    result = convert(case.path, tmp_path / "neutral.safetensors", to="neutral", progress=False)
    assert any("folded the Tucker lora_mid" in w for w in result.warnings)
    assert_same_outputs(read_neutral(result.output), case)


@pytest.mark.parametrize("case_id", ["loha", "lokr-tucker", "dora-in", "loha-dora-in-fp16", "lokr-decompose-both-bf16"])
def test_lycoris_to_neutral_to_lycoris_is_bit_exact(case_id, lycoris_file, tmp_path):
    algo, prefix, options = CASES[case_id]
    case = lycoris_file(algo, prefix, **options)
    neutral = convert(case.path, tmp_path / "n.safetensors", to="neutral", progress=False).output
    back = convert(neutral, tmp_path / "back.safetensors", to="lycoris", progress=False).output
    original, original_meta = read_safetensors(case.path)
    written, written_meta = read_safetensors(back)
    assert set(written) == set(original)
    assert all(written[k].same_as(original[k]) for k in original)
    assert {k: v for k, v in written_meta.items() if k.startswith("ss_")} == \
           {k: v for k, v in original_meta.items() if k.startswith("ss_")}


@pytest.mark.parametrize("algo", ["loha", "full"])
def test_create_lycoris_files_come_back_under_lycoris_keys_and_lycoris_loads_every_module(algo, lycoris_file, tiny_sdxl_dir,
                                                                                          tmp_path, run_cli):
    """SimpleTuner's LyCORIS files (``create_lycoris`` + ``save_weights``): ``lycoris_`` keys. Written back as
    ``lora_unet_``, ``create_lycoris_from_weights`` found 0 modules in them, silently; the prefix is now kept
    (manifest ``key_prefix``) and ``neutral2pt --format lycoris`` writes it again. ``full`` is LyCORIS' full
    weight delta (``diff``, ``diff_b`` where the layer has a bias)."""
    from lycoris import create_lycoris_from_weights

    case = lycoris_file(algo, "lycoris")
    neutral = convert(case.path, tmp_path / "n.safetensors", to="neutral", progress=False).output
    model = read_neutral(neutral, verify_hash=True)
    assert {m.extra.get("key_prefix") for m in model.modules.values()} == {"lycoris"}
    assert set(model.summary()["kinds"]) == {algo}
    out = tmp_path / "back.safetensors"
    assert run_cli("neutral2pt", str(neutral), "--format", "lycoris", "-o", str(out)).exit_code == 0
    original, _ = read_safetensors(case.path)
    written, _ = read_safetensors(out)
    assert set(written) == set(original)
    assert all(written[k].same_as(t) for k, t in original.items())
    unet = load_torch_components(tiny_sdxl_dir)["unet"]
    network, _ = create_lycoris_from_weights(1.0, str(out), unet)
    assert len(network.loras) == len(case.modules) == len(model.modules)
    assert {type(m).__name__ for m in network.loras} == {type(m).__name__ for m in case.modules.values()}


def test_a_lycoris_full_module_reads_as_its_weight_and_bias_delta(lycoris_file, tmp_path):
    case = lycoris_file("full", "lycoris")
    model = read_neutral(convert(case.path, tmp_path / "n.safetensors", to="neutral", progress=False).output)
    original, _ = read_safetensors(case.path)
    with_bias = [m for m in model.modules.values() if "diff_b" in m.tensors]
    assert with_bias and len(with_bias) < len(model.modules)  # to_out.0 has a bias, to_q/k/v have none
    for module in model.modules.values():
        key = "lycoris_" + module.path.replace(".", "_")
        assert module.tensors["diff"].same_as(original[f"{key}.diff"])
        assert (module.rank, module.scale, module.weight_shape) == (0, 1.0, tuple(original[f"{key}.diff"].shape))
        assert (module.delta_weight() == original[f"{key}.diff"].to_float32()).all()
        if "diff_b" in module.tensors:
            assert module.tensors["diff_b"].same_as(original[f"{key}.diff_b"])


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["loha", "lokr", "dora-out"])
def test_our_lycoris_export_loads_in_lycoris_and_computes_the_same(case_id, lycoris_file, tiny_sdxl_dir, tmp_path):
    """lycoris' create_network_from_weights rebuilds every module from our file, with the same outputs.

    (lycoris 4.1.3 rebuilds DoRA modules with wd_on_out=True whatever the file says, so it cannot
    reload its own ``wd_on_output=False`` files; the "in" axis is checked by conversion above.)
    """
    from lycoris.kohya import create_network_from_weights

    algo, prefix, options = CASES[case_id]
    case = lycoris_file(algo, prefix, **options)
    neutral = convert(case.path, tmp_path / "n.safetensors", to="neutral", progress=False).output
    ours = convert(neutral, tmp_path / "ours.safetensors", to="lycoris", progress=False).output
    models = load_torch_components(tiny_sdxl_dir)
    encoders = [models["text_encoder"], models["text_encoder_2"]]
    network, _ = create_network_from_weights(1.0, str(ours), None, encoders, models["unet"])
    network.apply_to(encoders, models["unet"], True, True)
    reloaded = {m.lora_name: m for m in network.loras}
    assert set(reloaded) == {m.lora_name for m in case.modules.values()}
    with torch.no_grad():
        for original in case.modules.values():
            x = layer_input(original.org_module[0])
            torch.testing.assert_close(reloaded[original.lora_name](x), original(x), rtol=1e-5, atol=1e-5)


# --- lycoris-lora 4.1.3 behaviour that the fixtures and the spec (sections 4 and 7.1) rely on ---------

def test_lycoris_kohya_network_with_the_attn_only_preset_adapts_no_diffusers_unet_layer(tiny_sdxl_dir):
    """The built-in attn-only preset names LDM classes (CrossAttention); diffusers has Attention."""
    from lycoris.kohya import create_network

    models = load_torch_components(tiny_sdxl_dir)
    network = create_network(1.0, 4, 1.0, None, [models["text_encoder"], models["text_encoder_2"]], models["unet"],
                             preset="attn-only")
    assert network.unet_loras == [] and len(network.text_encoder_loras) > 0


def test_lycoris_full_preset_fails_on_a_diffusers_sdxl_unet(tiny_sdxl_dir):
    """time_embedding.linear_1 is a target by name and through the TimestepEmbedding class: named twice."""
    from lycoris.kohya import create_network

    models = load_torch_components(tiny_sdxl_dir)
    with pytest.raises(AssertionError, match="duplicated lora name: lora_unet_time_embedding_linear_1"):
        create_network(1.0, 4, 1.0, None, [models["text_encoder"], models["text_encoder_2"]], models["unet"], preset="full")


def test_create_lycoris_keeps_its_targets_whatever_built_in_preset_it_is_given(tiny_sdxl_dir):
    """Built-in presets set only unet_*/text_encoder_* keys, which create_lycoris does not read; its targets
    are class attributes that stay as the last preset with ``target_module`` left them."""
    from lycoris import LycorisNetwork, create_lycoris

    unet = load_torch_components(tiny_sdxl_dir)["unet"]
    LycorisNetwork.apply_preset({"target_module": ["Linear"], "target_name": []})
    network = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=1.0, preset="attn-only")
    assert len(network.loras) == len([m for m in unet.modules() if isinstance(m, torch.nn.Linear)])


def test_lycoris_cannot_reload_its_own_dora_files_with_magnitudes_per_input_column(lycoris_file, tiny_sdxl_dir):
    from lycoris.kohya import create_network_from_weights

    case = lycoris_file("lora", dora_wd=True, wd_on_output=False)
    models = load_torch_components(tiny_sdxl_dir)
    with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
        create_network_from_weights(1.0, str(case.path), None, [models["text_encoder"], models["text_encoder_2"]], models["unet"])


def test_unsupported_lycoris_algorithms_are_refused_by_name(lycoris_file, tmp_path):
    case = lycoris_file("ia3")
    with pytest.raises(LoraBridgeError, match="LyCORIS IA3 modules have no neutral kind"):
        convert(case.path, tmp_path / "n.safetensors", to="neutral", progress=False)
    assert not (tmp_path / "n.safetensors").exists()


def test_a_lycoris_file_for_flux_reads_as_a_flux_lora_and_round_trips(tmp_path):
    """SimpleTuner writes LyCORIS for Flux with lycoris_ + diffusers Flux paths (LoHa here, at Flux.1-dev shapes)."""
    from safetensors.torch import load_file, save_file

    sd = {}
    for stem, (out, inp) in {"lycoris_transformer_blocks_0_attn_to_q": (3072, 3072),
                             "lycoris_single_transformer_blocks_0_proj_mlp": (12288, 3072)}.items():
        sd.update({f"{stem}.hada_w1_a": torch.zeros(out, 2), f"{stem}.hada_w1_b": torch.zeros(2, inp),
                   f"{stem}.hada_w2_a": torch.zeros(out, 2), f"{stem}.hada_w2_b": torch.zeros(2, inp),
                   f"{stem}.alpha": torch.tensor(1.0)})
    save_file(sd, str(tmp_path / "flux.safetensors"))
    result = convert(tmp_path / "flux.safetensors", tmp_path / "n.safetensors", to="neutral", progress=False)
    assert result.model.architecture == "flux-1-dev"
    assert sorted(result.model.modules) == ["transformer.single_transformer_blocks.0.proj_mlp",
                                            "transformer.transformer_blocks.0.attn.to_q"]
    convert(tmp_path / "n.safetensors", tmp_path / "back.safetensors", to="lycoris", progress=False)
    back = load_file(str(tmp_path / "back.safetensors"))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
