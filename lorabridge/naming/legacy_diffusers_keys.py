"""The old diffusers LoRA key spelling (before the PEFT backend, diffusers < 0.24): ``down`` (= A) and ``up`` (= B).

Three spellings: attention processors
(``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight``, what the
seed's ``convert_lora_ms2pt.py`` wrote), ``LoRACompatibleLinear``/``Conv`` layers (``unet.<layer>.lora.down.weight``)
and patched text-encoder layers (``text_encoder.<layer>.lora_linear_layer.down.weight``). The legacy-diffusers
format writes it; the diffusers format reads it too and writes it for some text encoders.
"""

from __future__ import annotations

from ..architectures import registered_components
from ..model import LoraModule

FACTORS = {"down.weight": "lora_A.weight", "up.weight": "lora_B.weight"}
FACTOR_SUFFIXES = {role: suffix for suffix, role in FACTORS.items()}
# Attention-processor LoRA layer (after ".processor.") -> the layer it adapts, per tower.
PROCESSOR_LAYERS = {
    "unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
    "text": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"},
}
# Wrapped-layer spelling per tower: "<layer>.<wrapper>.down.weight".
WRAPPERS = {"unet": "lora", "text": "lora_linear_layer"}
ATTENTION_LAYERS = {layer: processor for processor, layer in PROCESSOR_LAYERS["unet"].items()}


def _tower(component: str) -> str:
    return "text" if component.startswith("text_encoder") else "unet"


def parse_key(key: str) -> tuple[str | None, str, str] | None:
    """(component or None when unprefixed, module path, neutral role) of an old diffusers key, or None.

    Example:
        >>> parse_key("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight")
        ('unet', 'mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0', 'lora_B.weight')
    """
    found = next(((suffix, role) for suffix, role in FACTORS.items() if key.endswith("." + suffix)), None)
    if found is None:
        return None
    suffix, role = found
    stem = key[: -len(suffix) - 1]
    first, _, rest = stem.partition(".")
    component, stem = (first, rest) if first in registered_components() else (None, stem)
    head, _, last = stem.rpartition(".")
    tower = _tower(component or ("text_encoder" if stem.startswith("text_model.") else "unet"))
    if last in WRAPPERS.values() and head:
        return component, head, role
    if last in PROCESSOR_LAYERS[tower] and head:
        return component, f"{head.removesuffix('.processor')}.{PROCESSOR_LAYERS[tower][last]}", role
    return None


def spell(module: LoraModule, role: str) -> str:
    """The old diffusers key of one factor: attention processors for UNet attention projections
    (as the seed wrote), ``.lora.`` for other UNet layers, ``.lora_linear_layer.`` for text encoders.

    Example:
        >>> spell(LoraModule("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "lora", {}, 4.0), "lora_A.weight")
        'unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight'
    """
    tower, suffix = _tower(module.component), FACTOR_SUFFIXES[role]
    if tower == "unet":
        for layer, processor in ATTENTION_LAYERS.items():
            attention = module.name.removesuffix("." + layer)
            if attention != module.name and attention.rsplit(".", 1)[-1].startswith("attn"):
                return f"{attention}.processor.{processor}.{suffix}"
    return f"{module.name}.{WRAPPERS[tower]}.{suffix}"
