"""kohya sd-scripts / A1111 / ComfyUI LoRA files, for every registered architecture.

Keys are ``<prefix>_<module path, dots as underscores>.<suffix>``:
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight`` (SDXL's UNet, SGM path),
``lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight`` (CLIP-L; ``lora_te2_`` for
bigG); the prefixes are each architecture's (``Architecture.kohya_prefixes``). Suffixes: ``lora_down.weight``
is lora_A, ``lora_up.weight`` lora_B, a 0-d ``alpha`` (often fp16; absent means alpha = rank) and, for DoRA,
``dora_scale``. Safetensors metadata (``ss_*`` training facts, ``modelspec.*``) travels in
:attr:`LoraModel.training` and is written back verbatim.

The key grammar is :mod:`lorabridge.naming.underscored` (shared with LyCORIS and MindONE's kohya
port), reading and writing :mod:`.underscored_files`. Reading takes the registered architecture whose
names place the most keys and resolves underscored names by lookup in its module tree, in the original
and in diffusers spelling (:meth:`~lorabridge.architectures.architecture.Architecture.resolve_underscored`),
never by guessing where the dots were; a LoRA on a fused layer of the original spelling (Flux's ``qkv``)
is split into its parts exactly. A name that resolves to nothing keeps its underscores (``unet.down_blocks_0_attentions_0_...``)
so that :func:`~lorabridge.formats.checks.check_model` can list it, or name the architecture it
belongs to ("not an SDXL LoRA"). Writing uses the original spelling (SGM for SDXL's UNet), fused
layers merged back, what kohya and A1111 write and what ComfyUI and diffusers' kohya converter load.
"""

from __future__ import annotations

import os

from ..architectures import architectures
from ..architectures.flux1 import FLUX1
from ..model import LoraModel
from ..naming.underscored import DIFF, KOHYA
from .contract import (FOREIGN_READ, PLAIN_LORA_WRITE, READ_DEFAULTS, WRITE_DEFAULTS, DeclaredFormat, Progress,
                       ReadOptions, WriteOptions)
from .underscored_files import SHOWN, kohya_module, kohya_tensors, read_underscored, write_underscored

# Where diffusers' kohya loader can place UNet layers: it maps only SGM input_blocks 1+, middle_block and
# output_blocks, so conv_in (input_blocks.0), time/label embeddings and conv_out make it fail.
UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")
# Where diffusers' kohya Flux loader (0.35.2, _convert_kohya_flux_lora_to_diffusers) can place Flux.1 layers: the
# double and single blocks. It fails on an embedder's or the final layer's .alpha ("TODO: alphas.") and, without
# one, names them without "transformer.", so load_lora_into_transformer drops them; it keeps only lora_unet_/lora_te_
# keys, so kohya's lora_te1_ (CLIP-L) and lora_te3_ (T5) are dropped without a word. It returns no network alphas
# (alpha / rank folded into the factors), so diffusers' get_peft_kwargs takes the first module's rank as lora_alpha
# for all: modules of another rank are mis-scaled. tests/test_flux_diffusers_kohya.py
FLUX_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
# What the tools that read kohya files make of a dora_scale per output row (out, 1[, 1, 1]); per input
# column both compute DoRA as trained. Rules restated in tests/test_dora_axes.py, with their sources.
OUT_AXIS_READERS = ("A1111 and older ComfyUI read dora_scale per input column only and compute a wrong weight "
                    "from it, newer ComfyUI divides by the norm of W instead of W + delta W; LyCORIS computes it "
                    "as trained, and --format diffusers or peft keeps it for diffusers/PEFT")


# The reader/writer pair as the converter registry calls it.
def detect(path: str | os.PathLike) -> bool:
    """A state-dict file whose keys are kohya LoRA keys or full deltas, in kohya's or ComfyUI's generic
    names (any architecture: the reader says if it is not SDXL)."""
    from ..io.torch_file import state_dict_keys

    found = state_dict_keys(path)
    if not found:
        return False
    # How the keys of a kohya-grammar file begin: kohya's prefixes and ComfyUI's generic ones, of every architecture.
    comfyui = {f"{prefix}." for architecture in architectures() for prefix in architecture.comfyui_prefixes.values()}
    starts = ("lora_", *sorted(comfyui), "text_encoders.")
    ours = [KOHYA.parse(k) for k in found[0] if k.startswith(starts)]
    weights = ("lora_down.weight", "lora_up.weight", DIFF)
    return any(p is not None and p.suffix in weights for p in ours) and all(p is not None for p in ours)


def read(path: str | os.PathLike, options: ReadOptions = READ_DEFAULTS) -> LoraModel:
    """Read a kohya/A1111/ComfyUI LoRA (original or diffusers spelling, or ComfyUI's generic names) and check it
    against the registered architectures.

    ``diff``/``diff_b`` full-weight deltas become kind ``full`` modules; bias deltas beside LoRA
    pairs and deltas of norm layers are refused, or dropped with ``skip_unknown`` (see :func:`stray_deltas`).

    Example:
        >>> model = read("sdxl_lora.safetensors")   # doctest: +SKIP
    """
    return read_underscored(path, KOHYA, kohya_module, alpha=options.alpha, skip_unknown=options.skip_unknown,
                            strict=options.strict)


def write(model: LoraModel, path: str | os.PathLike, options: WriteOptions = WRITE_DEFAULTS, *,
          progress: Progress | None = None, force: bool = False) -> None:
    """Write ``model`` as a kohya LoRA (original names, fused layers merged, 0-d alphas, ModelSpec); full modules as
    ``diff``/``diff_b``.

    LoHa/LoKr modules are refused with the modules listed unless ``options.bake_to_lora`` gives a
    rank; then they are baked by truncated SVD and the error per module is reported as
    :class:`~lorabridge.errors.LoraBridgeWarning`. DoRA magnitudes are written as ``dora_scale`` on
    the axis they have. Per input column (OneTrainer's and LyCORIS' ``wd_on_output=False``) is what
    A1111 and ComfyUI compute right; per output row is warned about (see :data:`OUT_AXIS_READERS`). For Flux.1,
    what diffusers' kohya loader drops, fails on or mis-scales is warned about (:func:`warn_flux_for_diffusers`).

    Example:
        >>> write(model, "sdxl_lora_kohya.safetensors")   # doctest: +SKIP
    """
    from .checks import warn, writable_lora

    model = writable_lora(model, path, options, target=FORMAT.name, kinds=FORMAT.kinds, dora_axes=FORMAT.dora_axes)
    write_underscored(model, path, "original", kohya_tensors, dtype=options.dtype, progress=progress)
    per_row = [m.name for m in model.modules.values() if m.dora_axis == "out"]
    if per_row:
        warn(f"{path}: {len(per_row)} module(s) have DoRA magnitudes per output row ({', '.join(per_row[:SHOWN])}"
             f"{' ...' if len(per_row) > SHOWN else ''}): {OUT_AXIS_READERS}")
    outside = [m.name for m in model.modules.values() if m.component == "unet" and not m.path.startswith(UNET_BLOCKS)]
    if outside:
        warn(f"{path}: {len(outside)} UNet layer(s) outside the down/mid/up blocks ({', '.join(outside[:SHOWN])}"
             f"{' ...' if len(outside) > SHOWN else ''}): ComfyUI and A1111 load them, diffusers' kohya loader "
             "cannot; for diffusers write --format diffusers")
    if model.architecture == FLUX1.name:
        warn_flux_for_diffusers(model, path)


def warn_flux_for_diffusers(model: LoraModel, path: str | os.PathLike) -> None:
    """Warn about the Flux.1 modules diffusers' kohya loader drops, fails on or mis-scales (see :data:`FLUX_BLOCKS`);
    ComfyUI applies them all as written."""
    from .checks import warn

    text = [m.name for m in model.modules.values() if m.component != "transformer"]
    if text:
        warn(f"{path}: {len(text)} text-encoder module(s) ({', '.join(text[:SHOWN])}{' ...' if len(text) > SHOWN else ''}): "
             "ComfyUI loads them, diffusers' kohya loader drops lora_te1_/lora_te3_ keys without a word; "
             "for diffusers write --format diffusers")
    ranks = sorted({m.rank for m in model.modules.values()
                    if m.kind == "lora" and m.component == "transformer" and m.path.startswith(FLUX_BLOCKS)})
    if len(ranks) > 1:
        warn(f"{path}: {len(ranks)} distinct ranks ({', '.join(map(str, ranks))}) in the Flux.1 blocks: ComfyUI applies "
             "them as written, diffusers' kohya loader scales each module by (the rank of the first module it reads) / "
             "(its own rank); for diffusers write --format diffusers")
    outside = [m.name for m in model.modules.values() if m.component == "transformer" and not m.path.startswith(FLUX_BLOCKS)]
    if outside:
        warn(f"{path}: {len(outside)} Flux.1 layer(s) outside the double/single blocks ({', '.join(outside[:SHOWN])}"
             f"{' ...' if len(outside) > SHOWN else ''}): ComfyUI loads them, diffusers' kohya loader cannot (their alpha "
             "fails the load, without one they are dropped); for diffusers write --format diffusers")


FORMAT = DeclaredFormat(
    name="kohya", framework="torch",
    description="kohya sd-scripts/A1111/ComfyUI: lora_unet_<SGM or diffusers path>.lora_down/lora_up/.alpha, lora_te1_/lora_te2_",
    detect=detect, read=read, write=write, stores_metadata=True, stores_alpha=True,
    kinds=("lora", "full"), dora_axes=("out", "in"),  # dora_scale on either axis; diff/diff_b full deltas
    read_options=FOREIGN_READ, write_options=PLAIN_LORA_WRITE)
