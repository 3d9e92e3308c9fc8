"""Flux.1 key names under hypothesis: mutated kohya, ComfyUI (``diffusion_model.``) and diffusers
(``transformer.``) names, fused qkv/linear1 with wrong row counts, split_qkv files whose B is not
block-diagonal, huge and odd block numbers, names with newlines. Every file converts to a correct
model or gives the project's own one-line error naming the file, never another exception.
(``bench/fuzz_atheris.py flux-kohya`` runs the kohya reader for longer.)
"""

from __future__ import annotations

import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorabridge.architectures.flux1 import FLUX1
from lorabridge.converters import convert
from lorabridge.errors import LoraBridgeError
from lorabridge.io.safetensors_file import write_safetensors
from lorabridge.tensor import Tensor

# body (BFL path with {n} for the block) -> (out, in) at Flux.1-dev size; fused bodies have several parts
BODIES = {
    "double_blocks.{n}.img_attn.qkv": (9216, 3072), "double_blocks.{n}.txt_attn.qkv": (9216, 3072),
    "double_blocks.{n}.img_attn.proj": (3072, 3072), "double_blocks.{n}.img_mod.lin": (18432, 3072),
    "double_blocks.{n}.txt_mlp.0": (12288, 3072), "single_blocks.{n}.linear1": (21504, 3072),
    "single_blocks.{n}.linear2": (3072, 15360), "single_blocks.{n}.modulation.lin": (9216, 3072),
}
DIFFUSERS_BODIES = {"transformer_blocks.{n}.attn.to_q": (3072, 3072), "single_transformer_blocks.{n}.proj_mlp": (12288, 3072),
                    "transformer_blocks.{n}.norm1.linear": (18432, 3072)}
ODD_BLOCKS = ["99999999999999999999", "18446744073709551616", "19", "38", "-1", "01", "1\n", "\n0", "٣", "1_0", "", " 1"]
BLOCKS = st.sampled_from([None] * 4 * len(ODD_BLOCKS) + ODD_BLOCKS)  # None: a real block (0-18: in both block kinds)
# spelling -> (prefix, dots as underscores, down suffix, up suffix)
SPELLINGS = {
    "kohya": ("lora_unet_", True, "lora_down.weight", "lora_up.weight"),
    "lycoris": ("lycoris_", True, "lora_down.weight", "lora_up.weight"),
    "comfyui": ("diffusion_model.", False, "lora_down.weight", "lora_up.weight"),
    "comfyui A/B": ("diffusion_model.", False, "lora_A.weight", "lora_B.weight"),
    "diffusers": ("transformer.", False, "lora_A.weight", "lora_B.weight"),
}
NOISE = st.sampled_from([""] * 40 + ["\n", "_", ".", "lora_unet_", "transformer.", "double_blocks", "\x00", "é"])
ROW_CHANGES = [0] * 20 + [-1, 1, -3072, 3072, -9216]  # mostly the real row count
ALPHAS = [None] * 4 + [1.0, 16.0, 0.0, float("nan"), 1e6]


@st.composite
def flux_files(draw):
    """(tensors, fused layers: (down key, up key, alpha key, BFL name) of each key pair on a fused layer
    of Flux.1-dev that no mutation touched) of one mutated Flux.1 LoRA file."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    tensors: dict[str, np.ndarray] = {}
    fused = []
    spellings = list(SPELLINGS)
    for _ in range(draw(st.integers(1, 3))):
        spelling = draw(st.sampled_from(spellings))
        if draw(st.integers(0, 2)):  # mostly one spelling per file, as a tool writes
            spellings = [spelling]
        prefix, underscored, down, up = SPELLINGS[spelling]
        bodies = DIFFUSERS_BODIES if spelling == "diffusers" and draw(st.booleans()) else BODIES
        body = draw(st.sampled_from(list(bodies)))
        out, inp = bodies[body]
        block = draw(BLOCKS)
        name = body.replace("{n}", block if block is not None else str(draw(st.integers(0, 18))))
        stem = prefix + (name.replace(".", "_") if underscored else name)
        cut, noise = draw(st.integers(0, len(stem))), draw(NOISE)
        stem = stem[:cut] + noise + stem[cut:]
        if not noise and FLUX1.fused_parts(name):
            fused.append((f"{stem}.{down}", f"{stem}.{up}", f"{stem}.alpha", name))
        rank = draw(st.integers(1, 3))
        rows = out + draw(st.sampled_from(ROW_CHANGES))
        a = rng.standard_normal((rank, inp)).astype("f2")
        b = rng.standard_normal((max(rows, 0), rank + draw(st.sampled_from([0] * 9 + [1])))).astype("f2")
        if body.endswith("qkv") and draw(st.booleans()):  # kohya split_qkv: A stacked to 3r rows, B (mostly) block-diagonal
            a = rng.standard_normal((3 * rank, inp)).astype("f2")
            b = np.zeros((max(rows, 0), 3 * rank), "f2")
            for part in range(3):
                rows_of, cols = slice(part * rows // 3, (part + 1) * rows // 3), slice(part * rank, (part + 1) * rank)
                if draw(st.booleans()):
                    b[rows_of, cols] = rng.standard_normal((len(range(rows)[rows_of]), rank))
                if draw(st.integers(0, 3)) == 0:  # a value outside its block: not block-diagonal
                    b[rows_of, (part + 1) % 3 * rank] = 1
        tensors[f"{stem}.{down}"] = a
        tensors[f"{stem}.{up}"] = b
        alpha = draw(st.sampled_from(ALPHAS))
        if alpha is not None:
            tensors[f"{stem}.alpha"] = np.array(alpha, "f4")
    return tensors, fused


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


@FUZZ
@given(file=flux_files(), skip_unknown=st.booleans(), strict=st.booleans())
def test_mutated_flux_names_give_our_error_or_a_correct_model(file, skip_unknown, strict, tmp_path):
    tensors, fused = file
    src = tmp_path / "flux.safetensors"
    write_safetensors(src, {k: Tensor.from_numpy(v) for k, v in tensors.items()}, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = convert(src, tmp_path / "n.safetensors", "neutral", force=True, progress=False,
                             skip_unknown=skip_unknown, strict=strict)
        except LoraBridgeError as exc:
            assert "\n" not in str(exc) and str(src) in str(exc)
            return
    assert_correct(result.model, tensors, fused, skip_unknown)


def assert_correct(model, tensors: dict[str, np.ndarray], fused: list[tuple[str, str, str, str]], skip_unknown: bool) -> None:
    """Every module fits its architecture's tree, and a fused layer's parts give its delta W rows (checked
    on one random input vector: B_part (A_part x) * scale_part == rows of B (A x) * scale). Its parts may be
    missing only with ``skip_unknown`` (keys another reader's grammar cannot place are dropped, with a warning)."""
    from lorabridge.architectures import get_architecture

    architecture = get_architecture(model.architecture)
    for module in model.modules.values():
        shapes = architecture.tree.all_modules()[module.component]
        assert module.path in shapes, module.name
    if model.architecture != FLUX1.name:
        return
    x = np.random.default_rng(0).standard_normal(3072).astype("f4")
    for down_key, up_key, alpha_key, name in fused:
        if down_key not in tensors or up_key not in tensors:  # a later pair took the key
            continue
        down, up = tensors[down_key].astype("f4"), tensors[up_key].astype("f4")
        alpha = float(tensors[alpha_key]) if alpha_key in tensors else down.shape[0]
        expected = up @ (down @ x) * (alpha / down.shape[0])
        names = [f"transformer.{p}" for p in FLUX1.fused_parts(name)[1]]
        if not all(n in model.modules for n in names):
            assert skip_unknown, f"{up_key} was dropped without --skip-unknown"
            continue
        parts = [model.modules[n] for n in names]
        got = np.concatenate([p.tensors["lora_B.weight"].to_float32() @ (p.tensors["lora_A.weight"].to_float32() @ x)
                              * p.scale for p in parts])
        assert np.allclose(got, expected, rtol=1e-4, atol=1e-3), up_key


def test_the_fuzz_reaches_the_split_of_a_split_qkv_file_whose_b_is_not_block_diagonal(tmp_path):
    """What the fuzz's oracle checks, on one file: kohya split_qkv (A stacked to 3r rows) with one value of
    q's rows in k's rank column. Not block-diagonal, so each part keeps the whole A (rank 3r) and alpha,
    and its delta W is exactly its row block of the fused one."""
    rng, rank, stem = np.random.default_rng(4), 2, "lora_unet_double_blocks_2_img_attn_qkv"
    down = rng.standard_normal((3 * rank, 3072)).astype("f2")
    up = np.zeros((9216, 3 * rank), "f2")
    for part in range(3):
        up[part * 3072:(part + 1) * 3072, part * rank:(part + 1) * rank] = rng.standard_normal((3072, rank))
    up[7, rank] = 1  # q's row 7 uses k's first rank column
    tensors = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": np.array(3.0, "f4")}
    src = tmp_path / "split_qkv.safetensors"
    write_safetensors(src, {k: Tensor.from_numpy(v) for k, v in tensors.items()}, {})
    model = convert(src, tmp_path / "n.safetensors", "neutral", progress=False).model
    parts = [model.modules[f"transformer.transformer_blocks.2.attn.{p}"] for p in ("to_q", "to_k", "to_v")]
    assert [(p.rank, p.alpha) for p in parts] == [(3 * rank, 3.0)] * 3
    assert all(p.tensors["lora_A.weight"].to_numpy().tobytes() == down.tobytes() for p in parts)
    assert_correct(model, tensors, [(f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha",
                                     "double_blocks.2.img_attn.qkv")], skip_unknown=False)
