"""What keeps a conversion streaming: memory-mapped pages let go once used, hashing beside writing.

Readers hand out zero-copy views into read-only memory maps. Every page a pass touches (a
hash, a NaN check, a write) stays mapped, and counts in the process's resident set, until the
map is closed: streaming through a 2 GiB file would end with 2 GiB resident, although those
pages are only page cache. :func:`release_pages` tells the kernel a view's pages are no longer
needed by this process; the data stays in the page cache and is mapped back on the next touch.

hashlib releases the GIL while it hashes a large buffer, and so does a file write, so a hash
run by :func:`in_background` takes a second core while the main thread writes; where every core is
busy already (a batch's worker pool), :func:`one_thread` runs that work in the caller's thread instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import mmap
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

from .scoped import set_within

T = TypeVar("T")
_CAN_RELEASE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")
# A map's pages are released once this many bytes of it have been used since the last release: one
# madvise per stretch, not per tensor. Per tensor would not do anyway: a page fault maps the pages
# around the one touched too (the 64 KiB "fault-around" block, or the whole large page cache folio
# on recent kernels), so a tensor's neighbours would come back mapped.
RELEASE_EVERY_BYTES = 16 * 1024 * 1024
# A map no larger than this is never released: all of it resident costs little, while releasing makes each
# later pass (NaN/Inf scan, write, hash) fault every page in again. A rank-4 SDXL LoRA (23 MB, 1,120 tensors)
# is read in ~4 passes; kept mapped, its write alone costs ~28 ms less CPU, a whole conversion 5-15 ms less
# (process time, files alternating with the old code; the passes overlap in threads).
KEEP_MAPS_UP_TO_BYTES = 32 * 1024 * 1024
# The most a page fault maps around the byte touched: a whole page cache folio, at most a PMD (2 MiB on x86-64
# and arm64 with 4 KiB pages) on recent kernels, where files read from the disk come in by readahead in large folios.
LARGEST_FOLIO_BYTES = 2 * 1024 * 1024
_kept: dict[int, list[bytearray]] = {}  # size -> buffers of that size no one holds now
_helper_threads: contextvars.ContextVar[bool] = contextvars.ContextVar("lorabridge_helper_threads", default=True)


@dataclass
class _Use:
    """How a map has been used since its pages were last released."""

    address: int  # the map's, which views' addresses are offsets from
    charged: int = 0  # bytes charged (:func:`_charge`)
    ends: dict[int, int] = field(default_factory=dict)  # thread -> where its last view ended (an offset)


_uses: weakref.WeakKeyDictionary[mmap.mmap, _Use] = weakref.WeakKeyDictionary()  # gone with the map (a worker
# converts thousands of files; a new map may get an old one's id)


def release_pages(data) -> None:
    """Say that ``data``, a view into a read-only memory map, has been used: every 16 MiB of use (each view
    charged what it mapped, :func:`_charge`), the map's pages are dropped from this process's resident set
    (the data stays in the page cache). A map of at most :data:`KEEP_MAPS_UP_TO_BYTES` stays whole
    (:func:`kept_mapped`).

    Anything else (``bytes``, a view of a writable or private map) is left alone: only a read-only
    shared file map can give its pages back without losing data. Pages another thread is reading
    are dropped too; its next touch maps them back in from the page cache.

    Example:
        >>> release_pages(b"not a map")   # no-op
    """
    if type(data) is not memoryview or not _CAN_RELEASE:  # the common exits first: this runs per tensor per pass
        return
    mapped = data.obj
    if not isinstance(mapped, mmap.mmap) or mapped.closed or len(mapped) <= KEEP_MAPS_UP_TO_BYTES or not data.readonly \
            or not data.c_contiguous:  # a strided view has no single place in the map (no reader makes one)
        return
    use = _uses.get(mapped)
    if use is None:
        use = _uses[mapped] = _Use(_address(mapped))
    use.charged += _charge(data, _address(data) - use.address, use)
    if use.charged >= RELEASE_EVERY_BYTES:
        mapped.madvise(mmap.MADV_DONTNEED)
        use.charged = 0


class _BufferView(ctypes.Structure):
    """CPython's ``Py_buffer`` (part of the stable ABI): what ``PyObject_GetBuffer`` fills in."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_BufferView), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_BufferView)]
_release_buffer.restype = None


def _address(buffer) -> int:
    """Where a contiguous buffer's first byte is in memory. Python has no call for it; the C API's buffer
    protocol gives it. Not numpy's view of it: numpy would then be imported by the first pass over a large file,
    on the way to a conversion's first copy, while the NaN/Inf scan imports it in another thread (~0.1 s waited).

    Example:
        >>> data = bytearray(b"abc")
        >>> _address(memoryview(data)[1:]) - _address(data)
        1
    """
    view = _BufferView()
    _get_buffer(buffer, ctypes.byref(view), 0)  # PyBUF_SIMPLE: raises for a buffer that is not contiguous
    try:
        return view.buf or 0
    finally:
        _release_buffer(ctypes.byref(view))


def _charge(data: memoryview, start: int, use: _Use) -> int:
    """What using ``data`` (at ``start`` in its map) mapped: its bytes, plus the gap since the same thread's last view of this map (up to
    :data:`LARGEST_FOLIO_BYTES`; a jump back, or a first view, counts that much). Why: a pass reading small pieces
    far apart (a kohya Flux.1 LoRA's fused B blocks, ~590 KB apart) maps a whole folio around each piece, so
    counting its bytes alone let ~75 MiB of a 306 MB input stay mapped between releases (peak RssFile, the file
    read from the disk); a pass over adjacent pieces is charged its bytes, as before. Threads are apart: the hash,
    the write and the NaN/Inf scan each go through the file in order, at their own place."""
    thread = threading.get_ident()
    last = use.ends.get(thread)
    use.ends[thread] = start + data.nbytes
    gap = start - last if last is not None and start >= last else LARGEST_FOLIO_BYTES
    return data.nbytes + min(gap, LARGEST_FOLIO_BYTES)


def kept_mapped(data) -> bool:
    """Whether ``data`` is a view into a map small enough that :func:`release_pages` leaves all of it mapped
    (:data:`KEEP_MAPS_UP_TO_BYTES`): reading it again costs no page faults, and nothing needs a copy to spare them.

    Example:
        >>> kept_mapped(memoryview(b"not a map"))
        False
    """
    return (isinstance(data, memoryview) and isinstance(data.obj, mmap.mmap) and not data.obj.closed
            and len(data.obj) <= KEEP_MAPS_UP_TO_BYTES)


def in_background(function: Callable[..., T], *args) -> Callable[[], T]:
    """Start ``function(*args)`` in a thread; the returned callable waits for its result (or raises its error).
    Inside :func:`one_thread` no thread starts: the returned callable runs ``function`` when first called.

    Example:
        >>> result = in_background(sum, [1, 2, 3])
        >>> result()
        6
    """
    if not _helper_threads.get():
        return _when_asked(function, args)
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=_run, args=(outcome, function, args),
                              name=f"lorabridge-{getattr(function, '__name__', 'task')}", daemon=True)
    thread.start()

    def result() -> T:
        thread.join()
        return _given(outcome)

    return result


def _when_asked(function: Callable[..., T], args: tuple) -> Callable[[], T]:
    """``function(*args)`` run in the thread that first asks for its result (then kept, an error as well);
    never, if no one asks (the command failed before it needed it)."""
    outcome: dict[str, Any] = {}

    def result() -> T:
        if not outcome:
            _run(outcome, function, args)
        return _given(outcome)

    return result


def _run(outcome: dict[str, Any], function: Callable[..., Any], args: tuple) -> None:
    """``function(*args)``, its value or its error kept in ``outcome`` for :func:`_given`."""
    try:
        outcome["value"] = function(*args)
    except BaseException as exc:  # handed to whoever asks for the result
        outcome["error"] = exc


def _given(outcome: dict[str, Any]) -> Any:
    """The value :func:`_run` kept, or its error raised."""
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def one_thread() -> contextlib.AbstractContextManager[None]:
    """Within this block :func:`in_background` starts no thread: its work runs in the thread that asks for the
    result, when it first asks (a hash when the header is patched, a scan when its verdict is due).

    Why: a helper thread only helps where a core is free. In a batch whose worker processes already keep
    every core busy, it takes turns with its own process's main thread and the other workers instead, and
    each turn is a wait for the GIL or for the scheduler (measured: 100 rank-4 SDXL ``.ckpt`` to neutral in
    two processes on two cores, four rounds interleaved, median wall 12.4 s with threads, 10.7 s without).

    Example:
        >>> with one_thread():
        ...     result = in_background(sum, [1, 2, 3])
        >>> result()
        6
    """
    return set_within(_helper_threads, False)


@contextlib.contextmanager
def kept_buffer(size: int) -> Iterator[bytearray]:
    """A scratch buffer of ``size`` bytes, kept for the next caller once this one is done with it.

    Why kept: the first use of a fresh buffer of a few MiB costs a page fault for every 4 KiB of it
    (zeroed memory), and a batch converts thousands of small files, each of which would pay that
    again. Callers holding one at the same time (threads) each get their own; the contents are
    whatever the last user left.

    Example:
        >>> with kept_buffer(16) as first: first[:2] = b"hi"
        >>> with kept_buffer(16) as again: bytes(again[:2])
        b'hi'
    """
    spares = _kept.setdefault(size, [])
    buffer = spares.pop() if spares else bytearray(size)
    try:
        yield buffer
    finally:
        spares.append(buffer)
