"""The one exception type users see.

Every expected failure (bad file, unknown key, refused overwrite...) raises
:class:`LoraBridgeError`; the CLI prints it as a single line ``path: problem``
and exits non-zero. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from typing import Sequence


class LoraBridgeError(Exception):
    """An expected, user-facing failure about one file (or none)."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.message = message
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = single_line(self.message)
        return f"{shown(self.path)}: {text}" if self.path else text


def shown(name: str | os.PathLike) -> str:
    r"""A file name as messages show it: as it is when every character prints, else quoted with escapes
    (Python's repr). A newline in a name cannot then start a forged ``error:`` line, and a name that is
    not UTF-8 prints as escapes instead of failing the print.

    Example:
        >>> shown("lora.ckpt"), shown("a\nerror: b")
        ('lora.ckpt', "'a\\nerror: b'")
    """
    text = os.fsdecode(name)
    return text if text.isprintable() else repr(text)


def single_line(text: str) -> str:
    r"""``text`` as one line of a message: runs of whitespace (newlines too) become one space, other
    control characters (and undecodable bytes) their escapes.

    Example:
        >>> single_line("dropped\n  key\x1b")
        'dropped key\\x1b'
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(text.split()))


def listed(items: Sequence[str], first: int = 3, sep: str = "; ") -> str:
    """The first ``first`` items, ``sep``-separated, and how many more there are: a message names a few
    offenders and counts the rest, so one line stays readable however many there are.

    Example:
        >>> listed(["a", "b", "c", "d", "e"]), listed(["a", "b"], 1, ", "), listed(["a"])
        ('a; b; c (+2 more)', 'a (+1 more)', 'a')
    """
    more = f" (+{len(items) - first} more)" if len(items) > first else ""
    return sep.join(items[:first]) + more


class ValidationProblem(LoraBridgeError):
    """A file that parses but breaks the spec; ``problems`` lists (location, message)."""

    def __init__(self, problems: list[tuple[str, str]], path=None):
        self.problems = problems
        messages = [f"{where}: {what}" if where else what for where, what in problems]
        super().__init__(f"invalid neutral LoRA: {listed(messages)}", path)


class LoraBridgeWarning(UserWarning):
    """Something the user should know that does not stop a conversion (dropped keys, folded alpha...).

    Readers and writers raise it with :func:`warnings.warn`; commands collect and print it as ``warning: ...``.
    """
