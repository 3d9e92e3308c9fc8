"""The one exception type users see.

Every expected failure (bad file, unknown key, refused overwrite...) raises
:class:`LoraBridgeError`; the CLI prints it as a single line ``path: problem``
and exits non-zero. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class LoraBridgeError(Exception):
    """An expected, user-facing failure about one file (or none)."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.message = message
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        return f"{self.path}: {text}" if self.path else text


class ValidationProblem(LoraBridgeError):
    """A file that parses but breaks the spec; ``problems`` lists (location, message)."""

    def __init__(self, problems: list[tuple[str, str]], path=None):
        self.problems = problems
        first = "; ".join(f"{where}: {what}" if where else what for where, what in problems[:3])
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        super().__init__(f"invalid neutral LoRA: {first}{more}", path)


class LoraBridgeWarning(UserWarning):
    """Something the user should know that does not stop a conversion (dropped keys, folded alpha...).

    Readers and writers raise it with :func:`warnings.warn`; commands collect and print it as ``warning: ...``.
    """
