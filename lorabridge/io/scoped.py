"""Settings that hold for the length of a ``with`` block: a context variable set on entry and put back on exit.

The io layer passes its modes this way (replace or not, fsync each output or not, helper threads or not...)
rather than through every writer's arguments; each mode's public context manager is this, with its docstring.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def set_within(variable: contextvars.ContextVar[T], value: T) -> Iterator[None]:
    """``variable`` is ``value`` within the block, and what it was before after it, however the block ends.

    Example:
        >>> flag = contextvars.ContextVar("flag", default=False)
        >>> with set_within(flag, True):
        ...     flag.get()
        True
        >>> flag.get()
        False
    """
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)
