"""Bytes that pass unchanged from an input to an output go file to file in the kernel.

Most conversions only rename keys: a tensor's bytes in the output are its bytes in the input.
Readers of memory-mapped inputs give such tensors a :class:`~lorabridge.tensor.FileSpan` (the
input's :class:`SourceFile` and the offset); writers hand them to :func:`write_tensor`, which has
the kernel copy them (``copy_file_range``: no pass through this process, and on file systems with
reflinks no copy at all), falling back to ``sendfile`` where the file systems cannot (``EXDEV``
between two of them, ``ENOSYS``/``EOPNOTSUPP``/``EINVAL`` where unsupported), then to writing the
mapped view as before. What must still be computed over the bytes (the neutral manifest's
``tensor_sha256``, a CRC) reads them through :func:`chunks`: ``pread`` into one small reused buffer
from the page cache, cheaper than faulting a large map's pages in and out (a small map stays mapped).

Safety is the reader's: a span is only given for a file that is mapped, which inside
:func:`~lorabridge.io.input_file.held_inputs` means leased (no one can truncate or write it until
the command ends), so what the kernel copies is what the reader checked. A file that still comes
up short is a one-line error, never a short output.
"""

from __future__ import annotations

import errno
import os
import weakref
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from ..errors import LoraBridgeError
from ..tensor import FileHandle, FileSpan, Tensor
from .streaming import kept_mapped, release_pages

# A copy method a file system or kernel does not offer fails with one of these: try the next method.
UNSUPPORTED = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL})
READ_CHUNK_BYTES = 1 << 20  # pread into one reused buffer that stays in the CPU cache while it is hashed
_COPY_STEP = 1 << 30  # at most this much per system call (sendfile's count is capped near 2 GiB anyway)
# Runs of tensors shorter than this are written from memory, gathered: a kernel copy's set-up costs more.
KERNEL_COPY_MIN_BYTES = 256 * 1024
GATHER_MAX = 1024  # tensors per gathered write (IOV_MAX, the most buffers one writev takes on Linux)
GATHER_MAX_BYTES = 64 * 1024 * 1024  # bytes per gathered write, so progress and writeback go on in steps
COPY_BATCH_BYTES = 64 * 1024 * 1024  # bytes per call copying several runs in the kernel, for the same reason


class SourceFile:
    """An input file held open for copying from: its own descriptor, closed when no span refers to it.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile() as f:
        ...     source = SourceFile(os.open(f.name, os.O_RDONLY), f.name)
        ...     source.fileno() >= 0
        True
    """

    def __init__(self, fd: int, path: str | os.PathLike):
        self._fd, self.path = fd, Path(path)
        weakref.finalize(self, os.close, fd)

    def fileno(self) -> int:
        return self._fd


def _changed(path: os.PathLike) -> LoraBridgeError:
    return LoraBridgeError("this input changed while it was being read (it is shorter now); nothing was written", path)


def _copy_file_range(src: int, offset: int, dst: int, position: int, count: int) -> int:
    return os.copy_file_range(src, dst, min(count, _COPY_STEP), offset, position)


def _sendfile(src: int, offset: int, dst: int, position: int, count: int) -> int:
    os.lseek(dst, position, os.SEEK_SET)  # sendfile writes at the output's file position
    return os.sendfile(dst, src, offset, min(count, _COPY_STEP))


_METHODS = (_copy_file_range, _sendfile) if hasattr(os, "copy_file_range") else (_sendfile,)


def copy_range(source: SourceFile, offset: int, dst: int, position: int, count: int) -> bool:
    """Copy ``count`` bytes at ``offset`` of ``source`` to ``position`` of the file open at ``dst``, in the
    kernel: True when done, False when neither ``copy_file_range`` nor ``sendfile`` works between these
    files (the caller writes the bytes itself). The output's file position is left undefined.

    A source that ends early (changed under us) raises :class:`LoraBridgeError`.
    """
    methods = list(_METHODS)
    while count:
        if not methods:
            return False
        try:
            done = methods[0](source.fileno(), offset, dst, position, count)
        except OSError as exc:
            if exc.errno not in UNSUPPORTED:
                raise
            methods.pop(0)  # the next method takes over where this one stopped
            continue
        if done == 0:
            raise _changed(source.path)
        offset, position, count = offset + done, position + done, count - done
    return True


def write_tensor(out: BinaryIO, tensor: Tensor) -> None:
    """Write ``tensor``'s bytes at ``out``'s position: copied in the kernel when the tensor lies unchanged
    in an input file and ``out`` can take a copy (``copy_from``, as :func:`~lorabridge.io.atomic.atomic_write`'s
    file has), else written from memory (mapped pages are let go as they are used).

    Example:
        >>> import io
        >>> out = io.BytesIO()
        >>> write_tensor(out, Tensor("U8", (2,), b"ab")); out.getvalue()
        b'ab'
    """
    span = tensor.source
    if span is not None and tensor.nbytes and hasattr(out, "copy_from") and out.copy_from(span.file, [(span.offset, tensor.nbytes)]):
        return
    data = tensor.data  # read once: a LateTensor is made once
    out.write(data)
    release_pages(data)


def write_tensors(out: BinaryIO, tensors: Iterable[Tensor]) -> Iterator[Tensor]:
    """Write the tensors' bytes back to back at ``out``'s position, each yielded once written (for progress).

    Tensors lying back to back in the same input, as a rename-only conversion leaves them, go in one kernel
    copy: one system call per run instead of one per tensor (1,796 for a rank-128 SDXL LoRA; cp makes one).
    Consecutive runs of one input (a MindSpore checkpoint's tensors, apart between record headers) go to
    ``out.copy_from`` together, up to :data:`COPY_BATCH_BYTES`, so the output's position is set once per batch.
    Runs shorter than :data:`KERNEL_COPY_MIN_BYTES` are gathered and written from their mapped pages, up
    to a thousand in one system call (``out.write_many``, as :func:`~lorabridge.io.atomic.atomic_write`'s
    file has): a rank-4 LoRA's 1,120 tensors of a few KiB each, apart in a MindSpore checkpoint, would
    otherwise cost 1,120 kernel copies and their set-up. Tensors in memory are written one by one as
    :func:`write_tensor` writes them (a LateTensor's bytes are made when written, one at a time).

    Example:
        >>> import io
        >>> out = io.BytesIO()
        >>> [t.nbytes for t in write_tensors(out, [Tensor("U8", (2,), b"ab"), Tensor("U8", (1,), b"c")])]
        [2, 1]
        >>> out.getvalue()
        b'abc'
    """
    run: list[Tensor] = []  # spanned tensors, each starting where the one before ends in the same file
    gathered: list[Tensor] = []  # tensors to write from memory next, in order
    gathered_bytes = 0
    copy_from = getattr(out, "copy_from", None)  # atomic_write's file has it; an io.BytesIO has not
    copies: list[Tensor] = []  # tensors of runs to copy in the kernel next, in order
    spans: list[tuple[int, int]] = []  # those runs' (offset, count) in their input, copies_file
    copies_file: FileHandle | None = None
    copies_bytes = 0

    def gather(tensors: list[Tensor]) -> list[Tensor]:
        nonlocal gathered_bytes
        gathered.extend(tensors)
        gathered_bytes += sum(t.nbytes for t in tensors)
        return write_gathered() if len(gathered) >= GATHER_MAX or gathered_bytes >= GATHER_MAX_BYTES else []

    def write_gathered() -> list[Tensor]:
        nonlocal gathered_bytes
        done = gathered[:]
        gathered.clear()
        gathered_bytes = 0
        views = [tensor.data for tensor in done]
        if hasattr(out, "write_many"):
            out.write_many(views)
        else:
            for view in views:
                out.write(view)
        for view in views:
            release_pages(view)
        return done

    def copy_runs() -> list[Tensor]:
        nonlocal copies_bytes
        done = copies[:]
        assert copy_from is not None and copies_file is not None
        copied = copy_from(copies_file, spans)
        copies.clear()
        spans.clear()
        copies_bytes = 0
        if copied:
            return done
        gathered.extend(done)  # no kernel copy between these two files: from memory (nothing else is gathered now)
        return write_gathered()

    def write_run() -> list[Tensor]:
        nonlocal copies_bytes, copies_file
        done = run[:]
        run.clear()
        first, size = done[0].source, sum(t.nbytes for t in done)
        assert first is not None
        if size < KERNEL_COPY_MIN_BYTES or copy_from is None:
            return (copy_runs() if copies else []) + gather(done)  # what came first is written first
        before = write_gathered() if gathered else []
        if copies and copies_file is not first.file:
            before += copy_runs()
        copies_file = first.file
        copies.extend(done)
        spans.append((first.offset, size))
        copies_bytes += size
        return before + (copy_runs() if copies_bytes >= COPY_BATCH_BYTES else [])

    def write_pending() -> list[Tensor]:
        return copy_runs() if copies else write_gathered() if gathered else []

    for tensor in tensors:
        span = tensor.source
        if run and span is not None and _follows(run[-1], span):
            run.append(tensor)
            continue
        if run:
            yield from write_run()
        if span is not None and tensor.nbytes:
            run.append(tensor)
            continue
        yield from write_pending()
        write_tensor(out, tensor)  # in memory, or made now (a LateTensor): written alone, its data read once
        yield tensor
    if run:
        yield from write_run()
    yield from write_pending()


def _follows(before: Tensor, span: FileSpan) -> bool:
    """Whether ``span`` starts in the same file where ``before``'s bytes end."""
    assert before.source is not None
    return span.file is before.source.file and span.offset == before.source.offset + before.nbytes


def small_tensor_bytes(tensor: Tensor) -> bytes:
    """A small tensor's bytes (an alpha, a scalar), as :func:`chunks` reads them: by ``pread`` from its input
    file when it lies in a map that is let go as it is used, else from its data. Why: reading them through the
    map faults in the pages around them (a whole large folio on recent kernels), and a kohya Flux.1 LoRA's 494
    alphas lie between its weights all through the file: read through the map, they left ~100 MB of it resident
    at once (peak RssFile 117 MiB, 306 MB input).

    Example:
        >>> small_tensor_bytes(Tensor("F32", (), b"\\x00\\x00\\x80\\x3f"))
        b'\\x00\\x00\\x80?'
    """
    if in_one_piece(tensor):  # (a kohya file reads 560 alphas)
        data = bytes(tensor.data)
        release_pages(tensor.data)
        return data
    return b"".join(bytes(piece) for piece in chunks(tensor, bytearray(tensor.nbytes)))


def in_one_piece(tensor: Tensor) -> bool:
    """Whether :func:`chunks` gives ``tensor``'s bytes as its data itself, in one piece (in memory, or in a small map
    kept mapped). Passes over many small tensors (a kohya file's 560 alphas, its 1,680 hashed tensors) then use
    ``tensor.data`` directly, and ``release_pages`` it after, as :func:`chunks` does, without a generator each.

    Example:
        >>> in_one_piece(Tensor("U8", (3,), b"abc"))
        True
    """
    return tensor.source is None or kept_mapped(tensor.data)


def chunks(tensor: Tensor, buffer: bytearray) -> Iterator[memoryview]:
    """``tensor``'s bytes in order, for a hash or a checksum: from its input file by ``pread`` into ``buffer``
    (reused; each piece is valid until the next is produced) when it has a span in a map that is let go as it
    is used, else its data in one piece (in memory, or in a small map kept mapped: no faults to spare, and one
    ``pread`` per tensor would cost more than it saves for the thousand small tensors of a rank-4 LoRA).

    Example:
        >>> [bytes(piece) for piece in chunks(Tensor("U8", (3,), b"abc"), bytearray(2))]
        [b'abc']
    """
    if in_one_piece(tensor):
        yield memoryview(tensor.data).cast("B")
        release_pages(tensor.data)
        return
    span = tensor.source
    assert span is not None  # in_one_piece otherwise
    view, offset, left = memoryview(buffer), span.offset, tensor.nbytes
    while left:
        got = os.preadv(span.file.fileno(), [view[:min(left, len(view))]], offset)
        if got == 0:
            raise _changed(span.file.path)
        yield view[:got]
        offset, left = offset + got, left - got
