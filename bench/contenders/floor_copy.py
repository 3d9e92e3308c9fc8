"""A floor for one conversion: the work any converter that does what lorabridge must do cannot skip.

Start Python and import numpy (the NaN/Inf scan needs it), copy the input to the output (``shutil.copyfile``:
``copy_file_range`` where the kernel offers it, as lorabridge's copies), hash the input's bytes with sha256
``HASHES`` times in threads beside the copy (a neutral output records its source's sha256 and its tensors':
two passes over the bytes), then fsync the output (lorabridge's outputs are synced before they are published).
It converts nothing and scans nothing, so a converter can only be slower; where this floor is slower than
``cp + fsync``, no converter can reach ``cp + fsync``.

    python bench/contenders/floor_copy.py HASHES IN OUT
"""

import hashlib
import os
import shutil
import sys
import threading

import numpy  # noqa: F401  (paid by every conversion: the NaN/Inf scan)


def sha256_of(path: str) -> None:
    digest, buffer = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])


def main() -> None:
    hashes, source, output = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    threads = [threading.Thread(target=sha256_of, args=(source,)) for _ in range(hashes)]
    for thread in threads:
        thread.start()
    shutil.copyfile(source, output)
    for thread in threads:
        thread.join()
    fd = os.open(output, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
