"""Planning a batch: where each input's output goes under ``OUT_DIR``.

The source tree is mirrored (below the folder holding every source, :mod:`~lorabridge.batch.discover`):
``SRC/a/b/style.ckpt`` converted ``--to kohya`` into ``OUT`` becomes ``OUT/a/b/style.safetensors``. The name is the input's stem plus the target's usual suffix, derived
from what the target declares (no table to keep in step with the registry): a directory target
(PEFT) gets a folder named after the stem, MindSpore targets a ``.ckpt`` (MindONE's trainer's
container), every other format a ``.safetensors``. Two inputs that would land on one output
(``x.ckpt`` and ``x.safetensors`` side by side), or one inside the other's (``x.ckpt`` and ``x/y.ckpt``
converted to PEFT folders), are not both converted: the first (in discovery order) is, the others fail with
a line naming it. An output that would replace an input of the batch (``-o`` the library's own folder, its
files named one by one) fails, ``--force`` or not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from ..errors import LoraBridgeError, shown
from ..formats.contract import Format
from .discover import Found


@dataclass(frozen=True)
class Job:
    """One file's conversion: ``source`` to ``output``; ``error`` set when it must not run (and why)."""

    source: Path
    output: Path
    nbytes: int
    error: str | None = None


def target_suffix(target: Format) -> str:
    """The suffix of an output in ``target``'s layout ('' for a directory).

    Example:
        >>> from lorabridge.converters.registry import get_format
        >>> target_suffix(get_format("peft")), target_suffix(get_format("mindone-sgm")), target_suffix(get_format("kohya"))
        ('', '.ckpt', '.safetensors')
    """
    if target.writes_directory:
        return ""
    return ".ckpt" if target.framework == "mindspore" else ".safetensors"


def input_bytes(path: Path) -> int:
    """Size of an input: a file's, or everything under an adapter directory (0 when it cannot be read)."""
    try:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def plan_jobs(found: Iterable[Found], out_dir: Path, target: Format, reserved: Mapping[Path, str] | None = None) -> list[Job]:
    """A :class:`Job` per input, its output mirrored under ``out_dir`` with ``target``'s suffix; paths are
    absolute (workers, a Dask cluster's too, need not share this process's working directory). ``reserved``:
    paths under ``out_dir`` the batch keeps for itself (its records, its report) -> what they are.

    Example:
        >>> from lorabridge.converters.registry import get_format
        >>> [job.output for job in plan_jobs([Found(Path("/in/a/x.ckpt"), Path("a/x.ckpt"))], Path("/out"), get_format("neutral"))]
        [PosixPath('/out/a/x.safetensors')]
    """
    found = list(found)
    suffix = target_suffix(target)
    inputs = {item.real for item in found if item.real}
    inputs |= _folders_holding(inputs)
    out = os.path.abspath(out_dir)
    kept = {Path(os.path.abspath(path)): what for path, what in (reserved or {}).items()}
    claimed: dict[Path, Path] = {}  # output -> the input converted to it
    holding: dict[Path, Path] = {}  # a folder of the output tree -> an output inside it
    resolve = resolver()
    jobs = []
    for item in found:
        stem = item.relative.name if os.path.isdir(item.path) else item.relative.stem  # (False for a name too long)
        output = Path(os.path.abspath(out_dir / item.relative.parent / (stem + suffix)))
        error = item.error or _clash(output, claimed, holding, kept, out) or _over_input(output, resolve, inputs)
        if error is None:
            claimed[output] = item.path
            for folder in output.parents:
                if len(folder.parts) <= len(Path(out).parts):
                    break
                holding.setdefault(folder, output)
        # absolute() keeps "..": read through a link as the walk went (abspath would take "a/.." for the folder of a)
        jobs.append(Job(item.path.absolute(), output, input_bytes(item.path), error))
    return jobs


def resolver() -> Callable[[Path], str]:
    """A function giving a path with every symbolic link resolved, its folder's ``realpath`` asked once per folder
    (outputs share a few hundred): a link inside ``OUT_DIR`` (``out/a -> ../lib/b``) leads outputs elsewhere."""
    folders: dict[Path, str] = {}

    def resolve(path: Path) -> str:
        folder = folders.get(path.parent)
        if folder is None:
            folder = folders[path.parent] = os.path.realpath(path.parent)
        return os.path.join(folder, path.name)

    return resolve


def _folders_holding(paths: Iterable[str]) -> set[str]:
    """Every folder above each of ``paths`` (strings, absolute): walked up only until a folder already seen, so a
    library's 100,000 files in a few hundred folders cost one step each."""
    folders: set[str] = set()
    for path in paths:
        folder = os.path.dirname(path)
        while folder not in folders:
            folders.add(folder)
            parent = os.path.dirname(folder)
            if parent == folder:
                break
            folder = parent
    return folders


def _clash(output: Path, claimed: dict[Path, Path], holding: dict[Path, Path], kept: Mapping[Path, str],
           out: str) -> str | None:
    """Why ``output`` cannot be written beside the outputs ``claimed`` so far (a folder of theirs in ``holding``),
    over what the batch keeps for itself (``kept``), or outside ``out``; None when it can."""
    if not os.fspath(output).startswith(out.rstrip(os.sep) + os.sep):
        return f"its output {os.fspath(output)} would not be inside the output directory {out}"
    if output in claimed:
        return f"{os.fspath(claimed[output])} is converted to the same output {os.fspath(output)}"
    if output in holding:
        inside = holding[output]
        return (f"{os.fspath(claimed[inside])} is converted to {os.fspath(inside)}, inside this file's output "
                f"{os.fspath(output)}")
    for folder in output.parents:
        if folder in claimed:
            return (f"{os.fspath(claimed[folder])} is converted to {os.fspath(folder)}, which this file's output "
                    f"{os.fspath(output)} would be inside")
    for path, what in kept.items():
        if path == output or output in path.parents or path in output.parents:
            return f"its output {os.fspath(output)} would take the place of {what} ({os.fspath(path)}); rename the input"
    return None


def _over_input(output: Path, resolve: Callable[[Path], str], inputs: set[str]) -> str | None:
    """Why ``output`` must not be written: resolved, it is one of the batch's ``inputs`` (real paths, with the
    folders they are in) or holds one."""
    if resolve(output) in inputs:
        return (f"its output {os.fspath(output)} is an input of this batch or holds one, which a batch never replaces; "
                "choose another -o")
    return None


def check_out_dir(out_dir: Path, jobs: Sequence[Job]) -> None:
    """Refuse an ``out_dir`` that is, or lies inside, an input adapter folder (PEFT): the batch would write its
    outputs, records and report into an input, whose sha256 (over its files) would then change on every run.

    Example:
        >>> check_out_dir(Path("/out"), [Job(Path("/in/x.ckpt"), Path("/out/x.safetensors"), 1)])   # not inside
    """
    real = Path(os.path.realpath(out_dir))
    inside = {real, *real.parents}
    for job in jobs:  # a stat per input; an adapter folder's path resolved, as symbolic links may name either
        if job.error is None and os.path.isdir(job.source) and Path(os.path.realpath(job.source)) in inside:
            raise LoraBridgeError(f"the output directory is inside the input adapter folder {shown(job.source)}; "
                                  "choose another -o", out_dir)
