"""``ms2neutral`` and ``neutral2ms``: MindONE files to and from the neutral file.

Both are :func:`~lorabridge.converters.convert` with the formats fixed (MindONE's namings on one
side, ``neutral`` on the other) plus what the commands print: a short summary of what was
converted and the warnings to heed.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LoraBridgeError, shown
from . import ConversionResult, convert, default_output
from .registry import get_format

# The MindONE formats (naming schemes), the first being what neutral2ms writes by default.
MINDONE_FORMATS = ("mindone-sgm", "mindone-diffusers", "mindone-kohya")
SUFFIXES = {"ckpt": ".ckpt", "safetensors": ".safetensors"}


def _beside(src: Path, suffix: str, tag: str) -> Path:
    """``<stem><suffix>`` beside ``src``, or ``<stem>_<tag><suffix>`` when that would be ``src`` itself."""
    out = default_output(src, suffix)
    return default_output(src, f"_{tag}{suffix}") if out == src else out


def ms2neutral(src: str | os.PathLike, out: str | os.PathLike | None = None, *, alpha: float | None = None,
               skip_unknown: bool = False, force: bool = False, progress: bool = True) -> ConversionResult:
    """Convert a MindONE LoRA (.ckpt or MindSpore safetensors, any MindONE naming) to a neutral file.

    ``out`` defaults to the input's name with ``.safetensors``; ``alpha`` defaults to each
    module's rank (MindONE's default, recorded as assumed).

    Example:
        >>> ms2neutral("sdxl_lora.ckpt").output   # doctest: +SKIP
        PosixPath('sdxl_lora.safetensors')
    """
    src = Path(src)
    if src.is_file() and not any(get_format(name).detect(src) for name in MINDONE_FORMATS):
        from ..formats.mindone import why_not_mindone

        raise LoraBridgeError(why_not_mindone(src), src)
    out = Path(out) if out is not None else _beside(src, ".safetensors", "neutral")
    return convert(src, out, "neutral", from_formats=MINDONE_FORMATS, force=force, progress=progress,
                   alpha=alpha, skip_unknown=skip_unknown)


def neutral2ms(src: str | os.PathLike, out: str | os.PathLike | None = None, *, naming: str = MINDONE_FORMATS[0],
               container: str = "ckpt", crc: bool = False, fold_alpha: bool = True, force: bool = False,
               progress: bool = True, verify_hash: bool = False) -> ConversionResult:
    """Convert a neutral file to a MindONE LoRA in ``naming`` (a MindONE format) and ``container``.

    ``out`` defaults to the input's name with ``.ckpt`` (``_ms.safetensors`` for safetensors);
    ``verify_hash`` checks the input's tensor hash first (one extra pass over the data).

    Example:
        >>> neutral2ms("lora.safetensors", naming="mindone-sgm", crc=True).output   # doctest: +SKIP
        PosixPath('lora.ckpt')
    """
    if naming not in MINDONE_FORMATS:
        raise LoraBridgeError(f"unknown MindONE naming {naming!r}; choose one of {', '.join(MINDONE_FORMATS)}")
    if container not in SUFFIXES:
        raise LoraBridgeError(f"unknown MindSpore container {container!r}; choose one of {', '.join(SUFFIXES)}")
    src = Path(src)
    out = Path(out) if out is not None else _beside(src, SUFFIXES[container], "ms")
    return convert(src, out, naming, from_formats=["neutral"], force=force, progress=progress,
                   container=container, crc=crc, fold_alpha=fold_alpha, verify_hash=verify_hash)


def _per_value(counts: dict) -> str:
    """{"4": 500, "8": 60} -> "4 (500 modules), 8 (60 modules)"."""
    return ", ".join(f"{value} ({n} module{'s' if n != 1 else ''})" for value, n in counts.items()) or "-"


def render_summary(result: ConversionResult) -> str:
    """What the commands print: formats, output (its bytes, tensors and dtypes as written), modules per
    component, rank, alpha, time.

    Example:
        >>> print(render_summary(ms2neutral("lora.ckpt")))   # doctest: +SKIP
        mindone-sgm -> neutral: lora.safetensors (23,257,336 bytes) in 0.21 s
          modules  560: unet 560
          tensors  1120 written: 23,224,320 bytes, F32
          rank     4 (560 modules)
          alpha    4 (560 modules); source: assumed 560
    """
    s, written = result.model.summary(), result.written
    return "\n".join([
        f"{result.source_format} -> {result.target_format}: {shown(result.output)} "
        f"({written.file_bytes:,} bytes) in {result.seconds:.2f} s",
        f"  modules  {s['modules']}: {', '.join(f'{c} {n}' for c, n in s['per_component'].items())}",
        f"  tensors  {written.tensors} written: {written.tensor_bytes:,} bytes, {'/'.join(written.dtypes) or '-'}",
        f"  rank     {_per_value(s['ranks'])}",
        f"  alpha    {_per_value(s['alphas'])}; source: {', '.join(f'{k} {n}' for k, n in s['alpha_sources'].items())}",
    ])
