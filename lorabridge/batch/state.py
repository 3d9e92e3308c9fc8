"""What a batch remembers about its outputs, so a rerun resumes: one small record per output.

The rule (see :func:`decide`), per output:

* no output yet (never converted, or failed: failures leave nothing, outputs are atomic) -> convert;
* the output is the one the batch recorded, from a source with the same sha256 and the same
  settings (``--to``, ``--from``, options) -> skipped, up to date (``--force`` converts it again);
* the output is the batch's own (its record names it and it has not been touched since), but the
  source or the settings changed -> converted again, replacing it: the record proves it is
  derived output, not the user's file;
* the output is the batch's own but now shorter than when it was published, the same inode, and changed no
  later than then (its change time, which no program can set back) -> converted again: a batch syncs its
  outputs to the disk once, at its end (on Dask, each worker its own), and a power cut before that can leave a
  published output short or empty (never with other bytes: file systems grow a file's size on the disk only as
  its data gets there), while a shorter file the user put there (copied over it, or renamed into its place)
  has a later change time or another inode and is foreign;
* an output the batch has no record of (or one changed since the batch wrote it) -> refused
  exactly as ``lorabridge convert`` refuses ("output exists; pass --force to replace it"), except
  a neutral output whose manifest records this source's sha256 (``provenance.source_sha256``,
  written by any lorabridge conversion) with default settings: that one is up to date.

A source is hashed once: its record also keeps the source's inode, size, modification and change times
(:func:`source_stamp`), and while they are the same a rerun takes the recorded sha256 instead of reading the
file again (as ``git status``, ``make`` and ``rsync`` trust them). Any write, truncation or ``touch`` moves the
change time, which no call sets short of moving the system clock, and a file put in its place (even on a reused
inode number) has its own. A source changed less than :data:`RACY_NS` (a minute) before it was hashed gets no
stamp: a second write within the same tick of the file system's clock, or through a writable map before the
kernel wrote the first back, could leave all four the same (``git``'s "racily clean" files); the change time is
the file system's clock and "before it was hashed" the hashing machine's, so clocks more than that apart (a Dask
worker's and its file server's) weaken this guard, and only it. ``--rehash`` hashes every source anyway.

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
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..converters import file_sha256
from ..errors import LoraBridgeError
from ..io.atomic import create_locked, new_temporary
from ..io.input_file import open_regular
from ..io.json_safe import load_json
from ..io.safetensors_file import SafetensorsFile
from ..manifest import MANIFEST_KEY

STATE_DIR = ".lorabridge-batch"
# A source changed less than this before it was hashed is hashed again by the next run. Why a minute, not a clock
# tick: a program writing through a shared writable map moves the file's times only at its first write to a page
# after the page was last written back, and the kernel writes dirty pages back within ~35 s
# (vm.dirty_expire_centisecs 3000 + dirty_writeback_centisecs 500): until then its writes change no time.
RACY_NS = 60_000_000_000
RECORD_BYTES = 1 << 20  # a record is ~400 bytes (its settings hold the conversion options); larger is not one


@dataclass
class Record:
    """What the batch knows about one output."""

    source: str
    source_sha256: str | None
    settings: dict[str, Any]
    status: str  # "converting" (started) or "done" (published; ``stamp`` is the output's then)
    stamp: list[int] | None = None  # :func:`stamp` (records written before the inode and change time: 2 numbers)
    format: str | None = None
    architecture: str | None = None
    source_stamp: list[int] | None = None  # the source's when it was hashed (:func:`source_stamp`), if not racy


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


def source_stamp(path: Path) -> list[int] | None:
    """Inode, size, modification and change time (ns) of a source file; None for a directory (an adapter
    folder: hashed every time) or a file that cannot be stat'ed. The device is left out: one NFS file has
    a different one on each Dask worker, and its inode, which NFS keeps, already tells files apart."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return [info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def settled_stamp(before: list[int] | None, after: list[int] | None, hashed_from_ns: int) -> list[int] | None:
    """The stamp to record for a source stamped ``before`` its hash and ``after`` it, hashing having started
    at ``hashed_from_ns`` (``time.time_ns()``): ``before`` when the file did not change meanwhile and its last
    change is older than :data:`RACY_NS`, else None (the next run hashes it).

    Example:
        >>> settled_stamp([7, 10, 1, 1_000], [7, 10, 1, 1_000], 90_000_000_000)
        [7, 10, 1, 1000]
        >>> settled_stamp([7, 10, 1, 8_500_000_000], [7, 10, 1, 8_500_000_000], 60_000_000_000) is None  # racy
        True
    """
    if before is None or before != after or before[3] >= hashed_from_ns - RACY_NS:
        return None
    return before


def recorded_digest(record: Record | None, now: list[int] | None) -> str | None:
    """The sha256 ``record`` keeps for its source when the source's stamp is still ``now``; else None (hash it).

    Example:
        >>> done = Record("a.ckpt", "ab" * 32, {}, "done", [1, 2], source_stamp=[7, 10, 1, 1_000])
        >>> recorded_digest(done, [7, 10, 1, 1_000]) == "ab" * 32, recorded_digest(done, [7, 10, 1, 2_000])
        (True, None)
    """
    if record is None or record.status != "done" or now is None or record.source_stamp != now:
        return None
    return record.source_sha256


def stamp(path: Path) -> list[int] | None:
    """Size, modification time, inode and change time (ns) of an output (a directory's: its files' sizes summed,
    their latest times, its own inode); None if missing. The first two say whether the output is the one
    recorded (they survive a copy of ``OUT_DIR`` with ``cp -a`` or ``rsync -a``); the last two, whether a shorter
    one was cut short by a power cut (:func:`decide`)."""
    try:
        if path.is_dir():
            files = [f.stat() for f in path.rglob("*") if f.is_file()]
            return [sum(s.st_size for s in files), max((s.st_mtime_ns for s in files), default=0),
                    path.stat().st_ino, max((s.st_ctime_ns for s in files), default=0)]
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns]


def _as_published(recorded: list[int] | None, now: list[int] | None) -> bool:
    """Whether an output stamped ``now`` is the one recorded ``recorded`` (size and modification time)."""
    return recorded == now if recorded is None or now is None else recorded[:2] == now[:2]


def _cut_short(recorded: list[int], now: list[int]) -> bool:
    """Whether an output stamped ``now`` is the one published ``recorded``, shorter as only a power cut leaves it:
    smaller, the same inode, and changed no later than when it was published (a record without them: smaller)."""
    if now[0] >= recorded[0]:
        return False
    return len(recorded) < 4 or (now[2] == recorded[2] and now[3] <= recorded[3])


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
    return (isinstance(record.source, str) and isinstance(record.status, str) and isinstance(record.settings, dict)
            and all(text is None or isinstance(text, str) for text in texts)
            and (_integers(record.stamp, 4) or _integers(record.stamp, 2)) and _integers(record.source_stamp, 4))


def _integers(value: Any, count: int) -> bool:
    """None, or a list of ``count`` ints (not bools, floats or strings a hand-edited record might hold)."""
    return value is None or (isinstance(value, list) and len(value) == count and all(type(n) is int for n in value))


def make_state_dir(out_dir: Path) -> Path:
    """The folder of ``out_dir``'s records, created if missing; a :class:`LoraBridgeError` naming it when it
    cannot be (a file of that name, a read-only or full disk). A batch calls it before any file runs, so such an
    ``OUT_DIR`` fails once, in one line, not every file alike."""
    directory = out_dir / STATE_DIR
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's words for "exists and is not a directory"
        raise LoraBridgeError("the batch keeps its records here, and this is not a directory", directory) from None
    except OSError as exc:
        raise LoraBridgeError(f"cannot keep the batch's records: {exc.strerror or exc}", directory) from None
    return directory


def write_record(out_dir: Path, output: Path, record: Record) -> None:
    """Replace ``output``'s record atomically (a temporary in the state folder, then a rename); a
    :class:`LoraBridgeError` naming the record when it cannot be written (a full disk fails that file only)."""
    path = record_path(out_dir, output)
    make_state_dir(out_dir)
    temporary = new_temporary(path)  # named and locked as outputs' are: one a killed worker left is removed later
    try:
        with open(create_locked(temporary), "w", encoding="utf-8") as handle:
            json.dump(asdict(record), handle)
        os.replace(temporary, path)
    except BaseException as exc:  # a stop signal too, even the instant the file was created
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise LoraBridgeError(f"cannot write the batch's record: {exc.strerror or exc}", path) from None
        raise


CONVERT, UP_TO_DATE, REDO, FOREIGN = "convert", "up to date", "redo", "foreign"


def decide(output: Path, record: Record | None, sha256: str | None, settings: dict[str, Any],
           trust_manifest: bool) -> tuple[str, Record | None]:
    """What to do with ``output`` (:data:`CONVERT`, :data:`UP_TO_DATE`, :data:`REDO` or :data:`FOREIGN`), whose
    record (:func:`read_record`) is ``record``, and the record that says so; the rule is the module docstring's.
    ``trust_manifest``: the target is neutral and the run gives no option, so a neutral output's recorded
    source sha256 alone says whether it is up to date."""
    if not os.path.lexists(output):
        return CONVERT, None
    now = stamp(output)
    if record is not None and record.status == "done" and record.stamp and now and _cut_short(record.stamp, now):
        return REDO, record  # ours, and shorter than published: a power cut before the batch's closing sync
    if record is None or (record.status == "done" and not _as_published(record.stamp, now)):
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
