"""How toolbox commands read their inputs and write their output: the converter's own paths.

An input in any supported format is detected and read as ``convert`` does
(:func:`lorabridge.converters.torch.detect_input`, then the format's reader); the output is
checked (never an input, never an existing file without ``force``) before any work and written
atomically by :func:`lorabridge.converters.write_model`, neutral by default.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..converters import check_architecture, file_sha256, record_source, write_model
from ..converters.registry import FORMATS, get_format, get_writer
from ..converters.torch import detect_input
from ..errors import LoraBridgeWarning
from ..formats.contract import READ_DEFAULTS, WRITE_DEFAULTS
from ..io.atomic import check_output_path
from ..io.input_file import check_unchanged
from ..model import LoraModel


def read_lora(path: str | os.PathLike) -> tuple[LoraModel, list[str]]:
    """The LoRA at ``path`` (any supported format, detected), its provenance recorded, and what its reader warned about.

    Example:
        >>> model, notes = read_lora("lora_kohya.safetensors")   # doctest: +SKIP
    """
    src = Path(path)
    source = detect_input(src, list(FORMATS))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LoraBridgeWarning)
        model = get_format(source).read(src, READ_DEFAULTS)
    check_unchanged()
    record_source(model, src, source, file_sha256(src))
    return model, [str(w.message) for w in caught if issubclass(w.category, LoraBridgeWarning)]


def check_output(out: str | os.PathLike, to: str, inputs: tuple[Path, ...], force: bool) -> Path:
    """``out`` checked as the output in format ``to`` (not an input, not existing unless ``force``), before any work."""
    return check_output_path(out, force, inputs=inputs, directory=get_writer(to).writes_directory)


def write_lora(model: LoraModel, out: Path, to: str, source: Path, force: bool) -> list[str]:
    """Write ``model`` to ``out`` in format ``to``, atomically; returns what the writer warned about.

    ``source`` is the input named in a refusal (an architecture ``to`` has no names for).

    Example:
        >>> write_lora(model, Path("small.safetensors"), "neutral", Path("big.safetensors"), force=False)   # doctest: +SKIP
    """
    target = get_writer(to)
    check_architecture(model, target, source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LoraBridgeWarning)
        check_unchanged()
        write_model(model, out, target, WRITE_DEFAULTS, force=force)
    return [str(w.message) for w in caught if issubclass(w.category, LoraBridgeWarning)]
