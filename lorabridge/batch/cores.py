"""The CPUs a batch's workers have, and whether its files keep every one of them busy.

Why it matters: a conversion runs its hashes and NaN/Inf scan in helper threads, a second core's work for one
``lorabridge convert``. Where the files converting at once already fill every core, a helper only takes turns
with its worker and the others, and the worker converts faster in one thread
(:func:`lorabridge.io.streaming.one_thread`; measured in ``bench/RESULTS.md``).
"""

from __future__ import annotations

import os
from typing import Mapping

LOCAL = "this machine"
MAX_JOBS = 1024  # worker processes on one machine at most (each holds ~100 MB; a larger library wants --dask)


def usable_cores() -> int:
    """The CPUs this process may run on (``taskset``, a container's cpuset), not the machine's: the default
    ``--jobs``, and what a host's workers must fill before they give up helper threads.

    Example:
        >>> usable_cores() >= 1
        True
    """
    affinity = getattr(os, "sched_getaffinity", None)  # absent on macOS and Windows
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def keep_every_core_busy(threads: Mapping[str, int], cores: Mapping[str, int | None], files: int) -> bool:
    """Whether ``files`` converting on workers with ``threads`` (per host, all of them together) keep every core
    of every host busy (``cores`` per host; None where it is not known, which counts as a core to spare).

    Example:
        >>> keep_every_core_busy({"a": 2, "b": 4}, {"a": 2, "b": 4}, files=100)
        True
        >>> keep_every_core_busy({"a": 2, "b": 2}, {"a": 2, "b": 4}, files=100)
        False
        >>> keep_every_core_busy({"a": 2}, {"a": 2}, files=1)   # one file leaves a core free
        False
    """
    if not threads or files < sum(threads.values()):
        return False
    return all(count >= (cores.get(host) or count + 1) for host, count in threads.items())  # unknown: not filled
