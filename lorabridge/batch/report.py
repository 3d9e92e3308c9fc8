"""A batch's per-file JSON Lines report and its closing summary.

One line per input, in the order files finish (a file retried after its worker died is reported
once, with its last attempt). The report is written to a temporary beside ``--report`` line by line
(flushed, so ``tail -f`` follows a long batch) and renamed into place when the batch ends, also when
it is interrupted: two batches naming one report never interleave their lines, the last one to end wins.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from ..errors import listed, shown

CONVERTED, SKIPPED, FAILED = "converted", "skipped", "failed"


@dataclass
class Entry:
    """One input's line in the report."""

    input: str
    output: str | None
    status: str = FAILED  # converted, skipped (up to date) or failed
    error: str | None = None  # one line, ``path: problem`` as lorabridge convert prints it
    sha256: str | None = None  # the input's (for an adapter directory: over its files, see batch.state)
    format: str | None = None  # detected input format
    architecture: str | None = None
    seconds: float = 0.0
    bytes: int = 0  # the input's size
    warnings: list[str] = field(default_factory=list)


class ReportWriter:
    """Streams entries to a temporary beside ``path``; :meth:`close` publishes it at ``path``."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._temporary = tempfile.mkstemp(".partial", f".{path.name}.", path.parent)
        self._handle: IO[str] = open(fd, "w", encoding="utf-8")

    def add(self, entry: Entry) -> None:
        self._handle.write(_json_line(asdict(entry)))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
        os.replace(self._temporary, self.path)


def _json_line(record: dict) -> str:
    r"""``record`` as one line of UTF-8 JSON, names as they are (readable: ``"ローラ.ckpt"``), except in a line
    with a file name that is not UTF-8 (bytes a Latin-1 system wrote), which Python holds as lone surrogates no
    UTF-8 file can take: that line is written with ``\uXXXX`` escapes, which ``json.loads`` and ``os.fsencode``
    turn back into the name's bytes.

    Example:
        >>> _json_line({"input": "ローラ.ckpt"}), _json_line({"input": "caf\udce9.ckpt"})
        ('{"input": "ローラ.ckpt"}\n', '{"input": "caf\\udce9.ckpt"}\n')
    """
    text = json.dumps(record, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(record)
    return text + "\n"


@dataclass
class BatchResult:
    """Every entry of a batch, its wall time and where the report went."""

    entries: list[Entry]
    seconds: float
    report: Path

    def count(self, status: str) -> int:
        return sum(entry.status == status for entry in self.entries)

    @property
    def ok(self) -> bool:
        """Every input converted or already up to date: the exit code is 0 only then."""
        return self.count(FAILED) == 0

    def render(self) -> str:
        """The closing summary: counts, throughput, the first failures and the report's path.

        Example:
            >>> print(BatchResult([Entry("a.ckpt", "out/a.safetensors", CONVERTED, bytes=2_000_000)], 2.0,
            ...                   Path("out/r.jsonl")).render())
            1 file: 1 converted, 0 skipped (up to date), 0 failed; 2.0 MB in 2.0 s (1.0 MB/s)
            report: out/r.jsonl
        """
        total = sum(entry.bytes for entry in self.entries if entry.status == CONVERTED)
        files = len(self.entries)
        lines = [f"{files} file{'s' * (files != 1)}: {self.count(CONVERTED)} converted, "
                 f"{self.count(SKIPPED)} skipped (up to date), {self.count(FAILED)} failed; "
                 f"{total / 1e6:.1f} MB in {self.seconds:.1f} s ({total / 1e6 / max(self.seconds, 1e-9):.1f} MB/s)"]
        failures = [entry.error or entry.input for entry in self.entries if entry.status == FAILED]
        if failures:
            lines.append(f"failed: {listed(failures, 5)}")
        lines.append(f"report: {shown(self.report)}")
        return "\n".join(lines)
