"""Finding a batch's inputs: files, directories (walked recursively) and glob patterns.

What counts as an input:

* a path named on the command line is always an input, whatever its name: if it is not a LoRA
  file, its conversion fails with the detector's reason (exactly as ``lorabridge convert`` says it);
* inside a directory (or among a glob's matches) only files with a LoRA container suffix
  (:data:`LORA_SUFFIXES`) and PEFT adapter directories are inputs. A library folder also holds
  previews, READMEs and JSON sidecars: those are not LoRAs and are left alone, not reported. A
  ``.safetensors`` there that is not a LoRA (a base model, a VAE) is reported as failed, with why;
* names starting with ``.`` (lorabridge's temporaries, the batch state, hidden folders) and the
  output directory itself are never walked, so a rerun into ``OUT_DIR`` inside the source tree
  does not pick up its own outputs.

Each input keeps its path relative to the directory (or glob base) it was found under, which
:mod:`~lorabridge.batch.plan` mirrors under ``OUT_DIR``.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..converters.registry import get_format

LORA_SUFFIXES = frozenset({".safetensors", ".ckpt", ".bin", ".pt", ".pth"})


@dataclass(frozen=True)
class Found:
    """One input: ``path`` to read, ``relative`` where it sits below the argument it was found under."""

    path: Path
    relative: Path
    error: str | None = None  # set when the argument itself named nothing (a glob matching no file)


def is_adapter_directory(path: Path) -> bool:
    """Whether directory ``path`` is one PEFT adapter input (a folder with adapter_config.json, or one per component).

    Example:
        >>> is_adapter_directory(Path("/"))
        False
    """
    return get_format("peft").detect(path)


def find_inputs(sources: Sequence[str | os.PathLike], exclude: Iterable[Path] = ()) -> list[Found]:
    """The inputs named by ``sources`` (files, directories, globs), each once, in a stable order.

    ``exclude``: directories never walked (the output directory).

    Example:
        >>> find_inputs(["/no/such/*.safetensors"])[0].error
        'no file matches this pattern'
    """
    skipped = {os.path.realpath(p) for p in exclude}
    seen: set[str] = set()
    found: list[Found] = []
    for source in sources:
        for item in _expand(os.fspath(source), skipped):
            key = os.path.realpath(item.path)
            if item.error or key not in seen:
                seen.add(key)
                found.append(item)
    return found


def _expand(source: str, skipped: set[str]) -> Iterator[Found]:
    path = Path(source)
    if os.path.lexists(path) or not glob.has_magic(source):
        if path.is_dir() and not is_adapter_directory(path):
            yield from _walk(path, path, skipped)
        else:  # named explicitly: always an input (a missing one fails with "no such file or directory")
            yield Found(path, Path(path.name))
        return
    base = _glob_base(source)
    matches = sorted(glob.glob(source, recursive=True))
    if not matches:
        yield Found(path, Path(path.name), "no file matches this pattern")
    for match in map(Path, matches):
        if match.is_dir() and not is_adapter_directory(match):
            yield from _walk(match, base, skipped)
        elif _candidate(match):
            yield Found(match, match.relative_to(base))


def _glob_base(pattern: str) -> Path:
    """The directory a glob pattern starts from: its leading parts without wildcards."""
    parts = Path(pattern).parts
    fixed = parts[:next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))]
    return Path(*fixed) if fixed else Path(".")


def _candidate(path: Path) -> bool:
    """Inside a directory or a glob: a file with a LoRA suffix, or a PEFT adapter directory."""
    if path.name.startswith("."):
        return False
    return path.suffix.lower() in LORA_SUFFIXES if path.is_file() else path.is_dir() and is_adapter_directory(path)


def _walk(directory: Path, base: Path, skipped: set[str]) -> Iterator[Found]:
    """Depth-first, sorted by name; adapter directories are one input and are not entered."""
    if os.path.realpath(directory) in skipped:
        return
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:  # reported, not skipped silently
        yield Found(directory, directory.relative_to(base), f"cannot read directory: {exc.strerror or exc}")
        return
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not is_adapter_directory(path):
            yield from _walk(path, base, skipped)
        elif _candidate(path):
            yield Found(path, path.relative_to(base))
