"""Checks that run in a thread beside the write, their verdict given before anything is published.

A pass over every value (the NaN/Inf scan) is CPU work the kernel copy of the same bytes does not
need: both can go at once on two cores. Its verdict (a warning, or a refusal with ``--strict``) is
needed only before the output is published, so inside :func:`beside_writing` :func:`check` starts
the pass in a thread and the verdict is given at the first of: the next warning (:func:`settle`,
called by the warning helpers, so warnings keep their order), the publishing of an output
(:func:`~lorabridge.io.atomic.atomic_write`), the end of the block, or an error ending it (a check
started earlier would have stopped the command first, so its refusal wins). Outside the block a
check runs where it is called, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, TypeVar

from .streaming import in_background

T = TypeVar("T")
_pending: contextvars.ContextVar[list[Callable[[], None]] | None] = contextvars.ContextVar("lorabridge_pending_checks",
                                                                                           default=None)


def check(scan: Callable[[], T], verdict: Callable[[T], None]) -> None:
    """``verdict(scan())``: now, or, inside :func:`beside_writing`, with ``scan`` run in a thread and
    ``verdict`` (which may warn or raise) called in this one when the check is settled.

    Example:
        >>> check(lambda: 2, print)
        2
    """
    pending = _pending.get()
    if pending is None:
        verdict(scan())
        return
    result = in_background(scan)
    pending.append(lambda: verdict(result()))


def settle() -> None:
    """Give the verdicts of the checks started so far, in the order they were started. The first that refuses
    stops the command: the checks after it are dropped (a reader's and a writer's scan of the same tensors
    would otherwise refuse twice, the second refusal hiding the first)."""
    pending = _pending.get()
    while pending:
        verdict = pending.pop(0)
        try:
            verdict()
        except BaseException:
            pending.clear()
            raise


@contextlib.contextmanager
def beside_writing() -> Iterator[None]:
    """Within this block, :func:`check` runs scans in threads; all are settled before it ends (a block
    inside another is part of the outer one: its checks are settled with the outer block's).

    Example:
        >>> with beside_writing():
        ...     check(lambda: "scanned", print)
        ...     print("written")
        written
        scanned
    """
    if _pending.get() is not None:  # inside another block: its checks are settled where that block's are
        yield
        return
    token = _pending.set([])
    try:
        yield
    except BaseException:
        settle()  # a refusal of a check started before this error is the error the command stops with
        raise
    else:
        settle()
    finally:
        _pending.reset(token)
