"""The formats lorabridge reads and writes, as data: name -> where its reader/writer pair lives.

Modules are imported only when a conversion needs them, so the CLI stays fast.
Each format module defines ``detect(path) -> bool`` (cheap: header or key names
only), ``read(path, **options) -> LoraModel`` and ``write(model, path, **options)``.
Which options a format honours is data here (``read_options``/``write_options``, names of
:class:`ReadOptions`/:class:`WriteOptions` fields): a conversion refuses an option that
neither its reader nor its writer honours instead of dropping it silently, and hands each
side only the options it declares.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class ReadOptions:
    """Options a reader may honour, with their defaults (a default value counts as not given)."""

    alpha: float | None = None  # alpha of modules whose file stores none (recorded as "user")
    skip_unknown: bool = False  # drop tensors/modules that name no SDXL layer, with a warning
    strict: bool = False  # refuse NaN/Inf instead of warning
    verify_hash: bool = False  # check a neutral file's tensor_sha256 first


@dataclass(frozen=True)
class WriteOptions:
    """Options a writer may honour, with their defaults (a default value counts as not given)."""

    dtype: str | None = None  # fp32/fp16/bf16: cast the tensors
    bake_to_lora: int | None = None  # LoHa/LoKr -> plain LoRA of this rank
    strict: bool = False  # refuse NaN/Inf instead of warning
    container: str | None = None  # MindSpore container: ckpt or safetensors
    crc: bool = False  # MindSpore's checksum
    fold_alpha: bool = True  # fold alpha/rank into lora_B where the file cannot store alpha


OPTION_DEFAULTS: dict[str, Any] = {f.name: f.default for cls in (ReadOptions, WriteOptions) for f in fields(cls)}
READ_OPTIONS = frozenset(f.name for f in fields(ReadOptions))
WRITE_OPTIONS = frozenset(f.name for f in fields(WriteOptions))


@dataclass(frozen=True)
class FormatInfo:
    name: str
    module: str  # dotted path of the module holding detect/read/write, or "module:attribute" for an object that does
    framework: str  # "neutral", "mindspore" or "torch": which world uses it
    description: str
    read_options: frozenset[str] = frozenset()  # the ReadOptions its read() honours
    write_options: frozenset[str] = frozenset()  # the WriteOptions its write() honours

    def load(self) -> ModuleType:
        module, _, attribute = self.module.partition(":")
        loaded = importlib.import_module(module)
        return getattr(loaded, attribute) if attribute else loaded


# What each reader/writer honours (tests/test_format_options.py checks these against behaviour).
_FOREIGN_READ = frozenset({"alpha", "skip_unknown", "strict"})  # every non-neutral reader: alpha, SDXL fit, NaN check
_PLAIN_LORA_WRITE = frozenset({"dtype", "bake_to_lora", "strict"})  # writers that hold only LoRA (LoHa/LoKr baked)
_MINDONE_WRITE = frozenset({"container", "crc", "bake_to_lora", "strict"})  # tensors keep their dtype

# Detection tries formats in this order; the first whose detect() says yes wins.
FORMATS: dict[str, FormatInfo] = {f.name: f for f in [
    FormatInfo("neutral", "lorabridge.formats.neutral", "neutral", "lorabridge neutral LoRA v1 (.safetensors + manifest)",
               frozenset({"verify_hash"}), frozenset()),
    FormatInfo("mindone-sgm", "lorabridge.formats.mindone:MINDONE_SGM", "mindspore", "MindONE SDXL trainer LoRA: SGM names (model.diffusion_model.*, conditioner.embedders.*), .ckpt or MindSpore safetensors",
               _FOREIGN_READ, _MINDONE_WRITE | {"fold_alpha"}),
    FormatInfo("mindone-diffusers", "lorabridge.formats.mindone:MINDONE_DIFFUSERS", "mindspore", "mindone.diffusers LoRA: PEFT names (unet.*.lora_A.weight) in a .ckpt or MindSpore safetensors",
               _FOREIGN_READ, _MINDONE_WRITE | {"fold_alpha"}),
    FormatInfo("mindone-kohya", "lorabridge.formats.mindone:MINDONE_KOHYA", "mindspore", "MindONE's kohya port: lora_unet_*/lora_te1_*/lora_te2_* with .alpha, .ckpt or MindSpore safetensors",
               _FOREIGN_READ, _MINDONE_WRITE),  # stores .alpha: nothing to fold
    FormatInfo("diffusers", "lorabridge.formats.diffusers", "torch", "diffusers/PEFT LoRA: unet.*/text_encoder*.lora_A.weight, alpha in lora_adapter_metadata (.safetensors)",
               _FOREIGN_READ, _PLAIN_LORA_WRITE),
    FormatInfo("peft", "lorabridge.formats.peft", "torch", "PEFT adapter directory per component (adapter_config.json + adapter_model.safetensors), or a base_model.model.* state dict",
               _FOREIGN_READ, _PLAIN_LORA_WRITE),
    FormatInfo("legacy-diffusers", "lorabridge.formats.legacy_diffusers", "torch", "old diffusers attention processors (*.processor.to_q_lora.down.weight), the seed's *_pt.ckpt",
               _FOREIGN_READ, _PLAIN_LORA_WRITE),
    FormatInfo("kohya", "lorabridge.formats.kohya", "torch", "kohya sd-scripts/A1111/ComfyUI: lora_unet_<SGM or diffusers path>.lora_down/lora_up/.alpha, lora_te1_/lora_te2_",
               _FOREIGN_READ, _PLAIN_LORA_WRITE),
    FormatInfo("lycoris", "lorabridge.formats.lycoris", "torch", "LyCORIS (lycoris-lora): LoRA/LoCon, LoHa, LoKr, DoRA; lora_unet_/lora_te1_/lora_te2_/lycoris_ + diffusers path",
               _FOREIGN_READ, frozenset({"dtype", "strict"})),  # every kind fits: nothing to bake
]}


def get_format(name: str) -> FormatInfo:
    from ..errors import LoraBridgeError

    try:
        return FORMATS[name]
    except KeyError:
        raise LoraBridgeError(f"unknown format {name!r}; known: {', '.join(FORMATS)}") from None


def option_flag(name: str) -> str:
    """How the command line spells a non-default value of option ``name`` (``--dtype``, ``--no-fold-alpha``)."""
    flag = name.replace("_", "-")
    return f"--no-{flag}" if OPTION_DEFAULTS[name] is True else f"--{flag}"


def split_options(options: dict[str, Any], source: FormatInfo, target: FormatInfo) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options given (non-default), split into what ``source``'s reader and ``target``'s writer honour.

    Raises TypeError for a name that is no option, and LoraBridgeError for an option neither side
    honours ("--dtype is not supported when writing neutral"), never dropping it silently.

    Example:
        >>> split_options({"alpha": 8.0, "dtype": None}, FORMATS["kohya"], FORMATS["neutral"])
        ({'alpha': 8.0}, {})
        >>> split_options({"dtype": "fp16"}, FORMATS["kohya"], FORMATS["neutral"])
        Traceback (most recent call last):
        lorabridge.errors.LoraBridgeError: --dtype is not supported when writing neutral (it is when writing diffusers, peft, legacy-diffusers, kohya, lycoris)
    """
    from ..errors import LoraBridgeError

    unknown = sorted(set(options) - OPTION_DEFAULTS.keys())
    if unknown:
        raise TypeError(f"unknown conversion option(s): {', '.join(unknown)}")
    given = {name: value for name, value in options.items() if value != OPTION_DEFAULTS[name]}
    for name in given:
        if name not in source.read_options | target.write_options:
            raise LoraBridgeError(_unsupported(name, source, target))
    return ({name: value for name, value in given.items() if name in source.read_options},
            {name: value for name, value in given.items() if name in target.write_options})


def _unsupported(name: str, source: FormatInfo, target: FormatInfo) -> str:
    """Why option ``name`` does nothing here, and which formats it does something for."""
    sides = [(f"reading {source.name}", "reading", "read_options")] if name in READ_OPTIONS else []
    sides += [(f"writing {target.name}", "writing", "write_options")] if name in WRITE_OPTIONS else []
    where = " or ".join(side for side, _, _ in sides)
    takers = [f"when {verb} {', '.join(f.name for f in FORMATS.values() if name in getattr(f, attr))}"
              for _, verb, attr in sides if any(name in getattr(f, attr) for f in FORMATS.values())]
    return f"{option_flag(name)} is not supported when {where}" + (f" (it is {'; '.join(takers)})" if takers else "")
