"""Our kohya Flux.1 output (``--format kohya``) as diffusers' ``FluxPipeline.load_lora_weights`` loads it.

``load_lora_weights`` = ``lora_state_dict`` (a classmethod: the file's keys converted to diffusers names, no
model needed) + ``load_lora_into_transformer``. For a file with ``.lora_down.weight`` keys, diffusers 0.35.2
``FluxLoraLoaderMixin.lora_state_dict`` (diffusers/loaders/lora_pipeline.py:2032-2041) calls
``_convert_kohya_flux_lora_to_diffusers`` (diffusers/loaders/lora_conversion_utils.py:361) and returns no
network alphas: "Kohya already takes care of scaling" (line 2035), i.e. alpha / rank is folded into the factors
(``_convert_to_ai_toolkit`` line 362, ``_convert_to_ai_toolkit_cat`` line 383). What it does with our files,
each checked below so that this file fails when diffusers changes:

- Double-block ``img_attn_qkv``/``txt_attn_qkv``, ``*_proj``, ``*_mlp_*``, ``*_mod_lin`` and single-block
  ``linear1``, ``linear2``, ``modulation_lin``: converted exactly, alpha per module, for all three shapes our
  writer gives a fused layer (one shared A; kohya's split_qkv block-diagonal with equal ranks, which diffusers
  chunks back, line 404-437; block-diagonal with unequal ranks, which it copies whole to every part).
- Single-block ``linear1`` is split at hard-coded Flux.1-dev sizes ``[3072, 3072, 3072, 12288]`` (line 533) and
  ``assert sum(dims) == up_weight.shape[0]`` (line 403) fails on any other width: a tiny transformer cannot
  take it (:func:`test_diffusers_kohya_loader_splits_single_block_linear1_only_at_flux1_dev_width`).
- CLIP-L ``lora_te1_`` and T5 ``lora_te3_`` keys (kohya's Flux prefixes) are dropped without a word: before
  converting, the state dict keeps only keys starting ``lora_unet_`` or ``lora_te_`` (line 907). Its
  text-encoder branch (line 640-670) is reached only by ``lora_te_`` keys.
- Embedders and the final layer (``img_in``, ``txt_in``, ``time_in_*``, ``vector_in_*``, ``guidance_in_*``,
  ``final_layer_linear``) go through ``assign_remaining_weights`` ("# TODO: alphas.", line 548), which moves
  the factors unscaled and leaves ``.alpha`` behind, and a leftover non-``lora_te`` key raises "Incompatible
  keys detected" (line 645): any stored alpha fails the load; without one (our writer omits an alpha that was
  only assumed = rank) scale 1 is right. ``time_in``/``vector_in``/``guidance_in`` must come with both of
  their layers, ``final_layer_linear`` with ``final_layer_adaLN_modulation_1`` (``source.pop`` of the partner,
  line 555, raises KeyError). Converted, they are named without ``transformer.`` (line 557-627) and
  ``load_lora_adapter`` drops them without a word (diffusers/loaders/peft.py:211-212).

The kohya writer warns about the text encoders and the embedders (lorabridge/formats/kohya.py, FLUX_BLOCKS).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from lorabridge.architectures.flux1 import FLUX1
from lorabridge.formats import kohya
from lorabridge.io.safetensors_file import read_safetensors
from lorabridge.model import LoraModel, LoraModule
from lorabridge.tensor import Tensor
from tests.fixtures.flux import tiny_flux_transformer

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytestmark = pytest.mark.torch

FluxPipeline = pytest.importorskip("diffusers").FluxPipeline
D, S = "transformer.transformer_blocks", "transformer.single_transformer_blocks"
QKV, ADD_QKV = ("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
LINEAR1 = (*QKV, "proj_mlp")
# Fused layers as our writer meets them: parts' (rank, alpha) and whether they share one A (kohya's default).
FUSED = {  # (block prefix, parts) -> ([(rank, alpha) per part], shared A)
    (f"{D}.0", QKV): ([(2, 1.0)] * 3, True),
    (f"{D}.1", ADD_QKV): ([(2, 1.0), (2, 3.0), (2, 0.5)], False),  # split_qkv: equal ranks, diffusers chunks
    (f"{D}.2", QKV): ([(1, 1.0), (2, 2.0), (3, 0.25)], False),  # unequal ranks: diffusers copies A to each part
    (f"{S}.0", LINEAR1): ([(2, 4.0)] * 4, True),
    (f"{S}.1", LINEAR1): ([(3, 3.0), (3, 1.0), (3, 6.0), (3, 0.5)], False),
}
ONE_TO_ONE = {  # diffusers path -> (rank, alpha); scales below and above 0.5 (diffusers' scale_down/scale_up loop)
    f"{D}.0.attn.to_out.0": (2, 1.0), f"{D}.0.attn.to_add_out": (4, 1.0), f"{D}.0.ff.net.0.proj": (2, 8.0),
    f"{D}.0.ff_context.net.2": (3, 3.0), f"{D}.0.norm1.linear": (2, 0.5), f"{D}.0.norm1_context.linear": (2, 2.0),
    f"{S}.0.proj_out": (4, 2.0), f"{S}.0.norm.linear": (2, 16.0),
}
TEXT_ENCODERS = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (2, 1.0),
                 "text_encoder.text_model.encoder.layers.3.mlp.fc1": (2, 1.0),
                 "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q": (2, 1.0)}
EMBEDDERS = ("transformer.x_embedder", "transformer.context_embedder",
             "transformer.time_text_embed.timestep_embedder.linear_1", "transformer.time_text_embed.timestep_embedder.linear_2")


def lora_model(shapes: dict[str, tuple[int, int]], fused: dict, one_to_one: dict, seed: int = 0,
               assumed: tuple[str, ...] = ()) -> LoraModel:
    """Our neutral model: LoRAs on ``one_to_one`` modules and on the parts of ``fused`` layers (see :data:`FUSED`);
    ``assumed`` modules get alpha = rank as assumed (no alpha in a kohya file)."""
    rng, model = np.random.default_rng(seed), LoraModel(architecture=FLUX1.name)

    def t(*shape):
        return Tensor.from_numpy((rng.standard_normal(shape) * 0.1).astype(np.float32))

    def add(name, rank, alpha, a=None):
        out, inp = shapes[name]
        module = LoraModule(name, "lora", {"lora_A.weight": a if a is not None else t(rank, inp),
                                           "lora_B.weight": t(out, rank)}, alpha)
        if name in assumed:
            module.alpha, module.alpha_source = float(rank), "assumed"
        model.add(module)

    for (block, parts), (ranks, shared) in fused.items():
        a = t(ranks[0][0], shapes[f"{block}.{parts[0]}"][1]) if shared else None
        for part, (rank, alpha) in zip(parts, ranks):
            add(f"{block}.{part}", rank, alpha, a)
    for name, (rank, alpha) in one_to_one.items():
        add(name, rank, alpha)
    for name in assumed:
        if name not in model.modules:
            add(name, 2, 2.0)
    return model


def real_shapes() -> dict[str, tuple[int, int]]:
    return {f"{c}.{p}": shape for c in FLUX1.components for p, shape in FLUX1.modules(c).items()}


def write_kohya(model: LoraModel, path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kohya.write(model, path)
    return [str(w.message) for w in caught]


def diffusers_state_dict(path):
    """What ``FluxPipeline.load_lora_weights(dir, weight_name=...)`` reads: (state dict, network alphas)."""
    return FluxPipeline.lora_state_dict(str(path.parent), weight_name=path.name, return_alphas=True)


def test_diffusers_converts_our_flux1_dev_kohya_blocks_exactly_and_drops_the_text_encoders(tmp_path):
    """At Flux.1-dev size, no model built: per target module, diffusers' B' @ (A' @ x) (scale 1: no network
    alphas, alpha folded in) equals our alpha / r * B @ (A @ x) on random probes x."""
    model = lora_model(real_shapes(), FUSED, {**ONE_TO_ONE, **TEXT_ENCODERS})
    messages = write_kohya(model, tmp_path / "kohya.safetensors")
    written, _ = read_safetensors(tmp_path / "kohya.safetensors")
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in written  # fused again, block-diagonal
    assert any("lora_te1_" in k for k in written) and any("lora_te3_" in k for k in written)
    assert any("3 text-encoder module(s)" in m and "diffusers' kohya loader" in m for m in messages), messages

    state_dict, alphas = diffusers_state_dict(tmp_path / "kohya.safetensors")
    assert alphas is None  # lora_pipeline.py:2035, alpha / rank is in the factors
    transformer = [n for n in model.modules if n.startswith("transformer.")]
    assert sorted(state_dict) == sorted(f"{n}.lora_{r}.weight" for n in transformer for r in "AB")
    # the text encoders are gone, without an error (lora_conversion_utils.py:907 keeps lora_unet_/lora_te_ only)
    rng = np.random.default_rng(1)
    for name in transformer:
        ours = model.modules[name]
        a, b = (state_dict[f"{name}.lora_{r}.weight"].numpy().astype(np.float64) for r in "AB")
        x = rng.standard_normal((ours.in_features, 3))
        expected = ours.scale * (ours.tensors["lora_B.weight"].to_numpy().astype(np.float64)
                                 @ (ours.tensors["lora_A.weight"].to_numpy().astype(np.float64) @ x))
        np.testing.assert_allclose(b @ (a @ x), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(), err_msg=name)
    # how diffusers split each fused layer: chunked (equal-rank block-diagonal), copied (one A, or unequal ranks)
    ranks = {n: state_dict[f"{n}.lora_A.weight"].shape[0] for n in transformer}
    assert [ranks[f"{D}.1.{p}"] for p in ADD_QKV] == [2, 2, 2] and [ranks[f"{D}.2.{p}"] for p in QKV] == [6, 6, 6]
    assert [ranks[f"{S}.1.{p}"] for p in LINEAR1] == [3] * 4 and [ranks[f"{S}.0.{p}"] for p in LINEAR1] == [2] * 4


def test_diffusers_kohya_loader_fails_on_an_embedder_with_an_alpha_and_takes_it_without(tmp_path):
    """``assign_remaining_weights`` (lora_conversion_utils.py:548, "TODO: alphas") leaves ``.alpha`` behind and the
    leftover is "Incompatible" (line 645); with no alpha stored (ours: alpha assumed = rank) the delta is right;
    a time/vector/guidance embedder layer without its partner is a KeyError (line 555)."""
    shapes = real_shapes()
    stored = lora_model(shapes, {}, {"transformer.x_embedder": (2, 4.0), f"{D}.0.attn.to_out.0": (2, 1.0)})
    messages = write_kohya(stored, tmp_path / "alpha.safetensors")
    assert any("1 Flux.1 layer(s) outside the double/single blocks" in m for m in messages), messages
    with pytest.raises(ValueError, match=r"Incompatible keys detected: \n\n lora_unet_img_in\.alpha"):
        diffusers_state_dict(tmp_path / "alpha.safetensors")

    assumed = lora_model(shapes, {}, {}, assumed=EMBEDDERS)
    assert any("4 Flux.1 layer(s) outside" in m for m in write_kohya(assumed, tmp_path / "assumed.safetensors"))
    state_dict, alphas = diffusers_state_dict(tmp_path / "assumed.safetensors")
    assert alphas is None
    # diffusers names them without "transformer." (lora_conversion_utils.py:557-627); load_lora_into_transformer
    # takes unprefixed keys as the transformer's
    assert sorted(state_dict) == sorted(f"{n[len('transformer.'):]}.lora_{r}.weight" for n in EMBEDDERS for r in "AB")
    for name in EMBEDDERS:
        ours, key = assumed.modules[name], name[len("transformer."):]
        assert torch.equal(state_dict[f"{key}.lora_A.weight"], torch.tensor(ours.tensors["lora_A.weight"].to_numpy()))
        assert torch.equal(state_dict[f"{key}.lora_B.weight"], torch.tensor(ours.tensors["lora_B.weight"].to_numpy()))



@pytest.mark.parametrize(("ours", "partner"), [
    ("transformer.time_text_embed.timestep_embedder.linear_1", "lora_unet_time_in_out_layer"),
    ("transformer.proj_out", "lora_unet_final_layer_adaLN_modulation_1"),  # norm_out.linear: no kohya name, never ours
])
def test_diffusers_kohya_loader_fails_on_an_embedder_layer_without_its_partner(tmp_path, ours, partner):
    """``assign_remaining_weights`` pops time/vector/guidance ``in_layer`` and ``out_layer`` together, and the final
    layer's ``linear`` with ``adaLN_modulation_1`` (lora_conversion_utils.py:555, 617-627): one alone is a KeyError.
    Our kohya writer cannot name ``norm_out.linear`` (BFL's adaLN_modulation.1 is row-swapped), so diffusers never
    takes our ``final_layer_linear`` from a kohya file."""
    write_kohya(lora_model(real_shapes(), {}, {}, assumed=(ours,)), tmp_path / "half.safetensors")
    with pytest.raises(KeyError, match=f"{partner}.lora_down.weight"):
        diffusers_state_dict(tmp_path / "half.safetensors")


def linear_shapes(transformer) -> dict[str, tuple[int, int]]:
    return {f"transformer.{n}": tuple(m.weight.shape) for n, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear)}


TINY_BLOCKS = {  # (fused layers, one-to-one modules) on the tiny transformer's blocks, single-block linear1 left out
    "one-rank": ({(f"{D}.0", QKV): ([(2, 1.0)] * 3, True), (f"{D}.0", ADD_QKV): ([(2, 1.0), (2, 3.0), (2, 0.5)], False)},
                 {f"{D}.0.attn.to_out.0": (2, 1.0), f"{D}.0.ff.net.0.proj": (2, 8.0), f"{D}.0.norm1.linear": (2, 0.5),
                  f"{S}.0.proj_out": (2, 3.0), f"{S}.0.norm.linear": (2, 16.0)}),
    "mixed-ranks": ({(f"{D}.0", QKV): ([(2, 1.0)] * 3, True), (f"{D}.0", ADD_QKV): ([(1, 1.0), (2, 3.0), (3, 0.5)], False)},
                    {**{k: v for k, v in ONE_TO_ONE.items() if k.startswith(f"{D}.0.")},
                     f"{S}.0.proj_out": (2, 1.0), f"{S}.0.norm.linear": (3, 0.5)}),
}


@pytest.mark.parametrize("ranks", TINY_BLOCKS)
def test_our_kohya_file_fused_into_a_tiny_flux_transformer_by_diffusers(tmp_path, ranks):
    """``load_lora_into_transformer`` + ``fuse_lora`` on a tiny ``FluxTransformer2DModel``: every block weight diffusers
    can place there (all but single-block ``linear1``, see below) becomes W + our delta W, fp32, when every module has
    one rank (kohya's network_dim). With several ranks diffusers mis-scales: with no network alphas,
    ``get_peft_kwargs`` (diffusers/utils/peft_utils.py:158) sets ``lora_alpha`` to the rank of the first ``lora_B`` it
    meets (diffusers/loaders/peft.py:233-241) and ``alpha_pattern`` stays empty, so a module of rank r gets
    first_rank / r on top of the alpha / rank already folded in; asserted here, and warned about by the writer.
    The embedders (no alpha, so converted) are dropped without a word: ``load_lora_adapter`` keeps only
    ``transformer.``-prefixed keys (diffusers/loaders/peft.py:211-212) and the converter named them without it."""
    transformer = tiny_flux_transformer()
    fused, blocks = TINY_BLOCKS[ranks]
    model = lora_model(linear_shapes(transformer), fused, blocks, assumed=EMBEDDERS)
    messages = write_kohya(model, tmp_path / "kohya.safetensors")
    assert any("distinct ranks" in m for m in messages) == (ranks == "mixed-ranks"), messages
    layers = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    before = {n: m.weight.detach().clone() for n, m in layers.items()}

    state_dict, alphas = diffusers_state_dict(tmp_path / "kohya.safetensors")
    first_rank = next(t.shape[1] for k, t in state_dict.items() if k.startswith("transformer.") and "lora_B" in k)
    FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=transformer)
    transformer.fuse_lora()
    after = {n: layer.weight.detach() for n, layer in layers.items()}  # PEFT wraps them; fuse_lora writes into them
    changed = {n for n in before if not torch.equal(after[n], before[n])}
    assert changed == {n[len("transformer."):] for n in model.modules if n not in EMBEDDERS}
    factors = set()
    for name, module in model.modules.items():
        if name in EMBEDDERS:
            continue
        path = name[len("transformer."):]
        factor = first_rank / state_dict[f"{name}.lora_A.weight"].shape[0]  # diffusers' extra scale (1: right)
        factors.add(factor)
        expected = before[path].numpy() + factor * module.delta_weight()
        np.testing.assert_allclose(after[path].numpy(), expected, rtol=1e-6, atol=1e-6, err_msg=name)
    assert (factors == {1.0}) == (ranks == "one-rank"), factors


def test_diffusers_kohya_loader_splits_single_block_linear1_only_at_flux1_dev_width(tmp_path):
    """lora_conversion_utils.py:533 ``dims=[3072, 3072, 3072, 12288]``; line 403 asserts they add up to the rows of
    ``lora_up``: ours has 3 * 32 + 128 = 224 on the tiny transformer. A real Flux.1 file is 21504 rows (first test)."""
    shapes = linear_shapes(tiny_flux_transformer())
    model = lora_model(shapes, {(f"{S}.0", LINEAR1): ([(2, 2.0)] * 4, True)}, {})
    write_kohya(model, tmp_path / "linear1.safetensors")
    written, _ = read_safetensors(tmp_path / "linear1.safetensors")
    assert written["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (224, 2)
    with pytest.raises(AssertionError):
        diffusers_state_dict(tmp_path / "linear1.safetensors")
