"""A batch's outputs leave the page cache once the disk has them; a single command's output stays cached.

Residency is read with mincore(2) over a map of the file: the pages the kernel holds for it, whoever maps them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest

from lorabridge.batch.plan import Job
from lorabridge.batch.work import Settings, convert_job
from lorabridge.io.atomic import atomic_write, syncing_at_the_end
from lorabridge.io.drop_behind import dropping_behind

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
SIZE = 4 << 20


def resident_bytes(path: Path) -> int:
    """How many of ``path``'s bytes are in the page cache (whole pages)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        mapped = mmap.mmap(handle.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            pages = -(-size // mmap.PAGESIZE)
            vector = (ctypes.c_ubyte * pages)()
            anchor = ctypes.c_char.from_buffer(mapped)  # a private writable map: ctypes can take its address
            try:
                if _libc.mincore(ctypes.addressof(anchor), size, vector) != 0:
                    raise OSError(ctypes.get_errno(), "mincore")
            finally:
                del anchor
        finally:
            mapped.close()
    return sum(byte & 1 for byte in vector) * mmap.PAGESIZE


@pytest.fixture
def droppable(tmp_path) -> Path:
    """A folder on a file system whose clean pages fadvise can drop (not tmpfs, which has no disk to read them back from)."""
    probe = tmp_path / "probe"
    with open(probe, "wb") as handle:
        handle.write(os.urandom(SIZE))
        handle.flush()
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if resident_bytes(probe) > SIZE // 2:
        pytest.skip("this file system keeps clean pages cached (tmpfs?)")
    return tmp_path


def write(path: Path, data: bytes) -> None:
    with atomic_write(path) as handle:
        handle.write(data)


def test_an_output_published_without_an_fsync_is_dropped_when_the_next_output_starts(droppable):
    first, second, third = (droppable / name for name in ("a.bin", "b.bin", "c.bin"))
    data = os.urandom(SIZE)
    with dropping_behind(), syncing_at_the_end():
        write(first, data)
        os.sync()  # the disk has it now, as it has by the time a batch's next file is written
        assert resident_bytes(first) == SIZE  # held until the next output starts: its disk writes have only begun
        write(second, data)
        os.sync()
        assert resident_bytes(first) == 0
        assert resident_bytes(second) == SIZE
        write(third, data)
    assert resident_bytes(second) == 0
    assert first.read_bytes() == second.read_bytes() == third.read_bytes() == data  # read back from the disk


def test_an_output_fsynced_before_publishing_is_dropped_at_once(droppable):
    output = droppable / "out.bin"
    with dropping_behind():
        write(output, os.urandom(SIZE))
    assert resident_bytes(output) == 0


def test_outside_a_batch_the_output_stays_cached(droppable):
    output, later = droppable / "out.bin", droppable / "later.bin"
    write(output, b"x" * SIZE)
    write(later, b"y" * SIZE)
    assert resident_bytes(output) == SIZE  # a pipeline loading a converted LoRA next reads it from memory


def test_a_batch_worker_drops_each_output_but_its_last_and_keeps_its_sources(droppable, neutral_file):
    sources = [droppable / f"lora{i}.safetensors" for i in range(3)]
    for source in sources:
        source.write_bytes(Path(neutral_file).read_bytes())
    out = droppable / "out"
    settings = Settings(out, "kohya", sync_at_the_end=True)
    outputs = [out / source.name for source in sources]
    for source, output in zip(sources, outputs):
        assert convert_job(Job(source, output, source.stat().st_size), settings).status == "converted"
        os.sync()
    assert [resident_bytes(output) for output in outputs[:-1]] == [0, 0]
    assert resident_bytes(outputs[-1]) > 0
    assert all(resident_bytes(source) >= source.stat().st_size for source in sources)  # read again by a rerun
