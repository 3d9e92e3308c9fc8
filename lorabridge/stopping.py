"""Stopping a command cleanly when it is told to (``kill``, a service manager, a job scheduler's time limit).

By default SIGTERM and SIGHUP end a Python process on the spot: an output being written stays behind as its
``.partial`` temporary, a batch's report is never published and its worker processes, which hold the pipes
they wait on open themselves, wait forever. Here those signals raise :class:`Stopped` in the main thread
instead, which unwinds as Ctrl-C does: temporaries are removed, a batch publishes its report and stops its
workers. A batch's workers also stop when the command's process is gone without a word (SIGKILL, the
out-of-memory killer): :func:`stop_when_gone`.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from typing import Iterator

STOPPING_SIGNALS = ("SIGTERM", "SIGHUP")


class Stopped(SystemExit):
    """A signal told this process to stop; its exit code is the shell's for that signal (128 + its number).

    A :class:`SystemExit`, so that ``except Exception`` clauses let it pass, cleanup in ``except BaseException``
    and ``finally`` runs, and a process it ends prints no traceback.
    """

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name


def stop_on_signals() -> None:
    """Make SIGTERM and SIGHUP raise :class:`Stopped` in the main thread, where their action is the default
    (one that ``nohup`` or a parent set to ignore stays ignored). Call it from the main thread.

    Once: the first such signal raises, and later ones are ignored, so that a second ``kill`` cannot cut the
    cleanup the first started (removing a temporary, publishing a report) short. SIGKILL still ends it.

    Example:
        >>> stop_on_signals()   # doctest: +SKIP
    """
    for name in STOPPING_SIGNALS:
        number = getattr(signal, name, None)  # Windows has no SIGHUP
        if number is not None and signal.getsignal(number) is signal.SIG_DFL:
            signal.signal(number, _raise_stopped)


_deferring = 0  # depth of deferring() blocks the main thread is in
_received: list[int] = []  # the stop signal that came while deferring, if one did


def _raise_stopped(signum: int, frame: object) -> None:
    for name in (*STOPPING_SIGNALS, "SIGINT"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is _raise_stopped:
            signal.signal(number, signal.SIG_IGN)
    if _deferring:
        _received.append(signum)
        return
    raise Stopped(signum)


@contextlib.contextmanager
def deferring() -> Iterator[None]:
    """Within this block a stop signal is only noted, and raised by :func:`check_stopped` where the code calls it,
    or when the block ends. Why: an exception raised by a signal handler can come between a lock's acquisition
    and the ``with`` that would release it; in a worker pool's queue (measured: 2 test runs in 10 of a batch
    whose process group got SIGTERM) the pool's own thread then waits on that lock forever, and so does the command.

    Ctrl-C (SIGINT) is deferred alike where it raises KeyboardInterrupt (Python's default, in the main thread),
    and still raises KeyboardInterrupt, at the safe point: a terminal sends it to every process of the command.

    Example:
        >>> with deferring():
        ...     check_stopped()   # nothing came: returns
    """
    global _deferring
    interrupt = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if interrupt:
        signal.signal(signal.SIGINT, _raise_stopped)
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    check_stopped()


def check_stopped() -> None:
    """Raise :class:`Stopped` (KeyboardInterrupt for Ctrl-C) if a stop signal came during a :func:`deferring`
    block: where this is called is a safe point to stop at."""
    if _received:
        if _received[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Stopped(_received[0])


def stop_when_gone(pid: int) -> None:
    """Send this process SIGTERM once process ``pid`` has ended (watched by a daemon thread), and end it
    :data:`STOP_GRACE_S` later if it is still there: a batch's worker whose command was killed outright stops,
    instead of waiting forever for its next file."""
    threading.Thread(target=_stop_after, args=(pid,), name=f"lorabridge-watch-{pid}", daemon=True).start()


STOP_GRACE_S = 10.0  # how long a process whose watched one is gone has to stop by the signal, before it is ended


def _stop_after(pid: int) -> None:
    wait_for_exit(pid)
    os.kill(os.getpid(), signal.SIGTERM)  # unwinds what the main thread does (a file's temporaries are removed)
    time.sleep(STOP_GRACE_S)
    # Still here: the signal found its exception swallowed (a worker pool's loop hands every exception of its
    # result-sending back to the pool), or ignored as a second one; nothing is left to wait for.
    os._exit(128 + signal.SIGTERM)


def wait_for_exit(pid: int, poll_s: float = 1.0) -> None:
    """Return once process ``pid`` has ended: woken by the kernel through a pidfd (Linux 5.3+), which no later
    process reusing the number can fool; elsewhere by asking every ``poll_s`` whether the number still exists.

    Example:
        >>> wait_for_exit(2**22 + 1)   # no such process: returns at once
    """
    try:
        watched = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd here
        while process_exists(pid):
            time.sleep(poll_s)
        return
    try:
        watch = select.poll()  # not select.select, which takes no descriptor above 1023
        watch.register(watched, select.POLLIN)
        watch.poll()  # readable once the process has exited
    finally:
        os.close(watched)


def process_exists(pid: int) -> bool:
    """Whether a process numbered ``pid`` exists (any user's): the number may have been reused since.

    Example:
        >>> process_exists(os.getpid()), process_exists(2**22 + 1)
        (True, False)
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
