"""Conversions as compositions: detect the input format, read it into a LoraModel, write the target.

Every command (``ms2neutral``, ``neutral2pt``, ``convert``...) is this one
function with the formats fixed. Output safety lives here once: inputs are
never overwritten, outputs are written atomically, existing outputs need ``force``.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import LoraBridgeError, LoraBridgeWarning
from ..formats.contract import Format, WritableFormat, WriteOptions
from ..io.atomic import check_output_path, replacing, while_flushing
from ..io.contents import FileContents, file_contents
from ..io.deferred import beside_writing
from ..io.input_file import check_regular, check_unchanged, held_inputs, map_input, open_regular
from ..io.streaming import in_background, kept_mapped
from ..model import LoraModel, Pending
from .registry import FORMATS, get_format, get_writer, split_options


@dataclass
class ConversionResult:
    model: LoraModel
    source_format: str
    target_format: str
    output: Path
    seconds: float
    warnings: list[str] = field(default_factory=list)  # LoraBridgeWarning messages, for the command to print
    read_back: FileContents | None = None  # the output's contents, read while the disk took its last bytes

    @cached_property
    def written(self) -> FileContents:
        """What the output holds: read back from it while it was flushed to the disk (a single-file output
        fsynced on its own, :func:`~lorabridge.io.atomic.while_flushing`), else when first asked (a batch never asks)."""
        return self.read_back if self.read_back is not None else file_contents(self.output)


class _ReadBack:
    """What each file a writer wrote holds, read back while the disk took its last bytes (for the summary)."""

    def __init__(self) -> None:
        self.contents: list[FileContents | None] = []

    def append_contents(self, temporary: Path) -> None:
        try:
            self.contents.append(file_contents(temporary))
        except (LoraBridgeError, OSError):  # not read here: ConversionResult.written reads the output, and says why not
            self.contents.append(None)

    def only(self) -> FileContents | None:
        """The contents of the one file written; None if the writer wrote several (or none), or reading failed."""
        return self.contents[0] if len(self.contents) == 1 else None


def detect_format(path: str | os.PathLike, candidates: Iterable[str] | None = None) -> Format:
    """The first registered format (of ``candidates``, default all) whose detect() accepts ``path``."""
    path = check_regular(path, directory_ok=True)
    names = list(candidates) if candidates is not None else list(FORMATS)
    for name in names:
        candidate = get_format(name)
        if candidate.detect(path):
            return candidate
    raise LoraBridgeError(f"not a LoRA file in any supported format (tried: {', '.join(names)})", path)


HASH_CHUNK_BYTES = 1 << 20  # read into one reused buffer that stays in the CPU cache while it is hashed


def file_sha256(path: Path) -> str | None:
    """sha256 of a file's bytes (None for a directory input such as a PEFT adapter folder)."""
    return _sha256_of_file(path) if path.is_file() else None


def _sha256_of_file(path: Path, held: mmap.mmap | memoryview | None = None) -> str:
    """sha256 of the file at ``path``, read in pieces; or of ``held``, its bytes as a reader holds them
    (:func:`~lorabridge.io.input_file.map_input`), where they are already in memory or in a map small enough
    to stay mapped (:func:`~lorabridge.io.streaming.kept_mapped`): no read copies them, and the pages the
    hash maps in serve the reader too (a rank-4 .ckpt: hash and record walk 41-42 -> 36-38 ms of CPU)."""
    if held is not None and (not isinstance(held, mmap.mmap) or kept_mapped(memoryview(held))):
        return hashlib.sha256(held).hexdigest()
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(open_regular(path), "rb", buffering=0) as handle:  # a FIFO swapped in meanwhile cannot block it
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def unicode_name(name: str) -> str:
    r"""A file name as text a manifest (JSON in UTF-8) can hold: a name that is not UTF-8 (bytes a Latin-1
    system wrote, which Python holds as lone surrogates) gets U+FFFD for each byte that is not.

    Example:
        >>> unicode_name("lora.ckpt"), unicode_name("caf\udce9.ckpt") == "caf\N{REPLACEMENT CHARACTER}.ckpt"
        ('lora.ckpt', True)
    """
    return os.fsencode(name).decode("utf-8", "replace")


def record_source(model: LoraModel, source: Path, source_format: str, source_sha256: str | Pending | None) -> None:
    """Make ``model.provenance`` describe this conversion, keeping earlier provenance as history.

    ``source_sha256``: see :func:`file_sha256` (None for a directory, or when the target does not store it; a
    :class:`~lorabridge.model.Pending` one while it is being hashed beside the write).
    """
    previous = dict(model.provenance)
    history = previous.pop("history", [])
    if previous:
        history = [*history, previous]
    model.provenance = {"source_format": source_format, "source_file": unicode_name(source.name),
                        "source_sha256": source_sha256, **({"history": history} if history else {})}


def default_output(src: Path, suffix: str) -> Path:
    """``<input stem><suffix>`` beside the input, e.g. ``lora.ckpt`` -> ``lora.safetensors``."""
    name = src.name[: -len(src.suffix)] if src.suffix and src.is_file() else src.name
    return src.with_name(name + suffix)


def check_architecture(model: LoraModel, target: Format, src: Path) -> None:
    """Refuse a LoRA for an architecture the target's naming has no tables for (MindONE's are SDXL's)."""
    if target.architectures is not None and model.architecture not in target.architectures:
        raise LoraBridgeError(f"--to {target.name} names only {', '.join(target.architectures)} layers; "
                              f"this LoRA is for {model.architecture}", src)


def write_model(model: LoraModel, out: Path, target: WritableFormat, write_options: WriteOptions, *, force: bool = False,
                progress: bool = True) -> None:
    """Write ``model`` to ``out`` (already checked by :func:`~lorabridge.io.atomic.check_output_path`) in
    ``target``'s layout, atomically, with a progress bar when stderr is a terminal.

    Example:
        >>> write_model(model, Path("lora.safetensors"), get_format("neutral"), WriteOptions())   # doctest: +SKIP
    """
    bar = None
    if progress and sys.stderr is not None and sys.stderr.isatty():  # tqdm(disable=None) shows nothing otherwise
        from tqdm import tqdm

        bar = tqdm(total=model.nbytes, unit="B", unit_scale=True, desc=f"writing {out.name}", disable=None, leave=False)
    try:
        with replacing(force), beside_writing():  # no replacing without --force; NaN/Inf scan beside the copy
            target.write(model, out, write_options, progress=bar.update if bar else None, force=force)
    finally:
        if bar is not None:
            bar.close()


@held_inputs()  # no input can be truncated under us while we read it (see io/input_file.py)
def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, from_formats: Iterable[str] | None = None,
            force: bool = False, progress: bool = True, check: Callable[[LoraModel, Path], None] | None = None,
            read_back: bool = True, **options: Any) -> ConversionResult:
    """Convert ``src`` (auto-detected among ``from_formats``) to format ``to`` at ``dst``.

    ``check(model, src)``, if given, may refuse the model read before anything is written (``--base``: the fit
    to a base model, :func:`lorabridge.toolbox.check.base_fit`).

    ``read_back``: read what a single-file output holds (``ConversionResult.written``, a command's summary) while the
    disk takes its last bytes (:func:`~lorabridge.io.atomic.while_flushing`), where it costs no wall time; a caller
    that never asks (a batch's worker) passes False, and ``written`` then reads the output only if asked.

    ``options`` are :class:`~lorabridge.formats.contract.ReadOptions` and
    :class:`~lorabridge.formats.contract.WriteOptions` fields (``alpha``, ``skip_unknown``, ``dtype``...);
    each goes to the reader and/or writer that declares it, and one given (not at its default) that
    neither honours is refused before anything is read or written. What the reader and writer warn
    about (:class:`~lorabridge.errors.LoraBridgeWarning`) is collected in ``warnings``, in order.
    A reader's NaN/Inf scan runs in a thread beside the rest, its verdict given before the output is published
    (:mod:`lorabridge.io.deferred`). The source file is hashed (provenance ``source_sha256``) in a thread beside reading, when the
    target declares ``records_source_hash`` (the neutral manifest); for other targets the hash
    would be a pass over the input that nothing keeps, so it is skipped (None).

    Example:
        >>> convert("lora.ckpt", "lora.safetensors", to="neutral")   # doctest: +SKIP
    """
    src, started = Path(src), time.perf_counter()
    contents = _ReadBack()
    target = get_writer(to)
    source = detect_format(src, from_formats)
    read_options, write_options = split_options(options, source, target)
    out = check_output_path(dst, force, inputs=(src,), directory=target.writes_directory)
    # The source's sha256, for a target that records it: hashed in a thread beside reading and writing, and
    # written into the output's header once the data is written (a placeholder until then).
    source_hash = Pending(in_background(_sha256_of_file, src, map_input(src)[1])) if target.records_source_hash and src.is_file() else None
    with warnings.catch_warnings(record=True) as caught, beside_writing():  # the reader's NaN/Inf scan too
        warnings.simplefilter("always", LoraBridgeWarning)
        model = source.read(src, read_options)
        check_architecture(model, target, src)
        if check is not None:
            check(model, src)
        check_unchanged()
        record_source(model, src, source.name, source_hash)
        reading = read_back and not target.writes_directory
        with while_flushing(contents.append_contents) if reading else contextlib.nullcontext():
            write_model(model, out, target, write_options, force=force, progress=progress)
    notices = [str(w.message) for w in caught if issubclass(w.category, LoraBridgeWarning)]
    for other in (w for w in caught if not issubclass(w.category, LoraBridgeWarning)):
        warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    seconds = time.perf_counter() - started
    return ConversionResult(model, source.name, target.name, out, seconds, notices, contents.only())
