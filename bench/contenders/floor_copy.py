"""A floor for one conversion: the work any converter that does what lorabridge must do cannot skip.

Start Python and import numpy (the NaN/Inf scan needs it), copy the input to the output in the kernel
(``copy_file_range``, as lorabridge's copies) in 32 MiB pieces, each flushed to the disk (``fdatasync``) by a
thread while the next is copied, as lorabridge's outputs are (a copy followed by one fsync waits for the
disk's whole cache flush at the end), hash the input's bytes with sha256 ``HASHES`` times in threads beside
the copy (a neutral output records its source's sha256 and its tensors': two passes over the bytes), then
fsync the output. It converts nothing and scans nothing, so a converter can only be slower; where this floor
is slower than ``cp + fsync``, no converter can reach ``cp + fsync``.

    python bench/contenders/floor_copy.py HASHES IN OUT
"""

import hashlib
import os
import queue
import sys
import threading

import numpy  # noqa: F401  (paid by every conversion: the NaN/Inf scan)

PIECE = 32 << 20  # lorabridge.io.atomic.WRITEBACK_BYTES


def sha256_of(path: str) -> None:
    digest, buffer = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])


def flush_behind(fd: int, pieces: queue.SimpleQueue) -> None:
    """fdatasync once per piece handed over (pieces handed over meanwhile go out together), until None."""
    while pieces.get() is not None:
        while not pieces.empty():
            if pieces.get() is None:
                os.fdatasync(fd)
                return
        os.fdatasync(fd)


def main() -> None:
    hashes, source, output = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    threads = [threading.Thread(target=sha256_of, args=(source,)) for _ in range(hashes)]
    for thread in threads:
        thread.start()
    src, out = os.open(source, os.O_RDONLY), os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pieces: queue.SimpleQueue = queue.SimpleQueue()
    flusher = threading.Thread(target=flush_behind, args=(out, pieces))
    flusher.start()
    size, done = os.fstat(src).st_size, 0
    while done < size:
        done += os.copy_file_range(src, out, min(PIECE, size - done), done, done)
        pieces.put(done)
    pieces.put(None)
    for thread in [flusher, *threads]:
        thread.join()
    os.fsync(out)
    os.close(out)
    os.close(src)


if __name__ == "__main__":
    main()
