"""Stopping a command cleanly when it is told to (``kill``, a service manager, a job scheduler's time limit).

By default SIGTERM and SIGHUP end a Python process on the spot: an output being written stays behind as its
``.partial`` temporary, a batch's report is never published and its worker processes, which hold the pipes
they wait on open themselves, wait forever. Here those signals raise :class:`Stopped` in the main thread
instead, which unwinds as Ctrl-C does: temporaries are removed, a batch publishes its report and stops its
workers. A batch's workers also stop when the command's process is gone without a word (SIGKILL, the
out-of-memory killer): :func:`stop_when_gone`.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time

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

    Example:
        >>> stop_on_signals()   # doctest: +SKIP
    """
    for name in STOPPING_SIGNALS:
        number = getattr(signal, name, None)  # Windows has no SIGHUP
        if number is not None and signal.getsignal(number) is signal.SIG_DFL:
            signal.signal(number, _raise_stopped)


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


def stop_when_gone(pid: int) -> None:
    """Send this process SIGTERM once process ``pid`` has ended (watched by a daemon thread): a batch's worker
    whose command was killed outright stops, instead of waiting forever for its next file."""
    threading.Thread(target=_stop_after, args=(pid,), name=f"lorabridge-watch-{pid}", daemon=True).start()


def _stop_after(pid: int) -> None:
    wait_for_exit(pid)
    os.kill(os.getpid(), signal.SIGTERM)


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
        while _exists(pid):
            time.sleep(poll_s)
        return
    try:
        watch = select.poll()  # not select.select, which takes no descriptor above 1023
        watch.register(watched, select.POLLIN)
        watch.poll()  # readable once the process has exited
    finally:
        os.close(watched)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
