"""Running a batch on this machine: a pool of worker processes, one file per task.

Workers are started fresh (:mod:`~lorabridge.batch.workers`), never forked from the command, and each
file runs in a clean :func:`~lorabridge.io.input_file.held_inputs` block of its worker. At most two files per
worker are queued at a time, so a library of 100,000 files costs no more memory than one of ten.

A worker that dies (killed, out of memory) breaks the whole pool: the files it and the others were
running are queued again on a fresh pool, each at most once more; a file whose second attempt dies
too is reported as failed. A file never runs twice at once, and outputs are atomic, so a retried
file leaves no partial output. A worker told to stop (SIGTERM, SIGHUP), or whose command is gone, abandons
its file as on Ctrl-C and exits (:func:`~lorabridge.batch.work.prepare_worker`).
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Generator, Sequence

from ..stopping import Stopped, check_stopped
from .plan import Job
from .report import Entry
from .workers import worker_context
from .work import DIED_TWICE, NOT_RUN, Settings, convert_in_worker, crashed, prepare_worker, stopped_by, unrun

QUEUED_PER_WORKER = 2
STOP_POLL_S = 0.25  # how often the wait for a file to finish looks for a stop signal


def _pool(workers: int, no_new_file) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=worker_context(), initializer=prepare_worker,
                               initargs=(os.getpid(), no_new_file))


def run_local(jobs: Sequence[Job], settings: Settings, workers: int, stop: Callable[[], bool]) -> Generator[Entry, None, None]:
    """Convert ``jobs`` in ``workers`` processes, yielding each file's entry as it finishes.

    ``stop()`` is asked before each new file is started; once it says True (``--fail-fast`` after a
    failure) no file starts any more, those handed to the pool included, and the files not started are
    yielded as failed, "not converted". A stop signal (:func:`~lorabridge.stopping.check_stopped`) does the
    same, but first waits for the files the workers are converting and yields their entries (a worker told to
    stop too abandons its file: not converted), then raises it.
    """
    if not jobs:
        return
    workers = min(workers, len(jobs))  # no process started that would get no file
    pending = deque((job, 0) for job in jobs)  # (job, attempts so far)
    running: dict[Future, tuple[Job, int]] = {}
    # A shared byte, not an Event: an Event's lock, held by a worker killed inside is_set(), would hang set() here
    no_new_file = worker_context().RawValue("b", 0)
    pool = _pool(workers, no_new_file)
    stopped: BaseException | None = None  # the stop signal's exception, once one came
    try:
        while pending or running:
            while pending and len(running) < workers * QUEUED_PER_WORKER and not stop() and stopped is None:
                job, attempt = pending.popleft()
                running[pool.submit(convert_in_worker, job, settings)] = (job, attempt)
            if stop() or stopped is not None:
                no_new_file.value = 1
                why = NOT_RUN if stopped is None else stopped_by(stopped)
                yield from (unrun(job, why) for job, _ in pending)
                pending.clear()
                if not running:
                    break
            done, _ = wait(running, timeout=STOP_POLL_S, return_when=FIRST_COMPLETED)
            if stopped is None:
                try:
                    check_stopped()  # here, between files: a stop signal (deferred by run_batch) stops the batch
                except (Stopped, KeyboardInterrupt) as exc:
                    stopped = exc
                    continue
            if any(isinstance(future.exception(), BrokenProcessPool) for future in done):
                done = set(running)  # every file the pool held is lost with it
                pool.shutdown(wait=True, cancel_futures=True)
                if stopped is None:
                    pool = _pool(workers, no_new_file)
            for future in done:  # each done or (the pool shut down before it started) cancelled
                job, attempt = running.pop(future)
                if future.cancelled():
                    pending.appendleft((job, attempt))
                    continue
                error = future.exception()
                if error is None:
                    yield future.result() or unrun(job, NOT_RUN if stopped is None else stopped_by(stopped))
                elif isinstance(error, KeyboardInterrupt):  # Ctrl-C reaches the workers too: the file unwound
                    yield unrun(job, stopped_by(stopped or error))
                elif not isinstance(error, BrokenProcessPool):
                    yield crashed(job, error)
                elif stopped is not None:  # its worker was told to stop too
                    yield unrun(job, stopped_by(stopped))
                elif attempt == 0:
                    pending.appendleft((job, 1))
                else:
                    yield unrun(job, DIED_TWICE)
    finally:
        no_new_file.value = 1
        pool.shutdown(wait=True, cancel_futures=True)
    if stopped is not None:
        raise stopped
