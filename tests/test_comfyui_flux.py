"""Our Flux.1 kohya, ComfyUI-names and diffusers outputs load in ComfyUI onto the right weights, with the same delta.

ComfyUI is not installable offline, so its Flux rules are restated here as data, read from Comfy-Org/ComfyUI:

- ``comfy/lora.py`` @17358c8f73b581a0d22facc3c385822f09b8bfb1, ``model_lora_keys_unet``: for every
  ``diffusion_model.<path>.weight`` of the model, the stems ``lora_unet_<path, dots as _>`` (kohya) and
  ``diffusion_model.<path>`` (generic); ``unet_to_diffusers`` returns {} for Flux (no ``num_res_blocks``).
  For ``comfy.model_base.Flux``, every ``.weight`` key k of ``flux_to_diffusers`` gives the stems
  ``transformer.<k>``, ``lycoris_<k as _>``, ``lora_transformer_<k as _>`` and ``<k>``; and
  ``diffusion_model.single_blocks.N.linear1_qkv`` -> (linear1, (0, 0, 3H)) (XLabs/USO).
- ``comfy/utils.py`` @09708eae709a992a5684bed3595ce4d07e705b4e, ``flux_to_diffusers``: diffusers name -> BFL
  weight, or ``(weight, (dim, offset, size))`` for q/k/v (and single blocks' proj_mlp at (0, 3H, 4H)), or
  ``(weight, None, swap_scale_shift)`` for ``norm_out.linear``.
- ``comfy/lora.py`` ``model_lora_keys_clip``: ``text_encoders.<k>`` for every text-encoder weight k (generic);
  ``lora_te_``/``lora_te1_text_model_encoder_layers_<b>_<LORA_CLIP_MAP>`` and ``text_encoder.text_model...``
  for clip_l; for ``t5xxl.transformer.<p>.weight`` with clip_l and no clip_g (Flux): ``lora_te2_<p as _>``
  ("OneTrainer Flux") and ``lora_te3_<p as _>`` (kohya's LORA_PREFIX_TEXT_ENCODER_T5).
- ``load_lora`` + ``comfy/weight_adapter/lora.py`` @6f98b150e065f1ffc788558574a887835068bd40 ``LoRAAdapter``:
  per stem ``.alpha`` (read before the adapters, so beside either spelling), the pair
  ``.lora_up.weight``/``.lora_down.weight`` or ``.lora_B.weight``/``.lora_A.weight``;
  delta = alpha / down.shape[0] (1.0 without alpha) * up @ down, reshaped to the weight (which fails on a mismatch).
- ``comfy/model_patcher.py`` ``ModelPatcher.add_patches``: a tuple target is ``(key, offset[, function])``;
  ``comfy/lora.py`` ``calculate_weight`` patches ``weight.narrow(*offset)`` and applies ``function`` to the delta.
- ``comfy/lora_convert.py`` @2bffe2f4ce5763dcb83df6a670657b6d5c8f85a5 ``convert_lora``: none of its special
  cases (bare ``img_in.lora_A.weight``, USO ``processor`` keys, ``attn_to_qkv``) matches our keys.

ComfyUI's Flux model (its state-dict names are BFL's, ``comfy/ldm/flux/model.py``) and its text encoders
(``clip_l.transformer.`` = transformers' CLIPTextModel, ``t5xxl.transformer.`` = T5's encoder names in
``comfy/text_encoders/t5.py``) are spelled out below from BFL's Flux.1-dev config, independent of lorabridge.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from lorabridge.converters import convert
from lorabridge.formats import comfyui, diffusers, kohya
from lorabridge.formats.contract import WRITE_DEFAULTS, WriteOptions
from lorabridge.io.safetensors_file import read_safetensors
from lorabridge.model import LoraModel, LoraModule
from lorabridge.tensor import Tensor

# --- ComfyUI's Flux model, as BFL's Flux.1-dev config describes it --------------------------------------------
DEV = {"depth": 19, "depth_single_blocks": 38, "hidden_size": 3072, "in_channels": 64, "context_in_dim": 4096,
       "vec_in_dim": 768, "time_dim": 256, "mlp_ratio": 4}
CLIP_L = {"layers": 12, "width": 768, "mlp": 3072}
T5XXL = {"blocks": 24, "d_model": 4096, "inner": 4096, "d_ff": 10240}
LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def flux_weights(c: dict) -> dict[str, tuple[int, int]]:
    """ComfyUI's Flux model weights (2-D, ``diffusion_model.`` names) with their shapes."""
    h, mlp = c["hidden_size"], c["hidden_size"] * c["mlp_ratio"]
    w = {"img_in": (h, c["in_channels"]), "txt_in": (h, c["context_in_dim"]), "time_in.in_layer": (h, c["time_dim"]),
         "time_in.out_layer": (h, h), "guidance_in.in_layer": (h, c["time_dim"]), "guidance_in.out_layer": (h, h),
         "vector_in.in_layer": (h, c["vec_in_dim"]), "vector_in.out_layer": (h, h),
         "final_layer.linear": (c["in_channels"], h), "final_layer.adaLN_modulation.1": (2 * h, h)}
    for i in range(c["depth"]):
        for s in ("img", "txt"):
            w |= {f"double_blocks.{i}.{s}_mod.lin": (6 * h, h), f"double_blocks.{i}.{s}_attn.qkv": (3 * h, h),
                  f"double_blocks.{i}.{s}_attn.proj": (h, h), f"double_blocks.{i}.{s}_mlp.0": (mlp, h),
                  f"double_blocks.{i}.{s}_mlp.2": (h, mlp)}
    for i in range(c["depth_single_blocks"]):
        w |= {f"single_blocks.{i}.linear1": (3 * h + mlp, h), f"single_blocks.{i}.linear2": (h, h + mlp),
              f"single_blocks.{i}.modulation.lin": (3 * h, h)}
    return {f"diffusion_model.{k}.weight": v for k, v in w.items()}


def text_encoder_weights(clip: dict = CLIP_L, t5: dict = T5XXL) -> dict[str, tuple[int, int]]:
    """ComfyUI's Flux text-encoder weights (the CLIP patcher's names) that LoRAs target, with their shapes."""
    w, d = {}, clip["width"]
    for b in range(clip["layers"]):
        for layer, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)), ("self_attn.v_proj", (d, d)),
                             ("self_attn.out_proj", (d, d)), ("mlp.fc1", (clip["mlp"], d)), ("mlp.fc2", (d, clip["mlp"]))):
            w[f"clip_l.transformer.text_model.encoder.layers.{b}.{layer}.weight"] = shape
    m, inner, ff = t5["d_model"], t5["inner"], t5["d_ff"]
    for b in range(t5["blocks"]):
        for layer, shape in (("layer.0.SelfAttention.q", (inner, m)), ("layer.0.SelfAttention.k", (inner, m)),
                             ("layer.0.SelfAttention.v", (inner, m)), ("layer.0.SelfAttention.o", (m, inner)),
                             ("layer.1.DenseReluDense.wi_0", (ff, m)), ("layer.1.DenseReluDense.wi_1", (ff, m)),
                             ("layer.1.DenseReluDense.wo", (m, ff))):
            w[f"t5xxl.transformer.encoder.block.{b}.{layer}.weight"] = shape
    return w


# --- ComfyUI's rules, restated ----------------------------------------------------------------------------------
SWAP = "swap_scale_shift"


def flux_to_diffusers(c: dict) -> dict[str, object]:
    """comfy/utils.py flux_to_diffusers (``.weight`` entries): diffusers key -> BFL weight or (weight, offset[, fn])."""
    h, out = c["hidden_size"], "diffusion_model."
    km: dict[str, object] = {}
    double = {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
              "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
              "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
    for i in range(c["depth"]):
        f, t = f"transformer_blocks.{i}", f"{out}double_blocks.{i}"
        for j, p in enumerate("qkv"):
            km[f"{f}.attn.to_{p}.weight"] = (f"{t}.img_attn.qkv.weight", (0, j * h, h))
            km[f"{f}.attn.add_{p}_proj.weight"] = (f"{t}.txt_attn.qkv.weight", (0, j * h, h))
        km |= {f"{f}.{d}.weight": f"{t}.{b}.weight" for d, b in double.items()}
    for i in range(c["depth_single_blocks"]):
        f, t = f"single_transformer_blocks.{i}", f"{out}single_blocks.{i}"
        for j, p in enumerate("qkv"):
            km[f"{f}.attn.to_{p}.weight"] = (f"{t}.linear1.weight", (0, j * h, h))
        km[f"{f}.proj_mlp.weight"] = (f"{t}.linear1.weight", (0, 3 * h, 4 * h))
        km |= {f"{f}.norm.linear.weight": f"{t}.modulation.lin.weight", f"{f}.proj_out.weight": f"{t}.linear2.weight"}
    basic = {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in",
             "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
    km |= {f"{d}.weight": f"{out}{b}.weight" for d, b in basic.items()}
    km["norm_out.linear.weight"] = (f"{out}final_layer.adaLN_modulation.1.weight", None, SWAP)
    return km


def comfyui_key_map(c: dict = DEV, clip: dict = CLIP_L, t5: dict = T5XXL) -> dict[str, object]:
    """LoRA key stem ComfyUI recognises for Flux -> the weight (or slice) it patches."""
    keys: dict[str, object] = {}
    for k in flux_weights(c):  # model_lora_keys_unet, generic part
        path = k[len("diffusion_model."):-len(".weight")]
        keys[f"lora_unet_{path.replace('.', '_')}"] = k
        keys[k[:-len(".weight")]] = k
    for k, to in flux_to_diffusers(c).items():  # isinstance(model, Flux)
        d = k[:-len(".weight")]
        keys |= {f"transformer.{d}": to, f"lycoris_{d.replace('.', '_')}": to, f"lora_transformer_{d.replace('.', '_')}": to, d: to}
    for i in range(c["depth_single_blocks"]):
        keys[f"diffusion_model.single_blocks.{i}.linear1_qkv"] = (f"diffusion_model.single_blocks.{i}.linear1.weight",
                                                                  (0, 0, 3 * c["hidden_size"]))
    te = text_encoder_weights(clip, t5)
    keys |= {f"text_encoders.{k[:-len('.weight')]}": k for k in te}  # model_lora_keys_clip
    for b in range(clip["layers"]):
        for layer, short in LORA_CLIP_MAP.items():
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{layer}.weight"
            keys |= {f"lora_te_text_model_encoder_layers_{b}_{short}": k, f"lora_te1_text_model_encoder_layers_{b}_{short}": k,
                     f"text_encoder.text_model.encoder.layers.{b}.{layer}": k}
    for k in te:
        if k.startswith("t5xxl.transformer."):
            p = k[len("t5xxl.transformer."):-len(".weight")].replace(".", "_")
            keys |= {f"lora_te2_{p}": k, f"lora_te3_{p}": k}
    return keys


PAIRS = (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight"))  # the two this file writes


def load_lora(lora: dict[str, np.ndarray], key_map: dict[str, object]) -> tuple[dict, list[str]]:
    """comfy/lora.py load_lora for LoRA pairs: {target: (up, down, alpha)}, and the keys it did not load."""
    patches, loaded = {}, set()
    for x, target in key_map.items():
        alpha = lora.get(f"{x}.alpha")
        for up, down in PAIRS:
            if f"{x}.{up}" in lora:
                patches[target] = (lora[f"{x}.{up}"], lora[f"{x}.{down}"], None if alpha is None else float(alpha))
                loaded |= {f"{x}.{up}", f"{x}.{down}"} | ({f"{x}.alpha"} if alpha is not None else set())
                break
    return patches, [k for k in lora if k not in loaded]


def swap_scale_shift(delta: np.ndarray) -> np.ndarray:
    shift, scale = np.split(delta, 2)
    return np.concatenate([scale, shift])


def patched(patches: dict, weights: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """ModelPatcher.add_patches + calculate_weight on zero weights: the delta ComfyUI adds to each weight."""
    out = {}
    for target, (up, down, alpha) in patches.items():
        key, offset, function = (target, None, None) if isinstance(target, str) else (*target, None)[:3]
        weight = out.setdefault(key, np.zeros(weights[key], np.float32))
        view = weight if offset is None else weight[offset[1]:offset[1] + offset[2]]  # narrow(0, start, size)
        delta = (1.0 if alpha is None else alpha / down.shape[0]) * (up.astype(np.float32) @ down.astype(np.float32))
        assert delta.shape == view.shape, f"{target}: delta {delta.shape} != weight {view.shape}"
        view += swap_scale_shift(delta) if function == SWAP else delta
    return out


# --- what we export ----------------------------------------------------------------------------------------------
TINY = {"depth": 1, "depth_single_blocks": 1, "hidden_size": 8, "in_channels": 4, "context_in_dim": 6,
        "vec_in_dim": 5, "time_dim": 7, "mlp_ratio": 4}
TINY_CLIP, TINY_T5 = {"layers": 1, "width": 6, "mlp": 12}, {"blocks": 1, "d_model": 10, "inner": 10, "d_ff": 12}
def diffusers_shapes(c: dict, clip: dict, t5: dict) -> dict[str, tuple[tuple[int, int], str | None]]:
    """Canonical (diffusers) module name -> (weight shape, the fused BFL weight it is a slice of, or None), for every
    layer ComfyUI's Flux rules can patch."""
    targets = {}
    for k, to in flux_to_diffusers(c).items():
        key, offset = (to, None) if isinstance(to, str) else to[:2]
        shape = flux_weights(c)[key]
        targets[f"transformer.{k[:-len('.weight')]}"] = (shape, None) if offset is None else ((offset[2], shape[1]), key)
    for k, shape in text_encoder_weights(clip, t5).items():
        component = "text_encoder." if k.startswith("clip_l.") else "text_encoder_2."
        targets[component + k.split(".transformer.", 1)[1][:-len(".weight")]] = (shape, None)
    return targets


def flux_lora(c: dict = DEV, clip: dict = CLIP_L, t5: dict = T5XXL, *, rank: int = 1, split_qkv: bool = False,
              norm_out: bool = False, seed: int = 0) -> LoraModel:
    """A LoRA on every layer ComfyUI can patch (``norm_out.linear``, which has no BFL name of its own, only with
    ``norm_out``). The parts of a fused BFL weight share one A, rank and alpha, as in a LoRA trained on the fused
    layer (kohya's default); with ``split_qkv`` each has its own, as kohya's split_qkv trains them (written back as
    one block-diagonal LoRA on the fused layer)."""
    rng, model = np.random.default_rng(seed), LoraModel(architecture="flux-1-dev")
    shared: dict[str, Tensor] = {}

    def t(*shape):
        return Tensor.from_numpy(rng.standard_normal(shape).astype(np.float32))

    for n, (name, ((out, inp), fused)) in enumerate(diffusers_shapes(c, clip, t5).items()):
        if name == "transformer.norm_out.linear" and not norm_out:
            continue
        if fused and not split_qkv:
            a, alpha = shared.setdefault(fused, t(rank, inp)), rank / 2
        else:
            a, alpha = t(rank + n % 3, inp), float(rank + n % 4)
        model.add(LoraModule(name, "lora", {"lora_A.weight": a, "lora_B.weight": t(out, a.shape[0])}, alpha=alpha))
    return model


def written(model: LoraModel, path, fmt: str, options: WriteOptions = WRITE_DEFAULTS) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        {"kohya": kohya, "comfyui": comfyui, "diffusers": diffusers}[fmt].write(model, path, options)
    tensors, _ = read_safetensors(path)
    return {k: t.to_numpy() for k, t in tensors.items()}


OUTPUTS = [("kohya", WriteOptions()), ("comfyui", WriteOptions()), ("comfyui", WriteOptions(factor_names="lora_A"))]
OUTPUT_IDS = ["kohya", "comfyui-lora_up", "comfyui-lora_A"]


def test_the_restated_rules_patch_every_flux1_dev_linear_at_its_shape():
    """Sanity of the restatement: what ComfyUI patches is exactly Flux.1-dev's Linear layers (our meta-device tree)."""
    from lorabridge.architectures.flux1 import FLUX1

    ours = {f"{c}.{p}": shape for c in FLUX1.components for p, shape in FLUX1.modules(c).items()
            if FLUX1.module_types(c)[p] == "Linear"}
    restated = {name: shape for name, (shape, _) in diffusers_shapes(DEV, CLIP_L, T5XXL).items()}
    assert {n: ours.get(n) for n in restated} == restated
    assert {n for n in ours if n.startswith("transformer.")} == {n for n in restated if n.startswith("transformer.")}


@pytest.mark.parametrize("split_qkv", [False, True], ids=["fused", "split_qkv"])
@pytest.mark.parametrize(("fmt", "options"), OUTPUTS, ids=OUTPUT_IDS)
def test_every_key_of_our_flux1_dev_output_is_loaded_by_comfyui_onto_a_weight_of_its_shape(tmp_path, fmt, options, split_qkv):
    lora = written(flux_lora(split_qkv=split_qkv), tmp_path / "out.safetensors", fmt, options)
    key_map, weights = comfyui_key_map(), flux_weights(DEV) | text_encoder_weights()
    patches, not_loaded = load_lora(lora, key_map)
    assert not_loaded == []
    for target, (up, down, _) in patches.items():
        key, offset = (target, None) if isinstance(target, str) else target[:2]
        rows = weights[key][0] if offset is None else offset[2]
        assert (up.shape[0], down.shape[1]) == (rows, weights[key][1]), target
    # every Linear ComfyUI can patch, each whole (fused qkv/linear1 too), but norm_out: no BFL name without a row swap
    assert set(patches) == set(weights) - {"diffusion_model.final_layer.adaLN_modulation.1.weight"}
    ranks = {down.shape[0] for t, (_, down, _) in patches.items() if t.endswith(("qkv.weight", "linear1.weight"))}
    assert min(ranks) >= 3 if split_qkv else ranks == {1}  # split: every part's rank (1..3), concatenated


def expected_deltas(model: LoraModel, c: dict) -> dict[str, np.ndarray]:
    """Our neutral model's delta W per ComfyUI weight: each module's at the slice flux_to_diffusers names for it."""
    weights, to_comfy = flux_weights(c) | text_encoder_weights(TINY_CLIP, TINY_T5), flux_to_diffusers(c)
    out = {}
    for name, module in model.modules.items():
        component, _, path = name.partition(".")
        if component == "transformer":
            to = to_comfy[f"{path}.weight"]
            key, offset, function = (to, None, None) if isinstance(to, str) else (*to, None)[:3]
        else:
            key, offset, function = f"{'clip_l' if component == 'text_encoder' else 't5xxl'}.transformer.{path}.weight", None, None
        weight = out.setdefault(key, np.zeros(weights[key], np.float32))
        view = weight if offset is None else weight[offset[1]:offset[1] + offset[2]]
        view += swap_scale_shift(module.delta_weight()) if function == SWAP else module.delta_weight()
    return out


@pytest.mark.parametrize("split_qkv", [False, True], ids=["fused", "split_qkv"])
@pytest.mark.parametrize(("fmt", "options"), OUTPUTS, ids=OUTPUT_IDS)
def test_comfyui_applies_the_delta_of_our_neutral_model(tmp_path, fmt, options, split_qkv):
    """On tiny shapes (ComfyUI's rules are the same at any hidden size): W + delta as ComfyUI computes it from our
    file, fused weights patched whole, equals W + our modules' deltas placed at their rows."""
    model = flux_lora(TINY, TINY_CLIP, TINY_T5, rank=2, split_qkv=split_qkv)
    lora = written(model, tmp_path / "out.safetensors", fmt, options)
    key_map = comfyui_key_map(TINY, TINY_CLIP, TINY_T5)
    patches, not_loaded = load_lora(lora, key_map)
    assert not_loaded == []
    theirs, ours = patched(patches, flux_weights(TINY) | text_encoder_weights(TINY_CLIP, TINY_T5)), expected_deltas(model, TINY)
    assert sorted(theirs) == sorted(ours)
    for key, delta in ours.items():
        np.testing.assert_allclose(theirs[key], delta, rtol=1e-5, atol=1e-6, err_msg=key)


def test_comfyui_applies_our_diffusers_output_through_flux_to_diffusers_slices(tmp_path):
    """Our diffusers file (``transformer.<diffusers path>``, q/k/v and proj_mlp apart): ComfyUI patches the slices of
    qkv and linear1 and swaps norm_out's halves. It reads no ``lora_adapter_metadata``, so alpha must equal rank
    (scale 1) for ComfyUI to agree; diffusers-style T5 keys (``text_encoder_2.``) are not in its map."""
    model = flux_lora(TINY, TINY_CLIP, TINY_T5, rank=2, split_qkv=True, norm_out=True)
    for module in model.modules.values():
        module.alpha = float(module.rank)
    lora = written(model, tmp_path / "out.safetensors", "diffusers")
    patches, not_loaded = load_lora(lora, comfyui_key_map(TINY, TINY_CLIP, TINY_T5))
    assert not_loaded and all(k.startswith("text_encoder_2.") for k in not_loaded)
    for name in [n for n in model.modules if n.startswith("text_encoder_2.")]:
        del model.modules[name]
    theirs, ours = patched(patches, flux_weights(TINY) | text_encoder_weights(TINY_CLIP, TINY_T5)), expected_deltas(model, TINY)
    assert sorted(theirs) == sorted(ours)
    for key, delta in ours.items():
        np.testing.assert_allclose(theirs[key], delta, rtol=1e-5, atol=1e-6, err_msg=key)


# --- the comfyui format: both spellings, bit-exact round trips ----------------------------------------------------
@pytest.mark.parametrize("names", ["lora_up", "lora_A"])
@pytest.mark.parametrize("arch", ["flux", "flux-split_qkv", "sdxl"])
def test_neutral_to_comfyui_to_neutral_is_bit_exact(tmp_path, arch, names):
    """Bit-exact both ways; q/k/v with their own A, rank and alpha merge into one block-diagonal LoRA at one alpha,
    so they come back with the same delta W (and the file itself back byte for byte)."""
    from lorabridge.formats.neutral import read_neutral, write_neutral
    from tests.fixtures.core import make_lora_model

    split = arch == "flux-split_qkv"
    model = flux_lora(TINY, TINY_CLIP, TINY_T5, rank=2, split_qkv=split) if arch.startswith("flux") else make_lora_model()
    write_neutral(model, tmp_path / "n.safetensors")
    first = convert(tmp_path / "n.safetensors", tmp_path / "c.safetensors", "comfyui", progress=False, factor_names=names)
    keys = list(read_safetensors(first.output)[0])
    assert all(k.startswith(("diffusion_model.", "text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.",
                             "text_encoders.t5xxl.transformer.")) for k in keys)
    assert any(k.endswith(f".{names}.weight") for k in keys)
    back = convert(first.output, tmp_path / "back.safetensors", "neutral", progress=False)
    assert back.source_format == ("comfyui" if names == "lora_A" else "kohya")  # kohya's reader takes lora_up names too
    again = convert(back.output, tmp_path / "again.safetensors", "comfyui", progress=False, factor_names=names)
    assert read_safetensors(again.output)[0].keys() == read_safetensors(first.output)[0].keys()
    assert all(a.same_as(b) for a, b in zip(read_safetensors(again.output)[0].values(), read_safetensors(first.output)[0].values()))
    read = read_neutral(back.output)
    for name, module in model.modules.items():
        if split:
            np.testing.assert_allclose(read.modules[name].delta_weight(), module.delta_weight(), rtol=1e-6, atol=1e-6)
            continue
        assert all(module.tensors[r].same_as(read.modules[name].tensors[r]) for r in module.tensors), name
        assert (read.modules[name].alpha, read.modules[name].rank) == (module.alpha, module.rank), name


def test_both_spellings_read_as_the_same_lora_and_one_module_with_both_is_refused(tmp_path):
    from lorabridge.errors import LoraBridgeError
    from lorabridge.io.safetensors_file import write_safetensors

    model = flux_lora(TINY, TINY_CLIP, TINY_T5)
    up = written(model, tmp_path / "up.safetensors", "comfyui")
    a_b = written(model, tmp_path / "ab.safetensors", "comfyui", WriteOptions(factor_names="lora_A"))
    from_up, from_ab = comfyui.read(tmp_path / "up.safetensors"), comfyui.read(tmp_path / "ab.safetensors")
    assert sorted(from_up.modules) == sorted(from_ab.modules) == sorted(model.modules)
    for name, module in from_up.modules.items():
        assert all(module.tensors[r].same_as(from_ab.modules[name].tensors[r]) for r in module.tensors), name
    key = next(k for k in a_b if k.endswith(".lora_A.weight"))
    both = {**a_b, key.replace(".lora_A.", ".lora_down."): a_b[key]}
    write_safetensors(tmp_path / "both.safetensors", {k: Tensor.from_numpy(v) for k, v in both.items()}, {})
    with pytest.raises(LoraBridgeError, match="has both lora_A.weight and lora_down.weight"):
        comfyui.read(tmp_path / "both.safetensors")
    assert up.keys() != a_b.keys()


def test_factor_names_is_a_cli_option_of_comfyui_only(run_cli, tmp_path):
    from lorabridge.formats.neutral import write_neutral

    write_neutral(flux_lora(TINY, TINY_CLIP, TINY_T5), tmp_path / "n.safetensors")
    ok = run_cli("neutral2pt", tmp_path / "n.safetensors", "--format", "comfyui", "--factor-names", "lora_A",
                 "-o", tmp_path / "c.safetensors")
    assert ok.exit_code == 0, ok.stderr
    assert any(k.endswith(".lora_B.weight") for k in read_safetensors(tmp_path / "c.safetensors")[0])
    refused = run_cli("convert", tmp_path / "n.safetensors", "--to", "kohya", "--factor-names", "lora_A", "-o", tmp_path / "k.safetensors")
    assert refused.exit_code == 1 and "--factor-names is not supported when writing kohya (it is when writing comfyui)" in refused.stderr
