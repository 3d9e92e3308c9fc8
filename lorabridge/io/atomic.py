"""Crash-safe output: write to a temporary file beside the target, fsync, then publish it by a rename.

A conversion killed part-way leaves either no output or the previous complete
one, never a partial file; an existing output is replaced only with ``force``.
Without ``force`` the publishing rename itself refuses to replace anything
(``renameat2(RENAME_NOREPLACE)``, else a hard link): of two runs writing the
same new output at once, one gets "output exists" instead of both succeeding.
Temporaries are named ``.<output name>.lorabridge-<pid>.<random>.partial`` and
locked while written, so a later run can tell a killed run's leftovers from a
live writer's and remove them.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import fcntl
import io
import math
import os
import queue
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

from ..errors import LoraBridgeError
from ..stopping import process_exists
from . import deferred, drop_behind
from .input_file import check_unchanged, reading_own_output
from .scoped import set_within
from .streaming import LARGEST_FOLIO_BYTES
from .zero_copy import SourceFile, copy_range

EXISTS = "output exists; pass --force to replace it"


def output_target(path: str | os.PathLike) -> Path:
    """``path`` checked as a name an output can be published under: it must end in a name (not '.', '..'
    or '/', which no rename can replace) short enough for the file system."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise LoraBridgeError("output must end in a file or directory name, not '.', '..' or '/'", path)
    limit = _name_max(path.parent)
    if len(os.fsencode(path.name)) > limit:
        raise LoraBridgeError(f"file name too long (over {limit} bytes)", path)
    return path


def check_output_path(out: str | os.PathLike, force: bool, inputs: tuple = (), directory: bool = False) -> Path:
    """Refuse to overwrite an input, or an existing output unless ``force``.

    ``directory``: the output is a directory (a PEFT adapter folder) that ``force`` may replace
    as a whole, so it must not contain an input either. A dangling symlink at ``out`` counts as existing.
    """
    out = output_target(out)
    for src in inputs:
        if src is not None:
            _refuse_overlap(out, Path(src), directory)
    if os.path.lexists(out) and not force:
        raise LoraBridgeError(EXISTS, out)
    if out.is_dir() and not directory:
        raise LoraBridgeError("output is a directory", out)
    if not out.parent.is_dir():
        raise LoraBridgeError("is not a directory" if out.parent.exists() else "output directory does not exist",
                              out.parent)
    return out


def _refuse_overlap(out: Path, src: Path, directory: bool) -> None:
    """The output must not be the input (by path, through symlinks, or as a hard link), nor lie inside an
    input directory (a PEFT adapter folder), nor, when it is a directory replaced whole, contain the input."""
    target, source = Path(os.path.realpath(out)), Path(os.path.realpath(src))
    if target == source or (out.exists() and src.exists() and os.path.samefile(out, src)):
        raise LoraBridgeError("output would overwrite the input; choose another -o", out)
    if src.is_dir() and target.is_relative_to(source):
        raise LoraBridgeError("output would be written inside the input directory; choose another -o", out)
    if directory and source.is_relative_to(target):
        raise LoraBridgeError("output directory contains the input; choose another -o", out)


# Whether publishing may replace an existing output. The command decides (its --force) once, around the
# whole write; every writer beneath, however deep, publishes by that rule without passing it along.
# Library calls outside any command replace, as safetensors.save_file and torch.save do.
_may_replace: contextvars.ContextVar[bool] = contextvars.ContextVar("lorabridge_may_replace", default=True)


def replacing(allowed: bool) -> contextlib.AbstractContextManager[None]:
    """Within this block, atomic writes replace an existing output only if ``allowed`` (a command's --force);
    otherwise the publishing rename fails with "output exists", even against a run racing this one.

    Example:
        >>> with replacing(force):   # doctest: +SKIP
        ...     write_safetensors("out.safetensors", tensors)
    """
    return set_within(_may_replace, allowed)


def _libc_function(name: str, *argtypes: Any) -> Callable | None:
    """The C library's function ``name`` (errno kept, ``int`` result), or None where it lacks it: the Linux
    system calls Python's ``os`` does not offer (renameat2, sync_file_range, syncfs)."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


_syncfs = _libc_function("syncfs", ctypes.c_int)


# Whether each atomic write puts its file on the disk (fsync, then its directory) before publishing it. A batch of
# many outputs on one machine syncs the file system once at its end instead (:func:`syncing_at_the_end`).
_sync_each: contextvars.ContextVar[bool] = contextvars.ContextVar("lorabridge_sync_each", default=True)


def syncing_at_the_end() -> contextlib.AbstractContextManager[None]:
    """Within this block, atomic writes publish without an fsync each; the caller calls
    :func:`sync_file_system` once the last is written.

    Each output is still published whole by a rename (a killed process never leaves a partial one), but
    until that sync a power cut can leave a published output short or empty: a batch's records know each
    output's size, so a rerun converts such a file again (:mod:`lorabridge.batch.state`). One sync of a
    hundred files costs a fraction of a hundred fsyncs, each of which waits for the disk on its own.

    Example:
        >>> with syncing_at_the_end():   # doctest: +SKIP
        ...     for src in sources: convert(src, ...)
        >>> sync_file_system(out_dir)   # doctest: +SKIP
    """
    return set_within(_sync_each, False)


# Work to do with each fsynced output while the disk takes the last of it (:func:`while_flushing`).
_while_flushing: contextvars.ContextVar[Callable[[Path], None] | None] = contextvars.ContextVar(
    "lorabridge_while_flushing", default=None)


def while_flushing(task: Callable[[Path], None]) -> contextlib.AbstractContextManager[None]:
    """Within this block, each atomic write that fsyncs its output calls ``task(temporary)`` once every byte of
    it is written, before waiting for the disk to take the last of them; the output is published after.

    Why: a command's summary reads its output back (headers, a ``.ckpt``'s records: 0.05-0.15 s for a rank-128
    SDXL LoRA), and the wait for the disk at the end of a write (0.3-1 s) leaves the CPU idle: read there, the
    summary costs no wall time. ``task`` must only read the file. A batch's writes (:func:`syncing_at_the_end`)
    do not wait for the disk one by one, so they never call it.

    Example:
        >>> with while_flushing(lambda temporary: print(temporary.stat().st_size)):   # doctest: +SKIP
        ...     write_safetensors("out.safetensors", tensors)
    """
    return set_within(_while_flushing, task)


def sync_file_system(directory: str | os.PathLike) -> None:
    """Put everything written to the file system holding ``directory`` on the disk (Linux syncfs(2), else sync)."""
    if _syncfs is None:
        os.sync()
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:  # (a Dask worker that does not see OUT_DIR where this machine does)
        raise LoraBridgeError(f"cannot put the outputs on the disk: {exc.strerror or exc}", directory) from None
    try:
        if _syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise LoraBridgeError(f"cannot put the outputs on the disk: {os.strerror(code)}", directory)
    finally:
        os.close(fd)


# Every this many bytes, the temporary file's new pages are handed to the disk by a thread while the
# writer goes on (a kernel copy is cut into pieces, :func:`_piece_at`, handed over as they add up to this), so
# the disk works beside the copy into the page cache and the fsync at the end waits for the last piece only.
WRITEBACK_BYTES = 32 * 1024 * 1024




def _piece_at(position: int) -> int:
    """How long a kernel copy to the output at ``position`` may be: up to the next boundary of a large folio
    (:data:`~.streaming.LARGEST_FOLIO_BYTES`) of the output, so that no copy ends inside a folio it did not fill
    from its start, unless its data ends there.

    Why, measured on the rank-128 file (bare copies with the flusher behind, as our writer does them): one copy at
    a safetensors output's offsets, in 32 MiB pieces ending mid-folio 1.87 s, on 2 MiB boundaries 1.69 s (six runs
    each); the 828 copies of a conversion to kohya (tensors reordered) replayed as they were, 2.07 s, cut at 2 MiB
    boundaries, 1.86 s (medians of eight). A piece ending mid-folio leaves the next copy finishing a folio that
    the flusher may be writing out.

    Example:
        >>> _piece_at(0) == LARGEST_FOLIO_BYTES, _piece_at(324_232) == LARGEST_FOLIO_BYTES - 324_232
        (True, True)
    """
    return LARGEST_FOLIO_BYTES - position % LARGEST_FOLIO_BYTES


_sync_file_range = _libc_function("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_RANGE_WAIT_BEFORE, _RANGE_WRITE, _RANGE_WAIT_AFTER = 1, 2, 4  # sync_file_range's flags
_RANGE_ON_DISK = _RANGE_WAIT_BEFORE | _RANGE_WRITE | _RANGE_WAIT_AFTER  # the range is on the disk on return
_data_sync = getattr(os, "fdatasync", os.fsync)  # macOS and Windows have no fdatasync


def _write_out(fd: int, start: int, count: int, durable: bool) -> None:
    """Put ``count`` bytes of ``fd``'s file at ``start`` on the disk while its writer goes on.

    ``durable`` (the output is fsynced before it is published): fdatasync, all the file's data so far. The
    slow part of an fsync here is the disk's own cache flush, which sync_file_range does not ask for: with
    it, the closing fsync still waited about 1 s for the whole file; flushed piece by piece, the waiting
    runs beside the copy (interleaved medians of 8-10 runs: neutral2pt of the rank-128 file 2.21 -> 1.96 s,
    ms2neutral 3.06 -> 2.47 s). Otherwise (a batch syncs the file system once, at its end) the range is
    only handed to the device (sync_file_range), with no flush per file; nothing where that is absent.

    The pages stay in the page cache: what a command does next with its output (the summary reads a
    ``.ckpt``'s every record back) would otherwise wait for the disk once per page it touches (measured:
    neutral2ms on the rank-128 file spent 0.7 s reading its output's 1,669 record heads back from the disk).
    """
    if durable:
        _data_sync(fd)
    elif _sync_file_range is not None and _sync_file_range(fd, start, count, _RANGE_ON_DISK) != 0:
        code = ctypes.get_errno()
        if code not in _UNSUPPORTED:
            raise OSError(code, os.strerror(code))


def _start_write_out(fd: int) -> None:
    """Start writing ``fd``'s file to the disk, waiting for none of it (sync_file_range WRITE; nothing where absent)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _RANGE_WRITE)  # the whole file; an error shows at the closing sync


class _Flusher:
    """A thread that writes ranges of one file out to the disk, in order, while its writer fills the next.

    A write to the page cache (or a kernel copy into it) is CPU work; putting those pages on the disk
    is the device's: in one thread they take turns, in two they overlap (``cp && sync`` takes turns).
    Ranges handed over while the thread was busy go out together. The thread is started with the first
    range; :meth:`finish` waits for the last and raises what failed. ``durable``: see :func:`_write_out`.
    """

    def __init__(self, fd: int, durable: bool):
        self._fd, self._durable = fd, durable
        self._ranges: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def write_out(self, start: int, count: int) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lorabridge-writeback", daemon=True)
            self._thread.start()
        self._ranges.put((start, count))

    def finish(self) -> None:
        """Wait until every range handed over is written out (before the file is fsynced or closed)."""
        if self._thread is not None:
            self._ranges.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        finished = False
        while not finished and (item := self._ranges.get()) is not None:
            start, end = item[0], item[0] + item[1]
            while not self._ranges.empty():  # handed over meanwhile: one range (they follow each other)
                more = self._ranges.get()
                if more is None:
                    finished = True
                    break
                end = more[0] + more[1]
            if self._error is None:
                try:
                    _write_out(self._fd, start, end - start, self._durable)
                except OSError as exc:  # reported by finish(), in the writer's thread
                    self._error = exc


def _iov_max() -> int:
    try:
        return max(16, os.sysconf("SC_IOV_MAX"))
    except (AttributeError, ValueError, OSError):
        return 16  # POSIX's minimum


_IOV_MAX = _iov_max()  # buffers one writev takes (1,024 on Linux)


class _EarlyWriteback(io.BufferedWriter):
    """A buffered file whose written pages go to the disk (:class:`_Flusher`) as it grows.
    A failed write (disk full, file size limit) is reported as one line about ``target``."""

    _started = 0  # the bytes before this offset were handed to the flusher

    def __init__(self, raw: io.FileIO, target: Path, durable: bool):
        super().__init__(raw)
        self.target = target
        self._flusher = _Flusher(raw.fileno(), durable)

    def write(self, data) -> int:
        with _reported(self.target, "cannot write the output"):
            written = super().write(data)
            self._write_back()
        return written

    def copy_from(self, source: SourceFile, spans: Sequence[tuple[int, int]]) -> bool:
        """Append the bytes of ``spans`` ((offset, count) pairs of ``source``) back to back, copied in the
        kernel (see :mod:`.zero_copy`) in pieces (:func:`_piece_at`) the flusher writes out behind; False, with nothing written,
        where these two files allow no kernel copy.

        Many spans in one call: the file position is asked for and set once, not around every copy (a
        MindSpore checkpoint's 1,424 records of a rank-128 LoRA, apart between record headers, cost 4,400
        ``lseek`` calls, each a wait for the GIL on the way back, ~0.14 s of a 2.6 s conversion)."""
        with _reported(self.target, "cannot write the output"):
            self.flush()
            start = position = self.tell()
            for offset, count in spans:
                done = 0
                while done < count:
                    piece = min(count - done, _piece_at(position))
                    if not copy_range(source, offset + done, self.fileno(), position, piece):
                        if position > start:  # the first piece decides; a later refusal would be a kernel changing its mind
                            raise OSError(errno.EIO, "the kernel copy stopped part-way")
                        self.seek(start)
                        return False
                    done, position = done + piece, position + piece
                    self._write_back(position)
            self.seek(position)
        return True

    def write_many(self, buffers: list) -> None:
        """Append ``buffers`` back to back in as few system calls as the system allows (``pwritev``, at most
        ``IOV_MAX`` buffers per call)."""
        if not hasattr(os, "pwritev"):
            for buffer in buffers:
                self.write(buffer)
            return
        with _reported(self.target, "cannot write the output"):
            self.flush()
            position = self.tell()
            views = [memoryview(buffer).cast("B") for buffer in buffers]
            first = 0  # views before this one are written
            while first < len(views):
                written = os.pwritev(self.fileno(), views[first:first + _IOV_MAX], position)
                if written == 0:
                    raise OSError(errno.EIO, "the system wrote nothing")
                position += written
                while first < len(views) and written >= len(views[first]):  # skip what was written; the rest goes again
                    written -= len(views[first])
                    first += 1
                if written:
                    views[first] = views[first][written:]
            self.seek(position)
            self._write_back()

    def _write_back(self, position: int | None = None) -> None:
        """Hand the bytes before ``position`` to the flusher once they make a piece (``position``: the file
        position unless given; a copy in the kernel writes past the position without moving it)."""
        position = self.tell() if position is None else position
        if position - self._started >= WRITEBACK_BYTES:
            self.flush()
            self._flusher.write_out(self._started, position - self._started)
            self._started = position

    def finish_writeback(self) -> None:
        """Flush, and wait for the ranges handed to the disk so far (their errors are this file's)."""
        with _reported(self.target, "cannot write the output"):
            self.flush()
            self._flusher.finish()

    def close(self) -> None:
        try:
            with contextlib.suppress(OSError):  # closing after a failure: what failed was reported already
                self._flusher.finish()
        finally:
            super().close()


@contextlib.contextmanager
def _reported(path: Path, doing: str) -> Iterator[None]:
    """Turn an OSError into the one-line error users see (``doing``: what failed, e.g. 'cannot create the output')."""
    try:
        yield
    except FileExistsError:
        raise LoraBridgeError(EXISTS, path) from None
    except OSError as exc:
        raise LoraBridgeError(f"{doing}: {exc.strerror or exc}", path) from None


def current_umask() -> int:
    """The process's umask (read by setting it and back: POSIX has no call that only reads it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file in the target directory; on success fsync and publish it at ``path``
    (replacing an existing file only as :func:`replacing` allows).

    Large outputs are handed to the disk while they are written, so the final fsync is short. Nothing is
    published when an input held by :func:`~lorabridge.io.input_file.held_inputs` changed meanwhile.

    Example:
        >>> with atomic_write("out.bin") as f:   # doctest: +SKIP
        ...     f.write(b"data")
    """
    path = output_target(path)
    replace, sync = _may_replace.get(), _sync_each.get()
    if os.path.lexists(path) and not replace:
        raise LoraBridgeError(EXISTS, path)
    drop_behind.output_starts()
    tmp = new_temporary(path)
    lock, handle = -1, None
    try:
        with _reported(path, "cannot create the output"):
            fd = create_locked(tmp)
        lock = os.dup(fd)  # the lock lasts while either is open: past the write handle's close, up to the publish
        handle = _EarlyWriteback(io.FileIO(fd, "wb"), path, durable=sync)
        os.fchmod(fd, 0o666 & ~current_umask())  # created 0600, as mkstemp does; outputs get the usual permissions
        yield handle
        deferred.settle()  # checks that ran beside the write (NaN/Inf scan) may still refuse it (--strict)
        check_unchanged()  # bytes copied from an input (zero_copy) were read while this output was written
        task = _while_flushing.get()
        if sync and task is not None:
            with _reported(path, "cannot write the output"):
                handle.flush()
            with reading_own_output():
                task(Path(tmp))
        handle.finish_writeback()
        with _reported(path, "cannot write the output"):
            if sync:
                os.fsync(handle.fileno())
            else:  # the disk starts on it now, beside the next file's work, so the closing sync has less to wait for
                _start_write_out(handle.fileno())
            drop_behind.output_written(handle.fileno(), on_disk=sync)
            handle.close()
            if replace:
                os.replace(tmp, path)
            else:
                _publish_new(Path(tmp), path)
    except BaseException:
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()  # what a failed write left buffered cannot be written either
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        if lock >= 0:
            os.close(lock)
    if sync:
        _sync_directory(path.parent)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Build a directory output in a staging folder beside ``path``, then swap it into place.

    On an error (or a kill) ``path`` keeps its previous content; an existing ``path`` is
    replaced only with ``force``: staging and output trade places in one step
    (``renameat2(RENAME_EXCHANGE)``), then the old content is removed.

    Example:
        >>> with atomic_directory("images", force=True) as staging:   # doctest: +SKIP
        ...     (staging / "000.png").write_bytes(png)
    """
    path = output_target(path)
    if os.path.lexists(path) and not force:
        raise LoraBridgeError(EXISTS, path)
    _remove_stale_temporaries(path.parent)
    with _reported(path, "cannot create the output"):
        staging = Path(tempfile.mkdtemp(_SUFFIX, _temporary_prefix(path), path.parent))
    lock = _hold_lock(os.open(staging, os.O_RDONLY))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700; outputs get the usual permissions
        yield staging
        deferred.settle()
        with _reported(path, "cannot write the output"):
            old: Path | None = None  # what was replaced, to remove
            if force:
                old = _swap_in(staging, path)
            else:
                _publish_new(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    if old is not None:  # what was replaced; if it cannot all go, a later run removes it (a temporary's name)
        with contextlib.suppress(OSError):
            _remove(old)
    if _sync_each.get():
        _sync_directory(path.parent)


# ---------------------------------------------------------------- temporaries: names, locks, stale ones

_SUFFIX = ".partial"
_TEMPORARY = re.compile(r"\..*\.lorabridge-(\d+)\.[a-z0-9_]{8}\.partial", re.DOTALL)
_RANDOM = 8  # characters between prefix and suffix (ours, and mkdtemp's)


def _name_max(directory: Path) -> int:
    """The longest file name (in bytes) the file system holding ``directory`` takes (255 on most)."""
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _temporary_prefix(path: Path) -> str:
    """mkstemp's prefix for a temporary beside ``path``: ``.<name>.lorabridge-<pid>.`` (then come 8 random
    characters and ``.partial``), the output's name shortened as needed so the whole fits the name limit."""
    tag = f".lorabridge-{os.getpid()}."
    room = _name_max(path.parent) - len(_SUFFIX) - _RANDOM - len(tag) - 1
    name = path.name
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return f".{name}{tag}"


def new_temporary(path: Path) -> Path:
    """A fresh name for a temporary beside ``path``, ``.<name>.lorabridge-<pid>.<8 random>.partial``, once the
    temporaries killed runs left there are removed.

    The name is known before the file exists (:func:`create_locked` makes it), so whoever creates it can remove
    it on any exception, even one raised the instant its creation returned: a stop signal that came while
    ``open`` waited on the disk runs its handler right then (:mod:`lorabridge.stopping`), and with ``mkstemp``
    the name was lost with the frame. Ours alone: it holds this process's PID and 32 random bits.

    Example:
        >>> new_temporary(Path("/no/such/dir/report.jsonl")).name.startswith(".report.jsonl.lorabridge-")
        True
    """
    _remove_stale_temporaries(path.parent)
    return path.parent / f"{_temporary_prefix(path)}{secrets.token_hex(_RANDOM // 2)}{_SUFFIX}"


def create_locked(temporary: Path) -> int:
    """Create ``temporary`` (a :func:`new_temporary` name; never an existing file) and lock it: a shared lock,
    held until every descriptor of this open file is closed, which works on any file system and open mode. It
    is the sign, for :func:`_remove_stale_temporaries`, that its writer is alive even where its PID is not
    visible (another container sharing the directory); a temporary whose writer was killed outright is removed
    by the next lorabridge run writing beside it. :func:`atomic_write` writes outputs through one, a batch its
    report."""
    return _hold_lock(os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


def _hold_lock(fd: int) -> int:
    """Lock ``fd``'s file (shared) until every descriptor of its open file is closed (see :func:`create_locked`)."""
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


# A directory holding more entries than this is scanned for stale temporaries at most once a _RESCAN_S by one
# process: before every output, a batch writing 100,000 files into one flat folder would read that folder 100,000
# times (quadratic: ~4 ms a scan at 5,000 entries, measured). Smaller ones are scanned before each output
# (well under a millisecond).
_SMALL_DIRECTORY = 256
_RESCAN_S = 60.0
_large_scanned: dict[str, float] = {}  # large directory -> when this process last scanned it (time.monotonic)


def _remove_stale_temporaries(directory: Path) -> None:
    """Remove the temporaries killed lorabridge runs left in ``directory``: only entries named as ours
    whose writer's PID is no longer alive and that no one holds locked (a live writer always does). A large
    directory this process scanned less than :data:`_RESCAN_S` ago is not scanned again."""
    key, now = os.path.abspath(directory), time.monotonic()
    if now - _large_scanned.get(key, -math.inf) < _RESCAN_S:
        return
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    if len(entries) > _SMALL_DIRECTORY:
        _large_scanned[key] = now
    for entry in entries:
        if not entry.name.endswith(_SUFFIX):  # most entries: outputs, not temporaries
            continue
        match = _TEMPORARY.fullmatch(entry.name)
        if match and not process_exists(int(match[1])):
            with contextlib.suppress(OSError):
                _remove_if_unlocked(Path(entry.path))


def _remove_if_unlocked(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails (BlockingIOError) while a writer holds its lock
        _remove(path)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a file, link or whole directory tree."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _sync_directory(directory: Path) -> None:
    """fsync a directory, so the rename that published an output survives a power cut."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ---------------------------------------------------------------- publishing renames

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
# renameat2 flags a file system does not take (NFS, some FUSE) fail with one of these; hard links
# where a file system has none (FAT, some FUSE) with one of these or EPERM.
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


# Linux's renameat2(2) (glibc 2.28+); None on macOS and old glibc
_renameat2 = _libc_function("renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)


def _rename(src: Path, dst: Path, flags: int) -> bool:
    """renameat2 ``src`` to ``dst`` with ``flags``; False where the system or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), os.fspath(dst))


def _publish_new(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` only if no entry (a dangling symlink included) is there, else FileExistsError.

    One atomic step where the system allows: renameat2(RENAME_NOREPLACE), else for a file a hard link
    (which fails on an existing name) and an unlink. Where neither works (a directory on NFS, files on a
    few FUSE file systems), a check then a rename: rename still fails onto a file or a non-empty directory.
    Returns None: nothing was replaced.
    """
    if _rename(src, dst, _RENAME_NOREPLACE):
        return None
    if not src.is_dir():
        try:
            os.link(src, dst)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED | {errno.EPERM}:
                raise
        else:
            os.unlink(src)
            return None
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", os.fspath(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise FileExistsError(errno.EEXIST, "exists", os.fspath(dst)) from None
        raise
    return None


def _swap_in(staging: Path, path: Path) -> Path | None:
    """Put directory ``staging`` at ``path``, replacing whatever is there; return where the replaced
    entry now is (to delete), or None. With RENAME_EXCHANGE no moment leaves ``path`` missing, and of
    two runs swapping at once the last one's output stays, whole."""
    while True:
        try:
            if not _rename(staging, path, _RENAME_EXCHANGE):
                break
            return staging
        except FileNotFoundError:  # nothing at path: publish as new; if someone beats us to it, exchange
            with contextlib.suppress(FileExistsError):
                _publish_new(staging, path)
                return None
    if not os.path.lexists(path):  # without exchange: move the old output aside, then the new one in
        _publish_new(staging, path)
        return None
    aside = path.with_name(_temporary_prefix(path) + "replaced")  # not a name cleaned up: kept if killed here
    os.replace(path, aside)
    os.rename(staging, path)
    return aside
