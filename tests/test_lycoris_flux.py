"""LyCORIS files that lycoris-lora itself writes for a (tiny) diffusers Flux.1 transformer read as Flux.1 LoRAs.

Which names lycoris-lora (installed: the ``lycoris`` package of lycoris_lora 4.1.3) gives a diffusers
``FluxTransformer2DModel``, from its source:

- ``create_lycoris`` (lycoris/wrapper.py, what SimpleTuner uses) applies the built-in ``full`` preset unless told
  otherwise; its ``LycorisNetwork.TARGET_REPLACE_MODULE`` names layer classes (``Linear``, ``Conv2d``, ...), so
  every Linear of the transformer is adapted, named ``lycoris_<diffusers path, dots as _>``: q/k/v and
  ``proj_mlp`` apart, ``norm_out.linear`` and the embedders included.
- ``lycoris.kohya.create_network`` names ``lora_unet_<path>`` but targets the classes of its presets
  (lycoris/config.py): for Flux those are BFL's ``DoubleStreamBlock``/``SingleStreamBlock`` (kohya sd-scripts'
  and ComfyUI's model, whose paths give kohya's BFL names ``lora_unet_double_blocks_0_img_attn_qkv``); diffusers'
  ``FluxTransformerBlock``/``FluxSingleTransformerBlock`` are in no preset, and its ``full`` preset's
  ``TimestepEmbedding`` (listed for Anima) matches only ``time_text_embed.timestep_embedder`` here. With a
  preset naming diffusers' block classes (:data:`KOHYA_PRESET`) it writes ``lora_unet_<diffusers path>``.

On BFL's tree (:func:`bfl_flux`) lycoris' own presets apply and the names are kohya's BFL ones, fused layers
included: a LoRA, LoHa or LoKr there splits exactly into parts of its kind (a LoKr whose Kronecker rows cut through
a part becomes full deltas per part, with a warning).

Each file is saved with lycoris' ``save_weights`` after its factors are randomised (one side of each starts at
zero); every module lycoris made must come out under the diffusers name of the layer it adapts (taken from the
module object), computing what the lycoris module computes in its forward pass, and neutral -> LyCORIS must
give the file back bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lycoris")
pytest.importorskip("diffusers")
pytestmark = pytest.mark.torch

from lorabridge.converters import convert  # noqa: E402
from lorabridge.formats.neutral import read_neutral  # noqa: E402
from lorabridge.io.safetensors_file import read_safetensors  # noqa: E402
from tests.fixtures.flux import tiny_flux_transformer  # noqa: E402
from tests.fixtures.lycoris import effective_weight, layer_input, randomize, run_layer  # noqa: E402

# create_network preset naming diffusers' Flux block classes and the top-level layers (lycoris' own Flux presets
# name BFL classes, which a diffusers transformer does not have).
KOHYA_PRESET = """
enable_conv = false
unet_target_module = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
unet_target_name = ["x_embedder", "context_embedder", "proj_out", "norm_out.linear"]
text_encoder_target_module = []
text_encoder_target_name = []
"""
CASES = {  # id -> (algo, "lycoris" (create_lycoris) or "lora_unet" (create_network), lycoris options)
    "lycoris-lora": ("lora", "lycoris", {}),
    "lycoris-loha": ("loha", "lycoris", {}),
    "lycoris-lokr": ("lokr", "lycoris", {"factor": 4}),
    "lycoris-lokr-decompose-both": ("lokr", "lycoris", {"factor": 8, "decompose_both": True}),
    "lycoris-full": ("full", "lycoris", {}),
    "kohya-lora": ("lora", "lora_unet", {}),
    "kohya-loha": ("loha", "lora_unet", {}),
    "kohya-lokr": ("lokr", "lora_unet", {"factor": 4}),
}


def make_flux_lycoris(tmp_path, algo: str, prefix: str, preset: str | None = None, **options):
    """(file, {diffusers name: lycoris module}, {diffusers name: a copy of the Linear it adapts}) by lycoris-lora."""
    from lycoris import create_lycoris
    from lycoris.kohya import create_network

    transformer = tiny_flux_transformer()
    with torch.no_grad():
        if prefix == "lycoris":
            network = create_lycoris(transformer, 1.0, linear_dim=4, linear_alpha=2.0, algo=algo, preset=preset or "full",
                                     **options)
            network.apply_to()
        else:
            if preset is None:
                (tmp_path / "preset.toml").write_text(KOHYA_PRESET)
                preset = str(tmp_path / "preset.toml")
            network = create_network(1.0, 4, 2.0, None, [], transformer, algo=algo, preset=preset, **options)
            network.apply_to([], transformer, False, True)
        randomize(network, seed=3)
    path = tmp_path / f"{prefix}-{algo}.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya", "ss_algo": algo})
    names = {id(layer): f"transformer.{name}" for name, layer in transformer.named_modules()}
    modules = {names[id(m.org_module[0])]: m for m in network.loras}
    twin = dict(tiny_flux_transformer().named_modules())  # the same weights, untouched (lycoris' full moves them)
    return path, modules, {name: twin[name[len("transformer."):]] for name in modules}


@pytest.mark.parametrize("case_id", CASES)
def test_a_lycoris_flux_file_reads_as_flux1_computing_what_lycoris_computes_and_round_trips_bit_exactly(case_id, tmp_path):
    algo, prefix, options = CASES[case_id]
    path, modules, layers = make_flux_lycoris(tmp_path, algo, prefix, **options)
    stored, meta = read_safetensors(path)
    assert all(k.startswith(f"{prefix}_") for k in stored)
    if prefix == "lycoris":  # the full preset: every Linear of the transformer, q/k/v apart
        assert {"transformer.norm_out.linear", "transformer.single_transformer_blocks.0.attn.to_q",
                "transformer.x_embedder"} <= set(modules) and len(modules) == 28
    else:
        assert "lora_unet_transformer_blocks_0_attn_to_q.alpha" in stored or algo == "full"

    result = convert(path, tmp_path / "n.safetensors", "neutral", progress=False)
    # LoRA (and full) under lora_unet_ keys is kohya's grammar too: either reader gives the same model
    assert result.source_format == ("kohya" if prefix == "lora_unet" and algo in ("lora", "full") else "lycoris")
    model = read_neutral(result.output, verify_hash=True)
    assert model.architecture == "flux-1-dev" and set(model.modules) == set(modules)
    assert set(model.summary()["kinds"]) == {algo}
    worst = 0.0
    with torch.no_grad():
        for name, lyco in modules.items():  # lycoris' forward pass (its get_diff_weight scales LoHa/LoKr twice)
            layer, x = layers[name], layer_input(layers[name])
            expected = lyco(x)
            got = run_layer(layer, effective_weight(model.modules[name], layer), x)
            if "diff_b" in model.modules[name].tensors:  # full: the bias delta too
                got = got + torch.tensor(model.modules[name].tensors["diff_b"].to_float32())
            worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    assert worst < 1e-5, worst

    back = convert(result.output, tmp_path / "back.safetensors", "lycoris", progress=False).output
    written, written_meta = read_safetensors(back)
    assert sorted(written) == sorted(stored)
    assert all(written[k].same_as(stored[k]) for k in stored)
    assert {k: v for k, v in written_meta.items() if k.startswith("ss_")} == {k: v for k, v in meta.items() if k.startswith("ss_")}


def test_lycoris_loads_our_flux_export_as_it_loads_its_own_file(tmp_path):
    """``create_lycoris_from_weights`` on our LyCORIS export of a lycoris_ LoKr finds every module and builds the same
    network as from lycoris' own file (both differ from the network that saved it: a LoKr whose factors are both
    whole reloads with alpha 1, not the saved 4; lycoris' own behaviour, kept as it is)."""
    from lycoris import create_lycoris_from_weights

    path, modules, _ = make_flux_lycoris(tmp_path, "lokr", "lycoris", factor=4)
    neutral = convert(path, tmp_path / "n.safetensors", "neutral", progress=False).output
    ours = convert(neutral, tmp_path / "ours.safetensors", "lycoris", progress=False).output
    loaded = {}
    for which, file in (("theirs", path), ("ours", ours)):
        network, _ = create_lycoris_from_weights(1.0, str(file), tiny_flux_transformer())
        loaded[which] = {f"{m.lora_name}.{k}": v for m in network.loras for k, v in m.state_dict().items()}
    assert len({k.split(".")[0] for k in loaded["ours"]}) == len(modules)
    assert sorted(loaded["ours"]) == sorted(loaded["theirs"])
    assert all(torch.equal(loaded["ours"][k], t) for k, t in loaded["theirs"].items())


def test_lycoris_kohya_network_with_its_own_presets_adapts_only_the_timestep_embedder_of_a_diffusers_flux(tmp_path):
    """lycoris/config.py: Flux appears as BFL's DoubleStreamBlock/SingleStreamBlock only; of the ``full`` preset's
    classes a diffusers Flux transformer has just ``TimestepEmbedding`` (``time_text_embed.timestep_embedder``)."""
    path, modules, _ = make_flux_lycoris(tmp_path, "lora", "lora_unet", preset="full")
    assert sorted(modules) == ["transformer.time_text_embed.timestep_embedder.linear_1",
                               "transformer.time_text_embed.timestep_embedder.linear_2"]
    model = convert(path, tmp_path / "n.safetensors", "neutral", progress=False).model
    assert model.architecture == "flux-1-dev" and sorted(model.modules) == sorted(modules)


# ---- a BFL-named Flux (what kohya sd-scripts' flux_train_network and ComfyUI build; not installable here) ----------
H, MLP = 32, 128  # TINY_FLUX's hidden and MLP widths


def bfl_flux():
    """Flux.1's BFL module tree (flux/model.py names, as kohya sd-scripts' library/flux_models.py has them) at tiny
    widths, one block of each kind, with the class names lycoris' presets target. Only the Linear layers."""
    from torch import nn

    def mod(n):
        return nn.ModuleDict({"lin": nn.Linear(H, n * H)})

    def attn():
        return nn.ModuleDict({"qkv": nn.Linear(H, 3 * H), "proj": nn.Linear(H, H)})

    double = type("DoubleStreamBlock", (nn.Module,), {})()
    for stream in ("img", "txt"):
        setattr(double, f"{stream}_mod", mod(6))
        setattr(double, f"{stream}_attn", attn())
        setattr(double, f"{stream}_mlp", nn.Sequential(nn.Linear(H, MLP), nn.GELU(), nn.Linear(MLP, H)))
    single = type("SingleStreamBlock", (nn.Module,), {})()
    single.linear1, single.linear2, single.modulation = nn.Linear(H, 3 * H + MLP), nn.Linear(H + MLP, H), mod(3)
    root = nn.Module()
    root.double_blocks, root.single_blocks = nn.ModuleList([double]), nn.ModuleList([single])
    return root


def make_bfl_lycoris(tmp_path, algo: str, dim: int = 4, **options):
    """lycoris.kohya.create_network with its built-in ``full`` preset on :func:`bfl_flux`, saved by lycoris."""
    from lycoris.kohya import create_network

    torch.manual_seed(0)
    flux = bfl_flux()
    with torch.no_grad():
        network = create_network(1.0, dim, 2.0, None, [], flux, algo=algo, preset="full", **options)
        network.apply_to([], flux, False, True)
        randomize(network, seed=5)
    path = tmp_path / f"bfl-{algo}.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_algo": algo})
    names = {id(layer): name for name, layer in flux.named_modules()}
    return path, {names[id(m.org_module[0])]: m for m in network.loras}


def test_a_lycoris_lora_on_bfl_flux_names_reads_with_its_fused_layers_split_exactly(tmp_path):
    """On BFL's tree lycoris' own Flux presets apply: kohya's BFL names (``lora_unet_double_blocks_0_img_attn_qkv``), a
    LoRA on each fused ``qkv``/``linear1``; lorabridge splits them into the diffusers parts, delta W kept."""
    from lorabridge.architectures.flux1 import FLUX1, bfl_to_diffusers

    path, modules = make_bfl_lycoris(tmp_path, "lora")
    stored, _ = read_safetensors(path)
    assert {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
            "lora_unet_single_blocks_0_linear1.lora_up.weight"} <= set(stored)
    model = convert(path, tmp_path / "n.safetensors", "neutral", progress=False).model
    assert model.architecture == "flux-1-dev"
    worst, covered = 0.0, set()
    with torch.no_grad():
        for bfl, lyco in modules.items():
            fused = FLUX1.fused_parts(bfl)
            names = [f"transformer.{p}" for p in fused[1]] if fused else [f"transformer.{bfl_to_diffusers(bfl)}"]
            covered |= set(names)
            layer = lyco.org_module[0]
            x = layer_input(layer)
            delta = torch.from_numpy(np.concatenate([model.modules[n].delta_weight() for n in names]))
            expected, got = lyco(x), torch.nn.functional.linear(x, layer.weight + delta, layer.bias)
            worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    assert covered == set(model.modules) and worst < 1e-5, worst


def lycoris_delta(lyco) -> np.ndarray:
    """The delta W lycoris' forward pass adds to its layer: its output on the identity minus the layer's (transposed).
    (lycoris' ``get_diff_weight`` applies the LoHa/LoKr scale twice; the forward pass is what training optimised.)"""
    layer = lyco.org_module[0]
    eye = torch.eye(layer.in_features, dtype=torch.float64)
    with torch.no_grad():
        lyco.double(), layer.double()
        delta = (lyco(eye) - torch.nn.functional.linear(eye, layer.weight, layer.bias)).T.numpy()
        lyco.float(), layer.float()
    return delta


def parts_of(bfl: str) -> list[str]:
    """The diffusers module names a BFL layer's module becomes (the parts of a fused layer, in row order)."""
    from lorabridge.architectures.flux1 import FLUX1, bfl_to_diffusers

    fused = FLUX1.fused_parts(bfl)
    return [f"transformer.{p}" for p in fused[1]] if fused else [f"transformer.{bfl_to_diffusers(bfl)}"]


FUSED = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1")
BFL_CASES = {  # id -> (algo, create_network options): the LoKr factor 7 makes w2's rows (16 in qkv, 32 in linear1) divide
    # every part's rows (32 in both; 128 for linear1's MLP); with rank 2 both Kronecker factors are decomposed
    "loha": ("loha", {}),
    "lokr": ("lokr", {"factor": 7}),
    "lokr-decompose-both": ("lokr", {"factor": 7, "decompose_both": True, "dim": 2}),
}


@pytest.mark.parametrize("case_id", BFL_CASES)
def test_a_lycoris_loha_or_lokr_on_bfl_fused_layers_splits_into_parts_of_its_kind_computing_lycoris_delta(case_id, tmp_path):
    """kohya sd-scripts' ``--network_module lycoris.kohya`` on Flux: LoHa/LoKr on the fused ``qkv``/``linear1``. A LoHa
    splits by rows of ``hada_w1_a``/``hada_w2_a``, a LoKr by rows of w1 (of ``lokr_w1_a``) where w2's rows divide the
    parts': each part is a module of the same kind, rank and alpha whose delta W is its rows of lycoris' fused delta W.
    neutral -> LyCORIS (diffusers names, parts apart) -> neutral gives the parts back bit for bit."""
    algo, options = BFL_CASES[case_id]
    path, modules = make_bfl_lycoris(tmp_path, algo, **options)
    stored, _ = read_safetensors(path)
    if case_id == "lokr-decompose-both":
        assert "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1_a" in stored
    result = convert(path, tmp_path / "n.safetensors", "neutral", progress=False)
    model = result.model
    assert not [w for w in result.warnings if "became full" in w]
    assert model.architecture == "flux-1-dev" and set(model.summary()["kinds"]) == {algo}
    worst, covered = 0.0, set()
    for bfl, lyco in modules.items():
        names = parts_of(bfl)
        covered |= set(names)
        expected = lycoris_delta(lyco)
        got = np.concatenate([model.modules[n].delta_weight() for n in names])
        worst = max(worst, float(np.abs(got - expected).max() / np.abs(expected).max()))
        if bfl in FUSED:
            fused_alpha = float(stored[f"lora_unet_{bfl.replace('.', '_')}.alpha"].to_float32())
            assert all(model.modules[n].alpha == fused_alpha and model.modules[n].rank == lyco.lora_dim for n in names)
    assert covered == set(model.modules) and {p for f in FUSED for p in parts_of(f)} <= covered
    assert worst < 1e-5, worst

    back = convert(tmp_path / "n.safetensors", tmp_path / "l.safetensors", "lycoris", progress=False).output
    assert "lora_unet_transformer_blocks_0_attn_to_q.alpha" in read_safetensors(back)[0]
    again = convert(back, tmp_path / "again.safetensors", "neutral", progress=False).model
    assert sorted(again.modules) == sorted(model.modules)
    for name, module in model.modules.items():
        other = again.modules[name]
        assert (other.kind, other.alpha, sorted(other.tensors)) == (module.kind, module.alpha, sorted(module.tensors))
        assert all(other.tensors[r].same_as(t) for r, t in module.tensors.items()), name


def test_a_lycoris_lokr_whose_kronecker_rows_cut_through_the_parts_becomes_full_deltas_with_a_warning(tmp_path):
    """LyCORIS' factor 3 gives w2 32 rows on ``qkv`` (96 rows: parts of 32, a LoKr each) but 112 on ``linear1`` (224
    rows: parts of 32, 32, 32, 128): a part cutting through a row of w1 is no Kronecker product. Those parts become
    full deltas, their rows of the delta W rounded once (float32 here: exact to lycoris'), with one warning naming
    the layer; the output is much larger than the input. Written as kohya, they are one full delta on ``linear1``."""
    import re

    path, modules = make_bfl_lycoris(tmp_path, "lokr", factor=3)
    result = convert(path, tmp_path / "n.safetensors", "neutral", progress=False)
    model = result.model
    densified = [w for w in result.warnings if "became full" in w]
    assert len(densified) == 1 and re.search(r": 1 fused layer\(s\) whose factors do not divide at their parts' rows became "
                                             r"full delta W per part .*: transformer\.single_blocks\.0\.linear1 \(lokr\)$",
                                             densified[0]), densified
    kinds = {n: model.modules[n].kind for f in FUSED for n in parts_of(f)}
    assert {n: k for n, k in kinds.items() if k == "full"} == {n: "full" for n in parts_of("single_blocks.0.linear1")}
    assert kinds["transformer.transformer_blocks.0.attn.to_q"] == "lokr"
    for bfl in FUSED:
        expected = lycoris_delta(modules[bfl])
        got = np.concatenate([model.modules[n].delta_weight() for n in parts_of(bfl)])
        assert float(np.abs(got - expected).max() / np.abs(expected).max()) < 1e-5, bfl

    # kohya holds full deltas: the parts merge into one on the fused layer again (rows stacked), and split back bit for bit
    kohya = convert(tmp_path / "n.safetensors", tmp_path / "k.safetensors", "kohya", progress=False, bake_to_lora=4).output
    assert "lora_unet_single_blocks_0_linear1.diff" in read_safetensors(kohya)[0]
    again = convert(kohya, tmp_path / "k-n.safetensors", "neutral", progress=False).model
    for name in parts_of("single_blocks.0.linear1"):
        assert again.modules[name].kind == "full" and again.modules[name].tensors["diff"].same_as(model.modules[name].tensors["diff"])
