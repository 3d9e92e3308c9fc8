"""OneTrainer's Flux.1 LoRA key grammars, as data: its legacy underscored names and its OMI names.

OneTrainer (``Nerogar/OneTrainer``) changed how it saves Flux LoRAs (``docs/flux-lora-layouts.md`` section 3):

* **legacy** (its Flux saver from ``abfc72fe``, Aug 2024, until Mar 2025; "LEGACY_SAFETENSORS"/"LEGACY_LORA"
  since): the state dict of its ``LoRAModuleWrapper``\\ s, ``<prefix>_<diffusers module path, dots as _>``
  with prefixes ``lora_transformer`` (the diffusers ``FluxTransformer2DModel``), ``lora_te1`` (CLIP-L) and
  ``lora_te2`` (T5-XXL) (``modules/modelSetup/FluxLoRASetup.py``, ``modules/module/LoRAModule.py``):
  ``lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight``. kohya's grammar with two other
  prefixes (:data:`LEGACY`: kohya's T5 prefix is ``lora_te3``);
* **OMI** ("SAFETENSORS", its default from ``1277f8fe``, Mar 2025; ``lora_`` dropped from the prefixes in
  ``e72bfa55``): BFL names, dotted, a fused layer's parts numbered (``img_attn.qkv.0`` is to_q), behind
  ``transformer.``/``clip_l.``/``t5.`` (``modules/util/convert/lora/convert_flux_lora.py`` at ``e72bfa55``):
  ``transformer.double_blocks.0.img_attn.qkv.0.lora_down.weight``. :func:`omi_path` resolves the names.

Both keep kohya's suffixes (``lora_down.weight``, ``lora_up.weight``, ``alpha``, ``dora_scale``).
Its newer outputs (``de1437cb``, 2026: diffusers, kohya, ComfyUI) are the layouts of those readers.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from ..architectures.flux1 import FLUX1
from . import PARSED_KEYS_KEPT
from .underscored import ALPHA, Grammar

COMPONENT = "transformer"
SUFFIXES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "dora_scale": "dora_scale",
            "alpha": ALPHA}
# Legacy: OneTrainer's prefix -> the kohya prefix of the same component (Flux.1's: lora_unet, lora_te3).
LEGACY = Grammar(suffixes=SUFFIXES, aliases={"lora_transformer": "lora_unet", "lora_te2": "lora_te3"})
LEGACY_PREFIXES = ("lora_transformer_", "lora_te1_", "lora_te2_")

# OMI: key prefix -> component (convert_flux_lora_key_sets: "transformer", "clip_l", "t5").
OMI_PREFIXES = {"transformer": COMPONENT, "clip_l": "text_encoder", "t5": "text_encoder_2"}
# OMI transformer names that are not BFL's (convert_flux_lora.py __map_transformer): OMI name -> diffusers path.
OMI_RENAMED = {"img_in.proj": "x_embedder"}
# OMI names whose lora_B OneTrainer saves with its two row halves swapped (swap_chunks=True): BFL's
# final_layer.adaLN_modulation.1 computes (shift, scale), diffusers' norm_out.linear (scale, shift).
OMI_SWAPPED = {"final_layer.adaLN_modulation.1": "norm_out.linear"}


class OmiPath(NamedTuple):
    """The diffusers path an OMI transformer name stands for, and whether its lora_B halves are swapped."""

    path: str
    swapped: bool = False


def omi_path(name: str) -> OmiPath | None:
    """The diffusers transformer path of an OMI name (BFL's, a fused layer's part numbered), or None if none.

    Example:
        >>> omi_path("single_blocks.3.linear1.3"), omi_path("double_blocks.0.txt_attn.qkv.2").path
        (OmiPath(path='single_transformer_blocks.3.proj_mlp', swapped=False), 'transformer_blocks.0.attn.add_v_proj')
        >>> omi_path("img_in.proj").path, omi_path("final_layer.adaLN_modulation.1")
        ('x_embedder', OmiPath(path='norm_out.linear', swapped=True))
    """
    if name in OMI_SWAPPED:
        return OmiPath(OMI_SWAPPED[name], True)
    if name in OMI_RENAMED:
        return OmiPath(OMI_RENAMED[name])
    path = FLUX1.from_original(COMPONENT, name)
    if path is not None:
        return OmiPath(path)
    fused, _, index = name.rpartition(".")
    found = FLUX1.fused_parts(fused) if index.isdigit() else None
    return OmiPath(found[1][int(index)]) if found is not None and int(index) < len(found[1]) else None


class OmiKey(NamedTuple):
    """One OMI key: its stem (key without suffix), the canonical module name, file suffix, lora_B swapped."""

    stem: str
    name: str
    suffix: str
    swapped: bool


@lru_cache(maxsize=PARSED_KEYS_KEPT)  # its detector scans every key of a file in another format
def parse_omi(key: str) -> OmiKey | None:
    """The parts of an OMI key, or None when its prefix or suffix is none of OMI's. A transformer name that
    resolves to no Flux.1 module keeps its OMI spelling (``transformer.<name>``) for the checks to list.

    Example:
        >>> parse_omi("clip_l.text_model.encoder.layers.0.self_attn.q_proj.alpha")
        OmiKey(stem='clip_l.text_model.encoder.layers.0.self_attn.q_proj', name='text_encoder.text_model.encoder.layers.0.self_attn.q_proj', suffix='alpha', swapped=False)
    """
    suffix = next((s for s in SUFFIXES if key.endswith("." + s)), None)
    prefix, _, rest = key.partition(".")
    if suffix is None or prefix not in OMI_PREFIXES:
        return None
    stem = key[: -len(suffix) - 1]
    name = stem.partition(".")[2]
    component = OMI_PREFIXES[prefix]
    if component != COMPONENT:
        return OmiKey(stem, f"{component}.{name}", suffix, False)
    found = omi_path(name)
    return OmiKey(stem, f"{component}.{found.path if found else name}", suffix, bool(found and found.swapped))
