"""diffusers LoRA files: PEFT keys behind a pipeline-component prefix, alpha in ``lora_adapter_metadata``.

What ``StableDiffusionXLPipeline.save_lora_weights`` writes and ``load_lora_weights``
reads: ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``
(``text_encoder.``/``text_encoder_2.`` for the CLIP towers), ``format`` = ``pt``, and,
since diffusers 0.34 when asked, ``lora_adapter_metadata``: one LoraConfig per component
with prefixed fields (``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``...). Without
that metadata the file has no alpha, and diffusers assumes alpha = rank.

diffusers' own training scripts save attention layers in the old spelling (``...to_q.lora.down.weight``,
``...q_proj.lora_linear_layer.down.weight``) and other layers in PEFT spelling, in one file: the
reader takes both. The writer uses PEFT spelling, except for a text encoder whose LoRA has no
attention projection: diffusers 0.35 cannot load that in PEFT spelling, so it gets the old one.

Files for other pipelines use the same grammar with other components (``transformer.`` for
SD3 and Flux); they are read so that the checks can say which model they belong to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import LoraBridgeError
from ..io.safetensors_file import write_safetensors
from ..io.torch_file import TORCH_SUFFIXES, state_dict_keys
from ..model import LoraModel
from ..naming import legacy_diffusers_keys
from ..naming.diffusers_keys import split_component
from ..naming.peft_config import adapter_metadata
from ..naming.peft_keys import parse_key
from ..tensor import Tensor
from .checks import writable_lora
from .contract import (FOREIGN_READ, PLAIN_LORA_WRITE, READ_DEFAULTS, WRITE_DEFAULTS, DeclaredFormat, Progress,
                       ReadOptions, WriteOptions)
from .peft_modules import peft_tensors, read_diffusers_file
from .training import FILE_METADATA_KEYS, training_metadata

# diffusers (0.35) round-trips a text encoder's keys through its old spelling on load and cannot tell
# the spelling of a state dict that has none of these layers: such components are written the old way.
# T5's (Flux.1's text_encoder_2, which FluxPipeline loads no LoRA into) are counted too: with them it keeps PEFT spelling.
TEXT_ATTENTION = (".q_proj", ".k_proj", ".v_proj", ".out_proj",
                  ".SelfAttention.q", ".SelfAttention.k", ".SelfAttention.v", ".SelfAttention.o")


def _old_spelling_components(model: LoraModel) -> set[str]:
    """Text encoders whose LoRA has no attention projection (only MLP layers, say)."""
    text = {m.component for m in model.modules.values() if m.component.startswith("text_encoder")}
    return text - {m.component for m in model.modules.values() if m.name.endswith(TEXT_ATTENTION)}


def _keyed(model: LoraModel) -> dict[str, Tensor]:
    """Tensors under diffusers keys: PEFT spelling, old spelling for the components above."""
    old = _old_spelling_components(model)
    tensors = {}
    for m in model.modules.values():
        for role, tensor in peft_tensors(m).items():
            spelled_old = m.component in old and role in legacy_diffusers_keys.FACTOR_SUFFIXES
            tensors[legacy_diffusers_keys.spell(m, role) if spelled_old else f"{m.name}.{role}"] = tensor
    return tensors


def detect(path: str | os.PathLike) -> bool:
    """A state-dict file (not a neutral one) whose LoRA keys start with a pipeline component."""
    found = state_dict_keys(path)
    if found is None or "lorabridge.manifest" in found[1]:
        return False
    for key in found[0]:
        parsed = parse_key(key)
        if parsed and split_component(parsed[0]):
            return True
    return False


def read(path: str | os.PathLike, options: ReadOptions = READ_DEFAULTS) -> LoraModel:
    """Read a diffusers LoRA (safetensors, or a torch pickle read with weights_only=True), in either
    key spelling (see :func:`~lorabridge.naming.diffusers_keys.parse`).

    Alpha per module from ``lora_adapter_metadata`` (``alpha_pattern``, ``use_rslora`` honoured),
    else ``options.alpha`` (recorded as given by the user), else the rank (recorded as assumed).

    Example:
        >>> model = read("pytorch_lora_weights.safetensors", ReadOptions(alpha=8))   # doctest: +SKIP
    """
    return read_diffusers_file(path, options)


def write(model: LoraModel, path: str | os.PathLike, options: WriteOptions = WRITE_DEFAULTS, *,
          progress: Progress | None = None, force: bool = False) -> None:
    """Write a diffusers LoRA safetensors file that ``load_lora_weights`` loads with every alpha right.

    Example:
        >>> write(model, "pytorch_lora_weights.safetensors", WriteOptions(dtype="fp16"))   # doctest: +SKIP
    """
    if Path(path).suffix.lower() in TORCH_SUFFIXES:
        raise LoraBridgeError("the diffusers format keeps alpha in safetensors metadata; name the output .safetensors", path)
    model = writable_lora(model, path, options, target=FORMAT.name, kinds=FORMAT.kinds, dora_axes=FORMAT.dora_axes)
    tensors = _keyed(model)
    metadata: dict[str, Any] = {**training_metadata(model, FILE_METADATA_KEYS), "format": "pt",
                                "lora_adapter_metadata": json.dumps(adapter_metadata(model), separators=(",", ":"))}
    write_safetensors(path, tensors, metadata, progress=progress)


FORMAT = DeclaredFormat(
    name="diffusers", framework="torch",
    description="diffusers/PEFT LoRA: unet.*/text_encoder*.lora_A.weight, alpha in lora_adapter_metadata (.safetensors)",
    detect=detect, read=read, write=write, stores_metadata=True, stores_alpha=True, kinds=("lora",), dora_axes=("out",),
    read_options=FOREIGN_READ, write_options=PLAIN_LORA_WRITE)
