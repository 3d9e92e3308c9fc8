"""The architecture registry: an architecture is data, and a new one converts with no other code.

A toy architecture of two layers (one Linear, one Conv2d), registered from a table alone, goes
kohya -> neutral -> diffusers -> neutral -> PEFT -> neutral -> kohya bit for bit, and each reader records which architecture the
LoRA is for from its names and shapes. A LoRA that fits no registered architecture is refused with
the evidence, and with "looks like X" where the names point at a known other model.
"""

from __future__ import annotations

import numpy as np
import pytest

from lorabridge.architectures import ARCHITECTURES, get_architecture, register, unregister
from lorabridge.architectures.architecture import Architecture
from lorabridge.architectures import fused as fused_module
from lorabridge.architectures.fused import FusedLayer, merge_fused, merge_present, split_fused
from lorabridge.architectures.sdxl import SDXL
from lorabridge.architectures.tree import ModuleTree
from lorabridge.converters import convert
from lorabridge.errors import LoraBridgeError
from lorabridge.formats.neutral import read_neutral
from lorabridge.io.safetensors_file import SafetensorsFile, write_safetensors
from lorabridge.model import LoraModule
from lorabridge.tensor import Tensor

TOY_LAYERS = {"toy_blocks.0.proj": ("Linear", (12, 8)), "toy_blocks.1.conv": ("Conv2d", (6, 12, 3, 3))}
TOY = Architecture("toy-two-layer", "Toy", ModuleTree(entries={"unet": TOY_LAYERS}), reference="the toy model",
                   kohya_prefixes={"unet": "lora_unet"})


@pytest.fixture
def toy():
    register(TOY)
    yield TOY
    unregister(TOY.name)


def kohya_toy_file(path, rank=2):
    """A kohya file for the toy: lora_down/lora_up/alpha per layer, as sd-scripts names them (dots as ``_``)."""
    rng = np.random.default_rng(3)
    tensors = {}
    for module, (_, shape) in TOY_LAYERS.items():
        key = "lora_unet_" + module.replace(".", "_")
        out_features, in_features, *kernel = shape
        tensors[f"{key}.lora_down.weight"] = rng.standard_normal((rank, in_features, *kernel)).astype("f4")
        tensors[f"{key}.lora_up.weight"] = rng.standard_normal((out_features, rank, *([1, 1] if kernel else []))).astype("f4")
        tensors[f"{key}.alpha"] = np.array(4.0, "f4")
    write_safetensors(path, {k: Tensor.from_numpy(v) for k, v in tensors.items()}, {"ss_network_dim": str(rank)})
    return tensors


def test_sdxl_is_the_first_registered_architecture():
    assert next(iter(ARCHITECTURES.values())) is SDXL and get_architecture(SDXL.name) is SDXL
    assert SDXL.components == ("unet", "text_encoder", "text_encoder_2")
    with pytest.raises(LoraBridgeError, match="unknown architecture 'flux'"):
        get_architecture("flux")


def test_a_toy_architecture_registered_from_data_converts_through_neutral_diffusers_peft_and_kohya(toy, tmp_path):
    original = kohya_toy_file(tmp_path / "toy_kohya.safetensors")
    neutral = convert(tmp_path / "toy_kohya.safetensors", tmp_path / "toy.safetensors", "neutral", progress=False)
    assert neutral.source_format == "kohya"
    model = read_neutral(tmp_path / "toy.safetensors")
    assert model.architecture == "toy-two-layer"
    assert sorted(model.modules) == ["unet.toy_blocks.0.proj", "unet.toy_blocks.1.conv"]
    assert {m.alpha for m in model.modules.values()} == {4.0}

    convert(tmp_path / "toy.safetensors", tmp_path / "toy_diffusers.safetensors", "diffusers", progress=False)
    back = convert(tmp_path / "toy_diffusers.safetensors", tmp_path / "toy_neutral_again.safetensors", "neutral",
                   progress=False)
    assert back.source_format == "diffusers" and back.model.architecture == "toy-two-layer"
    convert(tmp_path / "toy_neutral_again.safetensors", tmp_path / "toy_peft", "peft", progress=False)
    assert (tmp_path / "toy_peft" / "unet" / "adapter_config.json").is_file()
    from_peft = convert(tmp_path / "toy_peft", tmp_path / "toy_from_peft.safetensors", "neutral", progress=False)
    assert from_peft.source_format == "peft" and from_peft.model.architecture == "toy-two-layer"
    convert(tmp_path / "toy_from_peft.safetensors", tmp_path / "toy_kohya_again.safetensors", "kohya", progress=False)

    again = SafetensorsFile(tmp_path / "toy_kohya_again.safetensors")
    assert sorted(again.keys()) == sorted(original)
    for key, array in original.items():
        assert again.tensor(key).to_numpy().tobytes() == array.tobytes(), key


def test_the_same_kohya_file_is_refused_when_the_toy_is_not_registered(tmp_path):
    kohya_toy_file(tmp_path / "toy_kohya.safetensors")
    with pytest.raises(LoraBridgeError, match="not an SDXL LoRA"):
        convert(tmp_path / "toy_kohya.safetensors", tmp_path / "toy.safetensors", "neutral", progress=False)
    assert not (tmp_path / "toy.safetensors").exists()


def test_a_lora_with_other_shapes_is_refused_naming_the_architecture_it_misfits(toy, tmp_path):
    kohya_toy_file(tmp_path / "toy_kohya.safetensors")
    wrong = {k: Tensor.from_numpy(v) for k, v in kohya_toy_file(tmp_path / "x.safetensors").items()}
    wrong["lora_unet_toy_blocks_0_proj.lora_up.weight"] = Tensor.from_numpy(np.ones((99, 2), "f4"))
    write_safetensors(tmp_path / "wrong.safetensors", wrong, {})
    with pytest.raises(LoraBridgeError, match=r"not a Toy LoRA: .*toy_blocks\.0\.proj adapts a \[99, 8\] weight, Toy's is \[12, 8\]"):
        convert(tmp_path / "wrong.safetensors", tmp_path / "out.safetensors", "neutral", progress=False)


def test_the_model_default_is_the_registry_default():
    """model.py spells the default out (the registry imports it); they must agree."""
    from lorabridge.architectures import DEFAULT
    from lorabridge.model import COMPONENTS, DEFAULT_ARCHITECTURE, LoraModel

    assert DEFAULT is SDXL and LoraModel().architecture == DEFAULT_ARCHITECTURE == SDXL.name
    assert COMPONENTS == SDXL.components


def test_a_format_whose_naming_is_sdxl_only_refuses_the_toy(toy, tmp_path):
    kohya_toy_file(tmp_path / "toy_kohya.safetensors")
    with pytest.raises(LoraBridgeError, match="--to mindone-sgm names only stable-diffusion-xl-v1-base layers; "
                                              "this LoRA is for toy-two-layer"):
        convert(tmp_path / "toy_kohya.safetensors", tmp_path / "toy.ckpt", "mindone-sgm", progress=False)
    assert not (tmp_path / "toy.ckpt").exists()


def test_registering_twice_or_removing_the_default_is_refused(toy):
    with pytest.raises(ValueError, match="already registered"):
        register(Architecture(TOY.name, "Other", ModuleTree(entries={"unet": {}})))
    with pytest.raises(ValueError, match="default architecture"):
        unregister(SDXL.name)


# ---- fused layers of unequal parts (Flux's linear1: q, k, v and the MLP) ---------------------------

LINEAR1_SIZES = (3072, 3072, 3072, 12288)  # the parts' output sizes in Flux.1


def _fused(rows: int, rank: int = 4, width: int = 8) -> LoraModule:
    rng = np.random.default_rng(11)
    tensors = {"lora_A.weight": Tensor.from_numpy(rng.standard_normal((rank, width)).astype("f4")),
               "lora_B.weight": Tensor.from_numpy(rng.standard_normal((rows, rank)).astype("f4"))}
    return LoraModule("transformer.single_blocks.0.linear1", "lora", tensors, alpha=8.0)


def test_a_fused_layer_of_unequal_parts_splits_in_their_ratio_and_merges_back_bit_exactly():
    fused = _fused(rows=42)  # 6 + 6 + 6 + 24: the ratio of 3072:3072:3072:12288
    names = tuple(f"transformer.single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
    parts = split_fused(fused, names, LINEAR1_SIZES)
    assert [p.out_features for p in parts] == [6, 6, 6, 24]
    assert np.array_equal(np.concatenate([p.delta_weight() for p in parts]), fused.delta_weight())
    again = merge_fused(tuple(parts), fused.name)
    for role, tensor in fused.tensors.items():
        assert again.tensors[role].same_as(tensor), role
    assert again.alpha == fused.alpha


def test_splitting_a_fused_lora_lets_the_mapped_pages_of_its_b_go_once_read(monkeypatch):
    """part_ranks reads every value of B to find its blocks: each part's pages are let go after (an SDXL file's
    32 fused text-encoder B's would otherwise stay mapped, 78 MiB at rank 160)."""
    released = []
    monkeypatch.setattr(fused_module, "release_pages", lambda data: released.append(bytes(data)))
    fused = _fused(rows=42)
    names = tuple(f"transformer.single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
    parts = split_fused(fused, names, LINEAR1_SIZES)
    b = fused.tensors["lora_B.weight"].to_numpy()
    assert released == [b[start:start + p.out_features].tobytes() for start, p in zip((0, 6, 12, 18), parts)]


def test_rows_that_do_not_split_in_the_ratio_are_refused():
    names = ("t.q", "t.k", "t.v", "t.mlp")
    with pytest.raises(LoraBridgeError, match=r"rows not divisible in the ratio 3072:3072:3072:12288"):
        split_fused(_fused(rows=43), names, LINEAR1_SIZES)


def test_the_fused_layer_table_names_parts_and_blocks_both_ways():
    layer = SDXL.fused[0]
    fused = "transformer.resblocks.7.attn.in_proj"  # inside the OpenCLIP model (conditioner.embedders.1.model.)
    assert SDXL.fused_parts(fused) == ("text_encoder_2", tuple(
        f"text_model.encoder.layers.7.self_attn.{p}_proj" for p in "qkv"))
    assert SDXL.fused_name("text_encoder_2", "text_model.encoder.layers.7.self_attn.v_proj") == (fused, 2)
    assert layer.parts_of(fused.replace("resblocks.7", "resblocks.x")) is None
    assert SDXL.fused_parts(fused.replace("resblocks.7", "resblocks.99")) is None  # bigG has 32 layers


# ---- a toy with a fused layer and its own kohya prefix: kohya's underscored names, generically ------------
# Like Flux.1 in kohya sd-scripts (networks/lora_flux.py at 450630c6: LORA_PREFIX_FLUX = "lora_unet" for the
# transformer, lora_te1/lora_te3 for CLIP-L/T5; q, k and v are one ``qkv`` Linear in the original BFL model,
# three in diffusers; its split_qkv variant saves them merged block-diagonally, rank times 3), in miniature:
# ``lora_unet_`` is this toy's transformer, not SDXL's UNet, and ``blocks.0.qkv`` exists only in the original
# spelling, so the reader splits it and the kohya writer merges it back.
FUSED_LAYERS = {**{f"blocks.0.attn.to_{p}": ("Linear", (8, 8)) for p in "qkv"}, "blocks.0.mlp": ("Linear", (16, 8))}
FUSED_TOY = Architecture(
    "toy-fused", "Fused toy", ModuleTree(entries={"transformer": FUSED_LAYERS}), reference="the fused toy",
    original_paths={"transformer": {"blocks.0.mlp": "blocks.0.mlp"}.get},  # the original names q/k/v only as qkv
    fused=(FusedLayer("transformer", "blocks.{n}.qkv", tuple(f"blocks.{{n}}.attn.to_{p}" for p in "qkv")),),
    kohya_prefixes={"transformer": "lora_unet"})
QKV = tuple(f"transformer.blocks.0.attn.to_{p}" for p in "qkv")


@pytest.fixture
def fused_toy():
    register(FUSED_TOY)
    yield FUSED_TOY
    unregister(FUSED_TOY.name)


def _write_kohya(path, tensors):
    write_safetensors(path, {k: Tensor.from_numpy(v) for k, v in tensors.items()}, {})


def test_a_fused_kohya_layer_splits_into_its_parts_and_comes_back_byte_identical(fused_toy, tmp_path):
    rng = np.random.default_rng(5)
    original = {"lora_unet_blocks_0_qkv.lora_down.weight": rng.standard_normal((4, 8)).astype("f4"),
                "lora_unet_blocks_0_qkv.lora_up.weight": rng.standard_normal((24, 4)).astype("f4"),
                "lora_unet_blocks_0_qkv.alpha": np.array(2.0, "f4"),
                "lora_unet_blocks_0_mlp.lora_down.weight": rng.standard_normal((4, 8)).astype("f4"),
                "lora_unet_blocks_0_mlp.lora_up.weight": rng.standard_normal((16, 4)).astype("f4"),
                "lora_unet_blocks_0_mlp.alpha": np.array(4.0, "f4")}
    _write_kohya(tmp_path / "fused.safetensors", original)

    result = convert(tmp_path / "fused.safetensors", tmp_path / "neutral.safetensors", "neutral", progress=False)
    model = read_neutral(tmp_path / "neutral.safetensors")
    assert result.source_format == "kohya" and model.architecture == "toy-fused"
    assert sorted(model.modules) == sorted([*QKV, "transformer.blocks.0.mlp"])
    fused_delta = (original["lora_unet_blocks_0_qkv.lora_up.weight"] @ original["lora_unet_blocks_0_qkv.lora_down.weight"]) / 2
    parts = np.concatenate([model.modules[name].delta_weight() for name in QKV])
    assert np.array_equal(parts, fused_delta.astype("f4"))  # split exactly: shared A, B's row blocks
    assert {model.modules[name].rank for name in QKV} == {4}

    convert(tmp_path / "neutral.safetensors", tmp_path / "diffusers.safetensors", "diffusers", progress=False)
    assert "transformer.blocks.0.attn.to_k.lora_B.weight" in SafetensorsFile(tmp_path / "diffusers.safetensors").keys()
    convert(tmp_path / "diffusers.safetensors", tmp_path / "again.safetensors", "neutral", progress=False)
    convert(tmp_path / "again.safetensors", tmp_path / "kohya.safetensors", "kohya", progress=False)

    again = SafetensorsFile(tmp_path / "kohya.safetensors")
    assert sorted(again.keys()) == sorted(original)
    for key, array in original.items():
        assert again.tensor(key).to_numpy().tobytes() == array.tobytes(), key


def test_separate_q_k_v_loras_merge_block_diagonally_and_split_back_to_their_ranks(fused_toy, tmp_path):
    rng = np.random.default_rng(6)
    ranks, alphas = (2, 3, 4), (1.0, 1.5, 2.0)  # alpha / rank = 0.5 for each: merged exactly, no rescaling
    separate = {}
    for p, rank, alpha in zip("qkv", ranks, alphas):  # diffusers spelling, as a kohya file may use
        separate[f"lora_unet_blocks_0_attn_to_{p}.lora_down.weight"] = rng.standard_normal((rank, 8)).astype("f4")
        separate[f"lora_unet_blocks_0_attn_to_{p}.lora_up.weight"] = rng.standard_normal((8, rank)).astype("f4")
        separate[f"lora_unet_blocks_0_attn_to_{p}.alpha"] = np.array(alpha, "f4")
    _write_kohya(tmp_path / "separate.safetensors", separate)

    convert(tmp_path / "separate.safetensors", tmp_path / "fused.safetensors", "kohya", progress=False)
    fused = SafetensorsFile(tmp_path / "fused.safetensors")
    assert sorted(fused.keys()) == [f"lora_unet_blocks_0_qkv.{s}" for s in ("alpha", "lora_down.weight", "lora_up.weight")]
    down, up = (fused.tensor(f"lora_unet_blocks_0_qkv.lora_{s}.weight").to_numpy() for s in ("down", "up"))
    assert down.shape == (9, 8) and up.shape == (24, 9) and float(fused.tensor("lora_unet_blocks_0_qkv.alpha").to_numpy()) == 4.5
    blocks = [(0, 2), (2, 5), (5, 9)]
    for i, (p, (start, end)) in enumerate(zip("qkv", blocks)):
        assert np.array_equal(down[start:end], separate[f"lora_unet_blocks_0_attn_to_{p}.lora_down.weight"])
        assert np.array_equal(up[8 * i:8 * i + 8, start:end], separate[f"lora_unet_blocks_0_attn_to_{p}.lora_up.weight"])
        assert not np.delete(up[8 * i:8 * i + 8], np.s_[start:end], axis=1).any()  # block-diagonal: zero elsewhere

    convert(tmp_path / "fused.safetensors", tmp_path / "neutral.safetensors", "neutral", progress=False)
    model = read_neutral(tmp_path / "neutral.safetensors")
    for p, name, rank, alpha in zip("qkv", QKV, ranks, alphas):
        module = model.modules[name]
        assert (module.rank, module.alpha) == (rank, alpha), name
        for role, suffix in (("lora_A.weight", "lora_down.weight"), ("lora_B.weight", "lora_up.weight")):
            assert module.tensors[role].to_numpy().tobytes() == separate[f"lora_unet_blocks_0_attn_to_{p}.{suffix}"].tobytes()


def test_each_file_is_read_in_the_architecture_whose_names_place_its_keys(fused_toy):
    from lorabridge.naming.underscored import KOHYA, architecture_of

    sdxl_keys = ["lora_unet_input_blocks_4_1_proj_in.lora_down.weight", "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"]
    toy_keys = ["lora_unet_blocks_0_qkv.lora_down.weight", "lora_unet_blocks_0_mlp.lora_up.weight"]
    assert architecture_of(sdxl_keys, KOHYA) is SDXL and architecture_of(toy_keys, KOHYA) is FUSED_TOY
    assert architecture_of(["lora_unet_nothing_known.alpha"], KOHYA) is SDXL  # a tie goes to the first registered
    assert KOHYA.parse(toy_keys[0], FUSED_TOY).component == "transformer"


def test_a_missing_part_of_a_fused_layer_is_written_with_a_zero_block_in_the_ratio_of_the_sizes():
    rng = np.random.default_rng(7)

    def lora(name, rows):
        tensors = {"lora_A.weight": Tensor.from_numpy(rng.standard_normal((2, 8)).astype("f4")),
                   "lora_B.weight": Tensor.from_numpy(rng.standard_normal((rows, 2)).astype("f4"))}
        return LoraModule(name, "lora", tensors, alpha=2.0)

    q, mlp = lora("transformer.q", 6), lora("transformer.mlp", 24)  # linear1 of a narrower Flux: 6, 6, 6, 24 rows
    fused = merge_present({0: q, 3: mlp}, "transformer.single_blocks.0.linear1", LINEAR1_SIZES)
    assert fused.out_features == 42
    delta = fused.delta_weight()
    assert np.allclose(delta[:6], q.delta_weight()) and np.allclose(delta[18:], mlp.delta_weight())
    assert not delta[6:18].any()  # k and v: B = 0


def test_a_layer_named_both_fused_and_on_its_own_is_refused(fused_toy, tmp_path):
    rng = np.random.default_rng(8)
    tensors = {"lora_unet_blocks_0_qkv.lora_down.weight": rng.standard_normal((2, 8)).astype("f4"),
               "lora_unet_blocks_0_qkv.lora_up.weight": rng.standard_normal((24, 2)).astype("f4"),
               "lora_unet_blocks_0_attn_to_k.lora_down.weight": rng.standard_normal((2, 8)).astype("f4"),
               "lora_unet_blocks_0_attn_to_k.lora_up.weight": rng.standard_normal((8, 2)).astype("f4")}
    _write_kohya(tmp_path / "twice.safetensors", tensors)
    with pytest.raises(LoraBridgeError, match=r"transformer\.blocks\.0\.attn\.to_k: named twice, as a fused layer and on its own"):
        convert(tmp_path / "twice.safetensors", tmp_path / "out.safetensors", "neutral", progress=False)


def test_lycoris_prefix_names_the_toys_denoiser_and_lycoris_writes_the_parts_apart(fused_toy, tmp_path):
    rng = np.random.default_rng(9)
    tensors = {"lycoris_blocks_0_qkv.lora_down.weight": rng.standard_normal((2, 8)).astype("f4"),
               "lycoris_blocks_0_qkv.lora_up.weight": rng.standard_normal((24, 2)).astype("f4"),
               "lycoris_blocks_0_qkv.alpha": np.array(1.0, "f4")}
    _write_kohya(tmp_path / "lycoris.safetensors", tensors)
    result = convert(tmp_path / "lycoris.safetensors", tmp_path / "neutral.safetensors", "neutral", progress=False)
    model = read_neutral(tmp_path / "neutral.safetensors")
    assert result.source_format == "lycoris" and model.architecture == "toy-fused"
    assert sorted(model.modules) == sorted(QKV) and {m.extra.get("key_prefix") for m in model.modules.values()} == {"lycoris"}
    convert(tmp_path / "neutral.safetensors", tmp_path / "again.safetensors", "lycoris", progress=False)
    assert sorted(SafetensorsFile(tmp_path / "again.safetensors").keys()) == sorted(  # LyCORIS: diffusers spelling
        f"lycoris_blocks_0_attn_to_{p}.{s}" for p in "qkv" for s in ("alpha", "lora_down.weight", "lora_up.weight"))
