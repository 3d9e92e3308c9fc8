"""The formats lorabridge reads and writes, as data: name -> where its :class:`Format` object lives.

Some are read-only (``Format.writable`` False: XLabs' and OneTrainer's Flux layouts, which other tools
load from the formats lorabridge writes); :func:`get_writer` refuses them as a target with one line.

Each format module declares its object (:class:`~lorabridge.formats.contract.Format`: ``detect``,
``read``, ``write`` and what it declares about itself); modules are imported only when a
conversion needs them, so the CLI stays fast. Which options a format honours is part of its
declaration (``read_options``/``write_options``, names of :class:`ReadOptions`/:class:`WriteOptions`
fields): a conversion refuses an option that neither its reader nor its writer honours instead of
dropping it silently, and hands each side only the options it declares.
"""

from __future__ import annotations

import importlib
from typing import Any, cast

from ..errors import LoraBridgeError
from ..formats.contract import (OPTION_DEFAULTS, READ_OPTIONS, WRITE_OPTIONS, Format, ReadOptions, WritableFormat,
                                WriteOptions)

# Detection tries formats in this order; the first whose detect() says yes wins.
FORMATS: dict[str, str] = {
    "neutral": "lorabridge.formats.neutral:FORMAT",
    "mindone-sgm": "lorabridge.formats.mindone:MINDONE_SGM",
    "mindone-diffusers": "lorabridge.formats.mindone:MINDONE_DIFFUSERS",
    "mindone-kohya": "lorabridge.formats.mindone:MINDONE_KOHYA",
    "comfyui": "lorabridge.formats.comfyui:FORMAT",  # its lora_A spelling, before PEFT's bare lora_A keys
    "diffusers": "lorabridge.formats.diffusers:FORMAT",
    "peft": "lorabridge.formats.peft:FORMAT",
    # Read-only; before legacy-diffusers (XLabs' ``processor.qkv_lora.down.weight`` ends like its old spelling)
    # and kohya (whose detector takes any ``lora_`` underscored keys, OneTrainer's ``lora_transformer_`` too).
    "xlabs": "lorabridge.formats.xlabs:FORMAT",
    "onetrainer": "lorabridge.formats.onetrainer:FORMAT",
    "legacy-diffusers": "lorabridge.formats.legacy_diffusers:FORMAT",
    "kohya": "lorabridge.formats.kohya:FORMAT",
    "lycoris": "lorabridge.formats.lycoris:FORMAT",
}


def get_format(name: str) -> Format:
    """The registered format ``name`` (its module imported now).

    Example:
        >>> get_format("peft").writes_directory
        True
    """
    try:
        module, attribute = FORMATS[name].split(":")
    except KeyError:
        raise LoraBridgeError(f"unknown format {name!r}; known: {', '.join(FORMATS)}") from None
    return getattr(importlib.import_module(module), attribute)


def get_writer(name: str) -> WritableFormat:
    """The registered format ``name`` as a conversion target: a read-only one is refused with one line
    naming the formats of its world that lorabridge writes.

    Example:
        >>> get_writer("kohya").name
        'kohya'
        >>> get_writer("xlabs")
        Traceback (most recent call last):
        lorabridge.errors.LoraBridgeError: xlabs is read-only: lorabridge reads xlabs files but does not write them; write comfyui, diffusers, peft, legacy-diffusers, kohya or lycoris instead
    """
    target = get_format(name)
    if not target.writable:
        others = [f.name for f in all_formats() if f.writable and f.framework == target.framework]
        raise LoraBridgeError(f"{name} is read-only: lorabridge reads {name} files but does not write them; "
                              f"write {', '.join(others[:-1])} or {others[-1]} instead")
    return cast(WritableFormat, target)


def all_formats() -> list[Format]:
    """Every registered format, in detection order."""
    return [get_format(name) for name in FORMATS]


def option_flag(name: str) -> str:
    """How the command line spells a non-default value of option ``name`` (``--dtype``, ``--no-fold-alpha``)."""
    flag = name.replace("_", "-")
    return f"--no-{flag}" if OPTION_DEFAULTS[name] is True else f"--{flag}"


def split_options(options: dict[str, Any], source: Format, target: Format) -> tuple[ReadOptions, WriteOptions]:
    """The options given (non-default), split into what ``source``'s reader and ``target``'s writer honour.

    Raises TypeError for a name that is no option, and LoraBridgeError for an option neither side
    honours ("--dtype is not supported when writing neutral"), never dropping it silently.

    Example:
        >>> read, write = split_options({"alpha": 8.0, "dtype": None}, get_format("kohya"), get_format("neutral"))
        >>> read.alpha, write == WriteOptions()
        (8.0, True)
        >>> split_options({"dtype": "fp16"}, get_format("kohya"), get_format("neutral"))
        Traceback (most recent call last):
        lorabridge.errors.LoraBridgeError: --dtype is not supported when writing neutral (it is when writing comfyui, diffusers, peft, legacy-diffusers, kohya, lycoris)
    """
    unknown = sorted(set(options) - OPTION_DEFAULTS.keys())
    if unknown:
        raise TypeError(f"unknown conversion option(s): {', '.join(unknown)}")
    given = {name: value for name, value in options.items() if value != OPTION_DEFAULTS[name]}
    for name in given:
        if name not in source.read_options | target.write_options:
            raise LoraBridgeError(_unsupported(name, source, target))
    return (ReadOptions(**{name: value for name, value in given.items() if name in source.read_options}),
            WriteOptions(**{name: value for name, value in given.items() if name in target.write_options}))


def _unsupported(name: str, source: Format, target: Format) -> str:
    """Why option ``name`` does nothing here, and which formats it does something for."""
    sides = [(f"reading {source.name}", "reading", "read_options")] if name in READ_OPTIONS else []
    sides += [(f"writing {target.name}", "writing", "write_options")] if name in WRITE_OPTIONS else []
    where = " or ".join(side for side, _, _ in sides)
    formats = all_formats()
    takers = [f"when {verb} {', '.join(f.name for f in formats if name in getattr(f, attr))}"
              for _, verb, attr in sides if any(name in getattr(f, attr) for f in formats)]
    return f"{option_flag(name)} is not supported when {where}" + (f" (it is {'; '.join(takers)})" if takers else "")
