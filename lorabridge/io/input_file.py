"""Opening input files: regular files only, and held still while a command reads them.

Two hazards of reading whatever path a user names:

* A FIFO, socket or device "file" blocks ``open()`` or ``read()`` forever, or never ends
  (``/dev/zero``). Inputs are checked with ``stat`` before they are opened, opened with
  ``O_NONBLOCK`` (so a FIFO swapped in meanwhile cannot block) and checked again with ``fstat``.
* Readers memory-map their inputs (streaming, no copy). If another process truncates a mapped
  file, the next touch of a page past the new end kills the process with SIGBUS (no message, no
  cleanup), and a ``write()`` from such a page fails with ``EFAULT`` ("Bad address"). Python cannot
  turn SIGBUS into an exception: its handlers run between bytecodes, after the faulting C code
  would have re-faulted. So the truncation must not happen while we read.

The design: while :func:`held_inputs` is active (every CLI command and every ``convert`` runs in
one), each input opened through :func:`map_input` / :func:`hold` gets a Linux *read lease*
(``fcntl(F_SETLEASE, F_RDLCK)``). A process that then truncates the file or opens it for writing is
blocked by the kernel until the lease is released (at most ``/proc/sys/fs/lease-break-time``
seconds, 45 by default), so the mapped data cannot change under us. :func:`check_unchanged`, called
once the input is read, reports such a waiting writer as a one-line error before any output is
written; leases are released when the outermost :func:`held_inputs` block ends. Where no lease can
be taken (not Linux, another user's file without CAP_LEASE, a filesystem without leases, a file
someone has open for writing), the file is read into memory instead of mapped: slower and using
RAM for its size, but nothing can then fault. Outside :func:`held_inputs` (plain library calls)
files are mapped without a lease, as ``numpy.memmap`` or ``safetensors`` do.
"""

from __future__ import annotations

import contextlib
import contextvars
import mmap
import os
import signal
import stat
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import LoraBridgeError
from ..tensor import Tensor
from .scoped import set_within
from .streaming import kept_mapped
from .zero_copy import SourceFile

try:
    import fcntl
except ImportError:  # Windows: no leases; inputs are read, not mapped, inside held_inputs
    fcntl = None  # type: ignore[assignment]

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))
_CAN_LEASE = fcntl is not None and hasattr(fcntl, "F_SETLEASE")
# The kernel signals a lease holder when a writer arrives; the default (SIGIO) would terminate us.
# The lease is set to signal SIGURG (ignored by default) and then to signal no one: we poll instead.
_LEASE_SIGNAL = getattr(signal, "SIGURG", 0)


def kind_of(mode: int) -> str:
    """What a file that is not a regular one is, for a message ("a FIFO (named pipe)", "a directory"...)."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular(path: str | os.PathLike, directory_ok: bool = False) -> Path:
    """``path`` as a Path if it names a regular file (or, with ``directory_ok``, a directory).

    Only ``stat`` is called: nothing is opened, so a FIFO cannot block here.

    Example:
        >>> check_regular("/dev/null")
        Traceback (most recent call last):
        lorabridge.errors.LoraBridgeError: /dev/null: is a character device, not a regular file; refusing to read it
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise LoraBridgeError(f"is a broken symbolic link (to {os.readlink(path)!r})", path) from None
        raise LoraBridgeError("no such file or directory", path) from None
    except OSError as exc:
        raise LoraBridgeError(f"cannot read: {exc.strerror or exc}", path) from None
    if stat.S_ISREG(mode) or (directory_ok and stat.S_ISDIR(mode)):
        return path
    if stat.S_ISDIR(mode):
        raise LoraBridgeError("is a directory, expected a file", path)
    raise LoraBridgeError(f"is {kind_of(mode)}, not a regular file; refusing to read it", path)


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of the regular file ``path`` (never blocks: O_NONBLOCK, then fstat)."""
    path = check_regular(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise LoraBridgeError(f"cannot read: {exc.strerror or exc}", path) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # swapped between stat and open
        os.close(fd)
        raise LoraBridgeError(f"is {kind_of(mode)}, not a regular file; refusing to read it", path)
    return fd


@dataclass
class _Held:
    """Inputs held by the active :func:`held_inputs` block: leased descriptors and what each file looked like."""

    leases: dict[tuple[int, int], tuple[Path, int]] = field(default_factory=dict)  # (dev, ino) -> (path, fd)
    seen: dict[tuple[int, int], tuple[Path, int, int]] = field(default_factory=dict)  # -> (path, size, mtime_ns)
    buffers: dict[tuple[int, int], mmap.mmap | memoryview] = field(default_factory=dict)  # what map_input gave out


_active: _Held | None = None


@contextlib.contextmanager
def held_inputs() -> Iterator[None]:
    """Within the block, inputs opened through this module are leased (or read, not mapped).

    Nested blocks share the outermost one, which releases every lease when it ends. A
    :class:`LoraBridgeError` leaving the block becomes the "input changed" error of
    :func:`check_unchanged` when an input did change: a reader that met a cut-short file says
    "truncated" or "not a torch file", which would send the user looking in the wrong place.

    Example:
        >>> with held_inputs():
        ...     pass
    """
    global _active
    if _active is not None:
        yield
        return
    _active = _Held()
    try:
        yield
    except LoraBridgeError:
        check_unchanged()  # an input changed under a reader explains its error better than the reader can
        raise
    finally:
        held, _active = _active, None
        for _path, fd in held.leases.values():
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            os.close(fd)


# Set while this thread reads back an output it is writing (:func:`reading_own_output`).
_own_output: contextvars.ContextVar[bool] = contextvars.ContextVar("lorabridge_own_output", default=False)


def reading_own_output() -> contextlib.AbstractContextManager[None]:
    """Within the block (in this thread), files are mapped as outside :func:`held_inputs`: for reading back an
    output this process is still writing. No read lease can be taken on a file open for writing, and reading it
    into memory instead (what :func:`map_input` does for an input it cannot lease) would cost its size.

    Example:
        >>> with reading_own_output():   # doctest: +SKIP
        ...     file_contents(temporary)
    """
    return set_within(_own_output, True)


def holding_inputs() -> bool:
    """Whether a :func:`held_inputs` block is active (readers then map only leased files)."""
    return _active is not None


def _take_lease(fd: int) -> bool:
    """A read lease on ``fd``'s file, signalling no one when broken (see the module docstring)."""
    try:
        if _LEASE_SIGNAL:
            fcntl.fcntl(fd, fcntl.F_SETSIG, _LEASE_SIGNAL)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETOWN, 0)
    except OSError:  # EAGAIN (open for writing elsewhere), EACCES (not our file), EINVAL (no leases here)
        return False
    return True


def hold(fd: int, path: Path) -> bool:
    """Hold the file open at ``fd`` still, if a :func:`held_inputs` block is active: True when it is leased.

    Also records its size and modification time, which :func:`check_unchanged` compares.
    """
    if _active is None:
        return False
    info = os.fstat(fd)
    key = (info.st_dev, info.st_ino)
    _active.seen.setdefault(key, (path, info.st_size, info.st_mtime_ns))
    if key in _active.leases:
        return True
    if not _CAN_LEASE:
        return False
    lease_fd = os.dup(fd)  # same open file: the lease lives until held_inputs releases it
    if not _take_lease(lease_fd):
        os.close(lease_fd)
        return False
    _active.leases[key] = (path, lease_fd)
    return True


def check_unchanged() -> None:
    """Raise if an input held by the active block was changed, or is waiting to be, since it was opened.

    A writer blocked by a lease shows as a lease being broken; an input that was read, not
    mapped, is compared by size and modification time. No-op outside :func:`held_inputs`.
    """
    if _active is None:
        return
    for path, fd in _active.leases.values():
        if fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
            raise LoraBridgeError("another process truncated or opened this input for writing while it was being "
                                  "read; nothing was written (run again once it is done)", path)
    for path, size, mtime in _active.seen.values():
        try:
            now = os.stat(path)
        except OSError:
            now = None
        if now is None or (now.st_size, now.st_mtime_ns) != (size, mtime):
            raise LoraBridgeError("this input changed while it was being read; nothing was written", path)


def read_exactly(fd: int, size: int, path: Path) -> memoryview:
    """The first ``size`` bytes of the file at ``fd`` (read-only); a file cut short meanwhile is a one-line error."""
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    with open(fd, "rb", buffering=0, closefd=False) as handle:
        handle.seek(0)
        while got < size and (count := handle.readinto(view[got:])):
            got += count
    if got != size:
        raise LoraBridgeError(f"changed while being read: {got} bytes read of the {size} it had", path)
    return view.toreadonly()


_sources: weakref.WeakKeyDictionary[mmap.mmap, SourceFile] = weakref.WeakKeyDictionary()


def _mapped(fd: int, size: int, path: Path) -> mmap.mmap:
    """A read-only map of the file at ``fd``, remembered with a descriptor of its own for :func:`source_of`."""
    mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    _sources[mapped] = SourceFile(os.dup(fd), path)
    return mapped


def source_of(data) -> SourceFile | None:
    """The open input file :func:`map_input` mapped ``data`` from, for copying its bytes in the kernel
    (:mod:`.zero_copy`); None for bytes read into memory (an input not leased), whose file may differ.

    Example:
        >>> source_of(b"read, not mapped") is None
        True
    """
    return _sources.get(data) if isinstance(data, mmap.mmap) else None


def offset_in_map(tensor: Tensor) -> tuple[mmap.mmap, int] | None:
    """(the map, where ``tensor``'s bytes start in it) when they lie in a kept map (:func:`~.streaming.kept_mapped`)
    of the input file its span names; None otherwise. A map :func:`map_input` makes holds the whole file from its
    first byte, so the span's file offset is the offset in the map. Why: a pass over a LoRA's many small tensors
    can find those lying side by side and take them as one stretch of the map (the NaN/Inf scan sums a rank-4
    SDXL file's 1,120 tensors in a few calls instead of one each).

    Example:
        >>> offset_in_map(Tensor("U8", (1,), b"a")) is None
        True
    """
    data, span = tensor.data, tensor.source
    if span is None or not isinstance(data, memoryview) or not kept_mapped(data):
        return None
    mapped = data.obj
    if not isinstance(mapped, mmap.mmap) or _sources.get(mapped) is not span.file:
        return None
    return mapped, span.offset


def map_input(path: str | os.PathLike) -> tuple[Path, mmap.mmap | memoryview | None, int]:
    """(path, the file's bytes, size) of a regular file: a read-only map, or (inside :func:`held_inputs`
    where no lease could be taken) the bytes read into memory; None for an empty file.

    Inside :func:`held_inputs` a file is mapped or read once, however many readers ask for it
    (format detection opens the same file several times).

    Example:
        >>> path, data, size = map_input("lora.safetensors")   # doctest: +SKIP
    """
    fd = open_regular(path)
    path = Path(path)
    try:
        info = os.fstat(fd)
        if not info.st_size:
            return path, None, 0
        if _active is None or _own_output.get():
            return path, _mapped(fd, info.st_size, path), info.st_size
        key = (info.st_dev, info.st_ino)
        if key not in _active.buffers:
            leased = hold(fd, path)
            _active.buffers[key] = _mapped(fd, info.st_size, path) if leased else read_exactly(fd, info.st_size, path)
        data = _active.buffers[key]
        return path, data, len(data)
    except OSError as exc:
        raise LoraBridgeError(f"cannot read: {exc.strerror or exc}", path) from None
    finally:
        os.close(fd)
