"""Crash-safe output: write to a temporary file beside the target, fsync, rename.

A conversion killed part-way leaves either no output or the previous complete
one, never a partial file; an existing output is replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from ..errors import LoraBridgeError


def check_output_path(out: str | os.PathLike, force: bool, inputs: tuple = (), directory: bool = False) -> Path:
    """Refuse to overwrite an input, or an existing output unless ``force``.

    ``directory``: the output is a directory (a PEFT adapter folder) that ``force`` may replace
    as a whole, so it must not contain an input either.
    """
    out = Path(out)
    for src in inputs:
        if src is not None and out.exists() and Path(src).exists() and os.path.samefile(out, src):
            raise LoraBridgeError("output would overwrite the input; choose another -o", out)
        if src is not None and out.resolve() == Path(src).resolve():
            raise LoraBridgeError("output would overwrite the input; choose another -o", out)
        if src is not None and directory and Path(src).resolve().is_relative_to(out.resolve()):
            raise LoraBridgeError("output directory contains the input; choose another -o", out)
    if out.exists() and not force:
        raise LoraBridgeError("output exists; pass --force to replace it", out)
    if out.is_dir() and not directory:
        raise LoraBridgeError("output is a directory", out)
    if not out.parent.exists():
        raise LoraBridgeError("output directory does not exist", out.parent)
    return out


# Every this many bytes, the temporary file's new pages are handed to the disk (without waiting), so
# the fsync at the end waits for the last stretch only instead of the whole file.
WRITEBACK_BYTES = 64 * 1024 * 1024


class _EarlyWriteback(io.BufferedWriter):
    """A buffered file whose written pages start going to disk as it grows (Linux: posix_fadvise
    DONTNEED starts writeback of dirty pages without waiting for it, and drops no page not yet on disk)."""

    _started = 0  # writeback was started for the bytes before this offset

    def write(self, data) -> int:
        written = super().write(data)
        position = self.tell()
        if position - self._started >= WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            self.flush()
            os.posix_fadvise(self.fileno(), self._started, position - self._started, os.POSIX_FADV_DONTNEED)
            self._started = position
        return written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file in the target directory; on success fsync and rename it over ``path``.

    Large outputs are handed to the disk while they are written, so the final fsync is short.

    Example:
        >>> with atomic_write("out.bin") as f:   # doctest: +SKIP
        ...     f.write(b"data")
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        with _EarlyWriteback(io.FileIO(fd, "wb")) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Build a directory output in a staging folder beside ``path``, then swap it into place.

    On an error (or a kill) ``path`` keeps its previous content; an existing ``path`` is
    replaced only with ``force``, and the old one is moved aside before the new one moves in.

    Example:
        >>> with atomic_directory("images", force=True) as staging:   # doctest: +SKIP
        ...     (staging / "000.png").write_bytes(png)
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not force:
        raise LoraBridgeError("output exists; pass --force to replace it", path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        yield staging
        if path.exists() or path.is_symlink():
            if not force:
                raise LoraBridgeError("output exists; pass --force to replace it", path)
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(staging, path)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
