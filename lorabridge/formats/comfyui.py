"""ComfyUI's generic LoRA names (BFL/SGM original names with dots), for every registered architecture.

Keys are ``<ComfyUI prefix>.<original module path>.<suffix>``: ``diffusion_model.double_blocks.0.img_attn.qkv``
(Flux.1's transformer, BFL path, fused layers merged), ``diffusion_model.input_blocks.4.1.proj_in`` (SDXL's
UNet, SGM path), ``text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj`` (CLIP-L),
``text_encoders.clip_g.transformer.`` (SDXL's bigG) and ``text_encoders.t5xxl.transformer.`` (Flux.1's T5);
the prefixes are each architecture's (``Architecture.comfyui_prefixes``). ComfyUI maps the stem of every
``diffusion_model.*.weight`` of its model, and ``text_encoders.`` + every text-encoder weight, to that weight
(comfy/lora.py ``model_lora_keys_unet``, ``model_lora_keys_clip``); its LoraSave node and OneTrainer's
COMFY_LORA write these names. The pair is spelled ``lora_up``/``lora_down`` (kohya's, LoraSave's) or
``lora_A``/``lora_B`` (diffusers', OneTrainer's); ComfyUI reads both (comfy/weight_adapter/lora.py
``LoRAAdapter.load``) and the ``.alpha`` beside either (comfy/lora.py ``load_lora``), so the writer keeps
alpha in both. ``tests/test_comfyui_flux.py`` applies ComfyUI's rules, restated as data, to what this writes.

Reading takes both spellings. Detection claims the ``lora_A`` spelling (tried before PEFT, whose bare ``lora_A``
keys it would otherwise look like); a file in the ``lora_up`` spelling is detected as kohya, whose reader reads
ComfyUI's generic names too, to the same model.
"""

from __future__ import annotations

import os
from typing import Mapping

from ..architectures import architectures
from ..errors import LoraBridgeError
from ..model import LoraModel, LoraModule
from ..naming.underscored import A_B, COMFYUI, ModuleProblem
from ..tensor import Tensor
from .contract import (FOREIGN_READ, PLAIN_LORA_WRITE, READ_DEFAULTS, WRITE_DEFAULTS, DeclaredFormat, Progress,
                       ReadOptions, WriteOptions)
from .underscored_files import KOHYA_FACTORS, kohya_module, kohya_tensors, read_underscored, write_underscored

# --factor-names: the suffixes of lora_A and lora_B in each spelling ComfyUI reads.
FACTOR_NAMES: dict[str, tuple[str, str]] = {"lora_up": KOHYA_FACTORS, "lora_A": ("lora_A.weight", "lora_B.weight")}


def comfyui_module(name: str, parts: Mapping[str, Tensor], user_alpha: float | None = None) -> LoraModule:
    """A module from ComfyUI parts in either spelling of the pair (refused when a module has both)."""
    both = [suffix for suffix, kohya in A_B.items() if suffix in parts and kohya in parts]
    if both:
        raise ModuleProblem(f"has both {both[0]} and {A_B[both[0]]}")
    return kohya_module(name, {A_B.get(suffix, suffix): t for suffix, t in parts.items()}, user_alpha)


def comfyui_prefixes() -> tuple[str, ...]:
    """The dotted prefixes ComfyUI's generic names start with, in every registered architecture."""
    return tuple(sorted({f"{prefix}." for a in architectures() for prefix in a.comfyui_prefixes.values()}))


# The reader/writer pair as the converter registry calls it.
def detect(path: str | os.PathLike) -> bool:
    """A state-dict file whose keys are all ComfyUI generic names, with at least one ``lora_A``/``lora_B`` factor."""
    from ..io.torch_file import state_dict_keys

    found = state_dict_keys(path)
    if not found or not found[0]:
        return False
    starts = comfyui_prefixes()
    parsed = [COMFYUI.parse(k) if k.startswith(starts) else None for k in found[0]]
    keys = [p for p in parsed if p is not None]
    return len(keys) == len(parsed) and any(p.suffix in A_B for p in keys)


def read(path: str | os.PathLike, options: ReadOptions = READ_DEFAULTS) -> LoraModel:
    """Read a LoRA in ComfyUI's generic names (either spelling of the pair) and check it against the registered
    architectures; fused layers (Flux.1's ``qkv``, ``linear1``) are split exactly into their diffusers parts.

    Example:
        >>> model = read("flux_lora_comfyui.safetensors")   # doctest: +SKIP
    """
    return read_underscored(path, COMFYUI, comfyui_module, alpha=options.alpha, skip_unknown=options.skip_unknown,
                            strict=options.strict)


def write(model: LoraModel, path: str | os.PathLike, options: WriteOptions = WRITE_DEFAULTS, *,
          progress: Progress | None = None, force: bool = False) -> None:
    """Write ``model`` in ComfyUI's generic names: original paths with dots, fused layers merged, 0-d alphas,
    ``options.factor_names`` choosing the pair's spelling (``lora_up`` by default, or ``lora_A``); full modules
    as ``diff``/``diff_b``. LoHa/LoKr are baked with ``options.bake_to_lora`` or refused; DoRA is refused
    (``--format kohya`` keeps it).

    Example:
        >>> write(model, "flux_lora_comfyui.safetensors", WriteOptions(factor_names="lora_A"))   # doctest: +SKIP
    """
    from .checks import writable_lora

    spelling = options.factor_names or "lora_up"
    if spelling not in FACTOR_NAMES:
        raise LoraBridgeError(f"unknown factor names {spelling!r}; choose one of {', '.join(FACTOR_NAMES)}", path)
    model = writable_lora(model, path, options, target=FORMAT.name, kinds=FORMAT.kinds, dora_axes=FORMAT.dora_axes)
    write_underscored(model, path, "original", lambda m: kohya_tensors(m, FACTOR_NAMES[spelling]),
                      dtype=options.dtype, progress=progress, dotted=True)


FORMAT = DeclaredFormat(
    name="comfyui", framework="torch",
    description="ComfyUI generic names: diffusion_model.<BFL or SGM path>, text_encoders.<clip_l|clip_g|t5xxl>.transformer.<path>, "
                "lora_up/lora_down or lora_A/lora_B (--factor-names), .alpha",
    detect=detect, read=read, write=write, stores_metadata=True, stores_alpha=True,
    kinds=("lora", "full"), dora_axes=(),  # diff/diff_b full deltas; DoRA: --format kohya
    read_options=FOREIGN_READ, write_options=PLAIN_LORA_WRITE | {"factor_names"})
