"""Where a batch's worker processes come from: a ``forkserver`` (else ``spawn``), started as early as a command can.

Workers are started fresh, never forked from the command: the command's own state (its held inputs, its open
files, its threads) must not leak into them. The forkserver is a fresh interpreter that imports what every
worker needs once (:mod:`lorabridge.batch.preload`), then forks each worker from itself. Its start (an
interpreter, lorabridge, numpy, the formats: ~0.3 s here) lies on the way to a batch's first file, so
:func:`start_server` lets a command begin it before it imports the rest of the batch (this module imports
nothing of lorabridge): both then run side by side, each on a core.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

PRELOAD = ["lorabridge.batch.preload"]  # what the forkserver imports before it forks a worker


def worker_context() -> BaseContext:
    """The context worker processes are started in: ``forkserver`` preloading :data:`PRELOAD` where the
    system has it (Linux, macOS), else ``spawn`` (Windows), where each worker imports for itself."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def start_server() -> None:
    """Start the forkserver now, if the system has one and it does not run yet; the pool uses it later.

    Example:
        >>> start_server()   # doctest: +SKIP
    """
    if worker_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
