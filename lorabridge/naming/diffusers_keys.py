"""diffusers' LoRA key grammar: PEFT keys (:mod:`.peft_keys`) behind a pipeline-component prefix,
or the old spelling (:mod:`.legacy_diffusers_keys`) diffusers' own training scripts still save.

``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``; ``text_encoder.``/
``text_encoder_2.`` for the CLIP towers, ``transformer.`` for SD3 and Flux (read so that the checks can
say which model such a file belongs to).
"""

from __future__ import annotations

from . import legacy_diffusers_keys
from .peft_keys import Parsed, parse_key

# First key segments diffusers pipelines use for their LoRA-bearing models.
PIPELINE_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior",
                       "decoder", "controlnet")


def split_component(module_key: str) -> tuple[str, str] | None:
    """(component, module path) of a prefixed PEFT module key, or None.

    Example:
        >>> split_component("text_encoder_2.text_model.encoder.layers.0.mlp.fc1")
        ('text_encoder_2', 'text_model.encoder.layers.0.mlp.fc1')
    """
    component, _, rest = module_key.partition(".")
    return (component, rest) if component in PIPELINE_COMPONENTS and rest else None


def parse(key: str) -> Parsed | None:
    """(component, module path, role, adapter) of a key in PEFT spelling behind a component prefix,
    or else in an old diffusers spelling: diffusers' training scripts save the attention layers the
    old way and every other layer the PEFT way, in one file.

    Example:
        >>> parse("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight")
        ('text_encoder_2', 'text_model.encoder.layers.0.mlp.fc1', 'lora_A.weight', None)
    """
    found = parse_key(key)
    placed = split_component(found[0]) if found else None
    if found and placed:
        return (*placed, found[1], found[2])
    old = legacy_diffusers_keys.parse_key(key)
    return (*old, None) if old else None
