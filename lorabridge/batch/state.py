"""What a batch remembers about its outputs, so a rerun resumes: one small record per output.

The rule (see :func:`decide`), per output:

* no output yet (never converted, or failed: failures leave nothing, outputs are atomic) -> convert;
* the output is the one the batch recorded, from a source with the same sha256 and the same
  settings (``--to``, ``--from``, options) -> skipped, up to date (``--force`` converts it again);
* the output is the batch's own (its record names it and it has not been touched since), but the
  source or the settings changed -> converted again, replacing it: the record proves it is
  derived output, not the user's file;
* the output is the batch's own but now shorter than when it was published -> converted again: a
  batch on one machine syncs its outputs to the disk once, at its end, and a power cut before that
  can leave a published output short or empty (never with other bytes: file systems grow a file's
  size on the disk only as its data gets there);
* an output the batch has no record of (or one changed since the batch wrote it) -> refused
  exactly as ``lorabridge convert`` refuses ("output exists; pass --force to replace it"), except
  a neutral output whose manifest records this source's sha256 (``provenance.source_sha256``,
  written by any lorabridge conversion) with default settings: that one is up to date.

Records live in ``OUT_DIR/.lorabridge-batch/``, one JSON file per output named by a hash of its
path, each written whole to a temporary and renamed into place. Two batch runs on one ``OUT_DIR``
therefore never corrupt the state: each record is replaced atomically, the last writer wins, and
both writers derived the output from what they recorded. A record is written as "converting"
before a conversion starts, so an output published by a worker that was killed before it could
record "done" is still known as the batch's own when the file is retried. Records are a cache:
one lost in a power cut only makes the rerun refuse (or, with ``--force``, redo) that output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..converters import file_sha256
from ..errors import LoraBridgeError
from ..io.input_file import open_regular
from ..io.json_safe import load_json
from ..io.safetensors_file import SafetensorsFile
from ..manifest import MANIFEST_KEY

STATE_DIR = ".lorabridge-batch"
RECORD_BYTES = 1 << 20  # a record is ~400 bytes (its settings hold the conversion options); larger is not one


@dataclass
class Record:
    """What the batch knows about one output."""

    source: str
    source_sha256: str | None
    settings: dict[str, Any]
    status: str  # "converting" (started) or "done" (published; ``stamp`` is the output's then)
    stamp: list[int] | None = None
    format: str | None = None
    architecture: str | None = None


def source_digest(path: Path) -> str | None:
    """The sha256 of an input file; of an adapter directory, a sha256 over its files' relative paths and sha256s.

    Example:
        >>> source_digest(Path("/no/such/file")) is None
        True
    """
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(f for f in path.rglob("*") if f.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
        return digest.hexdigest()
    return file_sha256(path) if path.is_file() else None


def stamp(path: Path) -> list[int] | None:
    """Size and modification time of an output (summed / latest over a directory's files); None if missing."""
    try:
        if path.is_dir():
            files = [f.stat() for f in path.rglob("*") if f.is_file()]
            return [sum(s.st_size for s in files), max((s.st_mtime_ns for s in files), default=0)]
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def record_path(out_dir: Path, output: Path) -> Path:
    """Where the record of ``output`` (a path under ``out_dir``) lives."""
    name = os.fsencode(os.path.relpath(output, out_dir))
    return out_dir / STATE_DIR / (hashlib.sha256(name).hexdigest()[:32] + ".json")


def read_record(out_dir: Path, output: Path) -> Record | None:
    """The record of ``output``, or None (none, or unreadable or malformed: treated as none, which makes the
    output foreign, refused without ``--force``).

    Records are the batch's own, but ``OUT_DIR`` may be shared: one is read as untrusted (never more than
    :data:`RECORD_BYTES`, not a FIFO, nesting that exhausts the parser, fields of other types).
    """
    try:
        fd = open_regular(record_path(out_dir, output))
        with open(fd, "rb") as handle:
            raw = handle.read(RECORD_BYTES + 1)
        record = Record(**json.loads(raw)) if len(raw) <= RECORD_BYTES else None
    except (LoraBridgeError, OSError, ValueError, TypeError, RecursionError):
        return None
    return record if record is not None and _well_formed(record) else None


def _well_formed(record: Record) -> bool:
    """Whether every field has its type (:func:`decide` compares them: a string stamp would raise there)."""
    texts = (record.source_sha256, record.format, record.architecture)
    stamp = record.stamp
    return (isinstance(record.source, str) and isinstance(record.status, str) and isinstance(record.settings, dict)
            and all(text is None or isinstance(text, str) for text in texts)
            and (stamp is None or (isinstance(stamp, list) and len(stamp) == 2
                                   and all(type(n) is int for n in stamp))))


def write_record(out_dir: Path, output: Path, record: Record) -> None:
    """Replace ``output``'s record atomically (a temporary in the state folder, then a rename)."""
    path = record_path(out_dir, output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(".tmp", ".", path.parent)
    try:
        with open(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(record), handle)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


CONVERT, UP_TO_DATE, REDO, FOREIGN = "convert", "up to date", "redo", "foreign"


def decide(out_dir: Path, output: Path, sha256: str | None, settings: dict[str, Any],
           trust_manifest: bool) -> tuple[str, Record | None]:
    """What to do with ``output`` (:data:`CONVERT`, :data:`UP_TO_DATE`, :data:`REDO` or :data:`FOREIGN`), and
    its record; the rule is the module docstring's. ``trust_manifest``: the target is neutral and the run
    gives no option, so a neutral output's recorded source sha256 alone says whether it is up to date."""
    if not os.path.lexists(output):
        return CONVERT, None
    record = read_record(out_dir, output)
    now = stamp(output)
    if record is not None and record.status == "done" and record.stamp and now and now[0] < record.stamp[0]:
        return REDO, record  # ours, and shorter than published: a power cut before the batch's closing sync
    if record is None or (record.status == "done" and record.stamp != now):
        neutral = neutral_source(output) if trust_manifest and sha256 is not None else None
        if neutral is not None and neutral[0] == sha256:
            return UP_TO_DATE, Record(os.fspath(output), sha256, settings, "done", now, neutral[2], neutral[1])
        return FOREIGN, record
    if record.status == "done" and record.source_sha256 == sha256 and record.settings == settings:
        return UP_TO_DATE, record
    return REDO, record


def neutral_source(output: Path) -> tuple[str, str | None, str | None] | None:
    """(provenance source_sha256, architecture, source_format) from a neutral output's manifest; None when it
    is not one. The architecture and source format are the manifest's claims (checked by the caller)."""
    if not output.is_file() or output.suffix != ".safetensors":
        return None
    try:
        manifest = load_json(SafetensorsFile(output).metadata[MANIFEST_KEY], "manifest", output)
        sha256 = manifest["provenance"]["source_sha256"]
        source_format = manifest["provenance"].get("source_format")
        architecture = manifest.get("base_model", {}).get("architecture")
    except (LoraBridgeError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(sha256, str):
        return None
    return (sha256, architecture if isinstance(architecture, str) else None,
            source_format if isinstance(source_format, str) else None)
