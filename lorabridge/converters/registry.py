"""The formats lorabridge reads and writes, as data: name -> where its reader/writer pair lives.

Modules are imported only when a conversion needs them, so the CLI stays fast.
Each format module defines ``detect(path) -> bool`` (cheap: header or key names
only), ``read(path, **options) -> LoraModel`` and ``write(model, path, **options)``.
``options`` a format does not use are ignored, so one call shape serves all.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class FormatInfo:
    name: str
    module: str  # dotted path of the module holding detect/read/write, or "module:attribute" for an object that does
    framework: str  # "neutral", "mindspore" or "torch": which world uses it
    description: str

    def load(self) -> ModuleType:
        module, _, attribute = self.module.partition(":")
        loaded = importlib.import_module(module)
        return getattr(loaded, attribute) if attribute else loaded


# Detection tries formats in this order; the first whose detect() says yes wins.
FORMATS: dict[str, FormatInfo] = {f.name: f for f in [
    FormatInfo("neutral", "lorabridge.formats.neutral", "neutral", "lorabridge neutral LoRA v1 (.safetensors + manifest)"),
    FormatInfo("mindone-sgm", "lorabridge.formats.mindone:MINDONE_SGM", "mindspore", "MindONE SDXL trainer LoRA: SGM names (model.diffusion_model.*, conditioner.embedders.*), .ckpt or MindSpore safetensors"),
    FormatInfo("mindone-diffusers", "lorabridge.formats.mindone:MINDONE_DIFFUSERS", "mindspore", "mindone.diffusers LoRA: PEFT names (unet.*.lora_A.weight) in a .ckpt or MindSpore safetensors"),
    FormatInfo("mindone-kohya", "lorabridge.formats.mindone:MINDONE_KOHYA", "mindspore", "MindONE's kohya port: lora_unet_*/lora_te1_*/lora_te2_* with .alpha, .ckpt or MindSpore safetensors"),
    FormatInfo("diffusers", "lorabridge.formats.diffusers", "torch", "diffusers/PEFT LoRA: unet.*/text_encoder*.lora_A.weight, alpha in lora_adapter_metadata (.safetensors)"),
    FormatInfo("peft", "lorabridge.formats.peft", "torch", "PEFT adapter directory per component (adapter_config.json + adapter_model.safetensors), or a base_model.model.* state dict"),
    FormatInfo("legacy-diffusers", "lorabridge.formats.legacy_diffusers", "torch", "old diffusers attention processors (*.processor.to_q_lora.down.weight), the seed's *_pt.ckpt"),
    FormatInfo("kohya", "lorabridge.formats.kohya", "torch", "kohya sd-scripts/A1111/ComfyUI: lora_unet_<SGM or diffusers path>.lora_down/lora_up/.alpha, lora_te1_/lora_te2_"),
    FormatInfo("lycoris", "lorabridge.formats.lycoris", "torch", "LyCORIS (lycoris-lora): LoRA/LoCon, LoHa, LoKr, DoRA; lora_unet_/lora_te1_/lora_te2_/lycoris_ + diffusers path"),
]}


def get_format(name: str) -> FormatInfo:
    from ..errors import LoraBridgeError

    try:
        return FORMATS[name]
    except KeyError:
        raise LoraBridgeError(f"unknown format {name!r}; known: {', '.join(FORMATS)}") from None
