"""``pt2neutral``, ``neutral2pt`` and ``convert``: PyTorch-world LoRA files to and from the neutral file.

All three are :func:`~lorabridge.converters.convert` with the formats chosen here: the
PyTorch-world formats are the registered ones whose framework is ``torch`` (diffusers, PEFT,
old diffusers, kohya, LyCORIS...), so a format registered later is detected with no change
here. Before converting, the input is detected once so that a file no format accepts gets a
reason (empty, a MindSpore checkpoint, no tensors, no LoRA keys) instead of a bare refusal.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from ..errors import LoraBridgeError, listed
from ..io.input_file import check_regular
from ..io.safetensors_file import SafetensorsFile
from ..io.torch_file import container_of
from ..model import LoraModel
from . import ConversionResult, convert, default_output
from .registry import FORMATS, all_formats, get_format, get_writer

# What neutral2pt writes, the first being the default, and the default output name per format.
WRITE_FORMATS = ("diffusers", "peft", "kohya", "comfyui", "legacy-diffusers", "lycoris")
OUTPUT_SUFFIXES = {"diffusers": "_diffusers.safetensors", "peft": "_peft", "kohya": "_kohya.safetensors", "comfyui": "_comfyui.safetensors",
                   "legacy-diffusers": "_legacy.safetensors", "lycoris": "_lycoris.safetensors",
                  "neutral": "_neutral.safetensors"}
SHOWN_KEYS = 3


def torch_formats() -> list[str]:
    """The registered PyTorch-world formats, in detection order."""
    return [f.name for f in all_formats() if f.framework == "torch"]


def why_undetected(path: Path, tried: Iterable[str]) -> str:
    """Why none of the ``tried`` formats accepts the file at ``path``, as specifically as can be said cheaply."""
    from ..io.torch_file import read_state_dict, state_dict_keys

    names = list(tried)
    tried = ", ".join(names)
    if path.is_file() and path.stat().st_size == 0:
        return "empty file (0 bytes)"
    if container_of(path) is None and not path.is_dir():
        from ..formats.mindone import container_of as mindspore_container

        if mindspore_container(path):
            return _mindspore_hint(names)
        return f"neither safetensors nor a torch pickle (tried: {tried})"
    found = state_dict_keys(path) if path.is_file() else None
    if found is None and path.is_file():
        try:
            read_state_dict(path)
        except LoraBridgeError as exc:  # the container's own reason: a refused pickle, a broken archive...
            return exc.message
    if found is None:
        return f"not a LoRA file or adapter directory in any of: {tried}"
    keys = found[0]
    if not keys:
        return "holds no tensors"
    return f"none of its {len(keys)} tensor keys is a LoRA key of {tried}: {listed(keys, SHOWN_KEYS, ', ')}"


def _mindspore_hint(tried: list[str]) -> str:
    """Why a MindSpore checkpoint was not read as any of ``tried``, and what reads it: ms2neutral after pt2neutral
    (which tries the PyTorch world's formats), no --from after a ``--from`` that named one of those."""
    readers = [f.name for f in all_formats() if f.framework == "mindspore"]
    if any(name in readers for name in tried):
        return f"a MindSpore checkpoint holding no LoRA that {' or '.join(n for n in tried if n in readers)} reads"
    if len(tried) == 1:
        return f"a MindSpore checkpoint, not {tried[0]}: leave out --from, or name {' or '.join(readers)}"
    return "a MindSpore checkpoint, not a PyTorch-world file: use ms2neutral"


def detect_input(src: Path, candidates: Iterable[str]) -> str:
    """The first of ``candidates`` that accepts ``src``; a one-line error saying why when none does."""
    candidates = list(candidates)
    check_regular(src, directory_ok=True)
    for name in candidates:
        if get_format(name).detect(src):
            return name
    raise LoraBridgeError(why_undetected(src, candidates), src)


def _beside(src: Path, format_name: str) -> Path:
    """The default output: ``<input stem><suffix of the format>`` beside the input."""
    return default_output(src, OUTPUT_SUFFIXES[format_name])


def pt2neutral(src: str | os.PathLike, out: str | os.PathLike | None = None, *, from_format: str | None = None,
               alpha: float | None = None, skip_unknown: bool = False, strict: bool = False,
               force: bool = False, progress: bool = True,
               check: Callable[[LoraModel, Path], None] | None = None) -> ConversionResult:
    """Convert a PyTorch-world LoRA (file or PEFT directory, format auto-detected) to a neutral file.

    ``alpha`` applies to modules whose file stores none (recorded as "user"); without it they get
    alpha = rank (recorded as "assumed"). ``out`` defaults to ``<input stem>_neutral.safetensors``.

    Example:
        >>> pt2neutral("pytorch_lora_weights.safetensors").output   # doctest: +SKIP
        PosixPath('pytorch_lora_weights_neutral.safetensors')
    """
    src = Path(src)
    if get_format("neutral").detect(src):
        raise LoraBridgeError("already a neutral LoRA file (use neutral2pt or convert to go on from it)", src)
    source = detect_input(src, [from_format] if from_format else torch_formats())
    out = Path(out) if out is not None else _beside(src, "neutral")
    return convert(src, out, "neutral", from_formats=[source], force=force, progress=progress, check=check,
                   alpha=alpha, skip_unknown=skip_unknown, strict=strict)


def neutral2pt(src: str | os.PathLike, out: str | os.PathLike | None = None, *, format: str = WRITE_FORMATS[0],
               dtype: str | None = None, bake_to_lora: int | None = None, strict: bool = False,
               force: bool = False, progress: bool = True, verify_hash: bool = False,
               factor_names: str | None = None, check: Callable[[LoraModel, Path], None] | None = None) -> ConversionResult:
    """Convert a neutral file to a PyTorch-world ``format`` (diffusers, peft, kohya, comfyui, legacy-diffusers, lycoris).

    ``dtype`` (fp32/fp16/bf16) casts the tensors; ``bake_to_lora`` turns LoHa/LoKr modules into
    plain LoRA of that rank for formats that hold only LoRA; ``strict`` refuses NaN/Inf;
    ``factor_names`` spells comfyui's pair ``lora_up``/``lora_down`` (default) or ``lora_A``/``lora_B``;
    ``verify_hash`` checks the input's tensor hash first (one extra pass over the data). ``out`` defaults to
    ``<input stem>_<format>.safetensors`` (a directory ``<input stem>_peft`` for peft).

    Example:
        >>> neutral2pt("lora.safetensors", format="peft").output   # doctest: +SKIP
        PosixPath('lora_peft')
    """
    if format in FORMATS and format not in WRITE_FORMATS:
        get_writer(format)  # a read-only format: say so
    if format not in WRITE_FORMATS:
        raise LoraBridgeError(f"unknown PyTorch format {format!r}; choose one of {', '.join(WRITE_FORMATS)}")
    src = check_regular(src)
    if not get_format("neutral").detect(src):
        if container_of(src) == "safetensors":
            SafetensorsFile(src)  # a damaged safetensors file: say what is wrong with it, not only "not neutral"
        raise LoraBridgeError("not a neutral LoRA file (no lorabridge.manifest); "
                              f"`convert --to {format}` takes any supported format", src)
    out = Path(out) if out is not None else _beside(src, format)
    return convert(src, out, format, from_formats=["neutral"], force=force, progress=progress, check=check,
                   dtype=dtype, bake_to_lora=bake_to_lora, strict=strict, verify_hash=verify_hash,
                   factor_names=factor_names)


def convert_any(src: str | os.PathLike, out: str | os.PathLike, *, to: str, from_format: str | None = None,
                force: bool = False, progress: bool = True, **options) -> ConversionResult:
    """Any supported format to any other through the neutral model (input auto-detected unless ``from_format``).

    ``options`` (``alpha``, ``skip_unknown``, ``strict``, ``dtype``, ``bake_to_lora``...) reach the
    reader or writer that honours them; one that neither honours is refused (see :func:`convert`).

    Example:
        >>> convert_any("lora_kohya.safetensors", "lora_peft", to="peft")   # doctest: +SKIP
    """
    get_writer(to)
    src = Path(src)
    source = detect_input(src, [from_format] if from_format else list(FORMATS))
    return convert(src, out, to, from_formats=[source], force=force, progress=progress, **options)
