"""Outputs that leave the page cache once the disk has them (what ``dd oflag=nocache`` and ``rsync --drop-cache`` do).

Why: a batch writes a whole library, gigabytes nobody reads back soon. Kept cached, it pushes everything else out of
the page cache, and every page it writes is memory the kernel has to find first. On a virtual machine whose free
memory goes back to the host (a balloon's free page reporting, as on this project's Firecracker VMs) that is memory
the host must hand over again, page by page: writing 23 MB into new page cache took 53 ms there, against 6 ms into
pages just freed (measured; ``bench/RESULTS.md``). Dropped as the batch goes, one output's pages are the next one's.

Pages are dropped only once they are on the disk (``POSIX_FADV_DONTNEED`` leaves dirty pages and pages being written
alone): an output that is fsynced (:func:`~lorabridge.io.atomic.atomic_write`'s default) right after the fsync; one
published without (:func:`~lorabridge.io.atomic.syncing_at_the_end`, whose disk writes start as it is published) when
the next output starts, by which time the disk has taken it. Nothing is lost either way: a dropped page is read back
from the disk if anyone wants it. Single-file commands keep their output cached (a pipeline often loads it next).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading

from .scoped import set_within

_dropping: contextvars.ContextVar[bool] = contextvars.ContextVar("lorabridge_drop_behind", default=False)
_published: list[int] = []  # descriptors of outputs published without an fsync, to drop when the next output starts
_lock = threading.Lock()
_CAN_DROP = hasattr(os, "posix_fadvise")


def dropping_behind() -> contextlib.AbstractContextManager[None]:
    """Within this block, each output :func:`~lorabridge.io.atomic.atomic_write` publishes leaves the page cache once
    the disk has it (see the module docstring for why and when).

    Example:
        >>> with dropping_behind():   # doctest: +SKIP
        ...     for src in sources: convert(src, ...)
    """
    return set_within(_dropping, True)


def output_starts() -> None:
    """An output is about to be written: drop the pages of those published before it without an fsync.

    Example:
        >>> output_starts()   # nothing published yet: nothing to do
    """
    with _lock:
        held = _published[:]
        _published.clear()
    for fd in held:
        _drop(fd)
        os.close(fd)


def output_written(fd: int, on_disk: bool) -> None:
    """The output open at ``fd`` is complete (``on_disk``: fsynced): drop its pages now if it is on the disk, else
    hold a descriptor of it until the next output starts (:func:`output_starts`). Nothing outside :func:`dropping_behind`.

    Example:
        >>> output_written(-1, on_disk=True)   # outside dropping_behind: nothing to do
    """
    if not _dropping.get() or not _CAN_DROP:
        return
    if on_disk:
        _drop(fd)
        return
    held = os.dup(fd)
    with _lock:
        _published.append(held)


def _drop(fd: int) -> None:
    with contextlib.suppress(OSError):  # only advice: a file system that cannot take it keeps the pages
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
