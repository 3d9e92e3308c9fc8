"""Drop the third-party messages that are harmless in ``infer``, each one precisely, saying why.

No logger is silenced: only records or printed lines matching one of :data:`LOG_NOISE` /
:data:`PRINT_NOISE` are dropped, and only while the call that produces them runs.

Example:
    >>> import logging
    >>> with quiet_logs("diffusers"):
    ...     logging.getLogger("diffusers.loaders.lora_base").warning("No LoRA keys associated to CLIPTextModel found ...")
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from typing import Iterator, TextIO

# logger (below the library: "diffusers" or "mindone.diffusers") -> messages dropped from it.
# load_lora_weights tries every text encoder and warns for each one a UNet/transformer-only LoRA leaves alone;
# apply_lora's "LoRA applied" line names the components that did get modules, and checks each landed.
LOG_NOISE: dict[str, re.Pattern] = {
    "loaders.lora_base": re.compile(r"No LoRA keys associated to \w+ found"),
    "loaders.peft": re.compile(r"No LoRA keys associated to \w+ found"),
}
# Lines printed to stdout on import: transformers' auto_docstring cannot find a config for mindone's
# parakeet model (a speech model infer never uses) and prints this once per decorated class.
PRINT_NOISE = re.compile(r"^\W*Config not found for parakeet\. ")


class _Drop(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


@contextlib.contextmanager
def quiet_logs(library: str) -> Iterator[None]:
    """Drop :data:`LOG_NOISE` from ``library``'s loggers (``diffusers`` or ``mindone.diffusers``) meanwhile."""
    filters = [(logging.getLogger(f"{library}.{name}"), _Drop(pattern)) for name, pattern in LOG_NOISE.items()]
    for logger, drop in filters:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger, drop in filters:
            logger.removeFilter(drop)


class _LineFilter(io.TextIOBase):
    """A text stream that passes whole lines on to ``target`` unless they match :data:`PRINT_NOISE`."""

    def __init__(self, target: TextIO):
        self.target, self.pending = target, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if not PRINT_NOISE.match(line):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not PRINT_NOISE.match(self.pending):
            self.target.write(self.pending)
        self.pending = ""
        self.target.flush()


@contextlib.contextmanager
def printed_to_stderr() -> Iterator[None]:
    """Send what is printed meanwhile (import-time notices) to stderr, less :data:`PRINT_NOISE`: stdout is for results."""
    stream = _LineFilter(sys.stderr)
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.flush()
