"""Old diffusers LoRA files (before the PEFT backend, diffusers < 0.24), incl. the seed's ``*_pt.ckpt``.

Three spellings, all with ``down`` (= A) and ``up`` (= B) factors and no alpha:

- attention processors, what the seed's ``convert_lora_ms2pt.py`` wrote (a ``torch.save``'d
  dict) and ``unet.load_attn_procs`` loads:
  ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight``;
- ``LoRACompatibleLinear``/``Conv`` layers: ``unet.<layer>.lora.down.weight``;
- patched text-encoder layers: ``text_encoder.<layer>.lora_linear_layer.down.weight``.

diffusers still converts all three on load (``load_lora_weights``, ``load_attn_procs``).
The keys carry no alpha. diffusers' training scripts still save this spelling (through
``convert_state_dict_to_diffusers``) with a ``lora_adapter_metadata`` that has it, so reading
takes alpha from there when present, else ``--alpha``, else alpha = rank. Writing folds
alpha / rank into ``up`` where they differ (with a warning), as old loaders know no alpha.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LoraBridgeError
from ..io.torch_file import state_dict_keys, write_state_dict
from ..model import LoraModel, fold_refusal, folded_b
from ..naming.legacy_diffusers_keys import parse_key, spell
from .checks import warn, writable_lora
from .contract import (FOREIGN_READ, PLAIN_LORA_WRITE, READ_DEFAULTS, WRITE_DEFAULTS, DeclaredFormat, Progress,
                       ReadOptions, WriteOptions)
from .peft_modules import read_diffusers_file
from .training import FILE_METADATA_KEYS, lost_training, training_metadata

def detect(path: str | os.PathLike) -> bool:
    """A state-dict file with at least one old-diffusers LoRA key."""
    found = state_dict_keys(path)
    return found is not None and any(parse_key(k) for k in found[0])


def read(path: str | os.PathLike, options: ReadOptions = READ_DEFAULTS) -> LoraModel:
    """Read an old diffusers LoRA (safetensors, or a torch pickle such as the seed's ``*_pt.ckpt``).

    The diffusers reader does it: it takes both spellings, since diffusers' own files mix them.

    Example:
        >>> model = read("sdxl_lora_pt.ckpt")   # doctest: +SKIP
    """
    return read_diffusers_file(path, options)


def write(model: LoraModel, path: str | os.PathLike, options: WriteOptions = WRITE_DEFAULTS, *,
          progress: Progress | None = None, force: bool = False) -> None:
    """Write old diffusers keys: a torch pickle for .ckpt/.bin/.pt/.pth outputs (as the seed), else safetensors.

    The training facts go into the safetensors metadata (the reader takes them back); a torch pickle
    has no place for them, which is warned about.

    Example:
        >>> write(model, "sdxl_lora_pt.ckpt")   # doctest: +SKIP
    """
    model = writable_lora(model, path, options, target=FORMAT.name, kinds=FORMAT.kinds, dora_axes=FORMAT.dora_axes)
    folded = [m for m in model.modules.values() if m.alpha != m.rank]
    refusal = fold_refusal(folded, "folding alpha/rank into the up factor")
    if refusal:
        raise LoraBridgeError(f"{refusal}; legacy-diffusers files store no alpha: write a format that does (diffusers, "
                              "kohya)", path)
    if folded:
        warn(f"{path}: legacy-diffusers files store no alpha; alpha/rank folded into the up factor of "
             f"{len(folded)} module(s) (values rounded to their dtype)")
    ranks: dict[str, set[int]] = {}
    for m in model.modules.values():
        ranks.setdefault(m.component, set()).add(m.rank)
    mixed = [component for component, found in ranks.items() if len(found) > 1]
    if mixed:
        warn(f"{path}: ranks differ within {', '.join(mixed)}; a file without alpha loads at scale 1 in old "
             "diffusers, but diffusers 0.35 applies one module's rank as alpha to all modules of a component: "
             "use the diffusers format for modern diffusers")
    tensors = {}
    for m in model.modules.values():
        tensors[spell(m, "lora_A.weight")] = m.tensors["lora_A.weight"]
        tensors[spell(m, "lora_B.weight")] = folded_b(m)
    if Path(path).suffix.lower() == ".safetensors":
        metadata = {**training_metadata(model, FILE_METADATA_KEYS), "format": "pt"}
    else:
        metadata = None
        lost = lost_training(model, path, "a torch pickle", "write a .safetensors file to keep them")
        if lost:
            warn(lost)
    write_state_dict(path, tensors, metadata, progress=progress)


FORMAT = DeclaredFormat(
    name="legacy-diffusers", framework="torch",
    description="old diffusers attention processors (*.processor.to_q_lora.down.weight), the seed's *_pt.ckpt",
    detect=detect, read=read, write=write, stores_metadata=True, stores_alpha=False, kinds=("lora",), dora_axes=(),
    read_options=FOREIGN_READ, write_options=PLAIN_LORA_WRITE)
