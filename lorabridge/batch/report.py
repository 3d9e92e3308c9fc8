"""A batch's per-file JSON Lines report and its closing summary.

One line per input, in the order files finish (a file retried after its worker died is reported
once, with its last attempt). The report is written to a temporary beside ``--report`` line by line
(flushed, so ``tail -f`` follows a long batch) and renamed into place when the batch ends, also when
it is interrupted: two batches naming one report never interleave their lines, the last one to end wins.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Iterable, Sequence

from ..errors import LoraBridgeError, listed, shown
from ..io.atomic import create_locked, current_umask, new_temporary
from ..io.input_file import kind_of

CONVERTED, SKIPPED, FAILED = "converted", "skipped", "failed"
REPORT_LINE_LIMIT = 1 << 20  # bytes of an existing --report file's first line read to tell whether it is a report


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
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LoraBridgeError(f"cannot write the report: {exc.strerror or exc}", path) from None
        self._temporary = new_temporary(path)  # named and locked as outputs' are: a killed batch's is removed later
        try:
            fd = create_locked(self._temporary)
            os.fchmod(fd, 0o666 & ~current_umask())  # created 0600; a report is read by others as outputs are
            self._handle: IO[str] = open(fd, "w", encoding="utf-8")
        except BaseException as exc:  # a stop signal too, even the instant the file was created
            with contextlib.suppress(OSError):
                os.unlink(self._temporary)
            if isinstance(exc, OSError):
                raise LoraBridgeError(f"cannot write the report: {exc.strerror or exc}", path) from None
            raise

    def add(self, entry: Entry) -> None:
        try:
            self._handle.write(_json_line(asdict(entry)))
            self._handle.flush()
        except OSError as exc:  # the disk is full: a library's conversion is where that happens
            raise LoraBridgeError(f"cannot write the report: {exc.strerror or exc}", self.path) from None

    def close(self) -> None:
        """Publish the report (also that of a batch stopped part-way); if it cannot be written, remove the temporary."""
        try:
            self._handle.close()
            os.replace(self._temporary, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(self._temporary)
            raise LoraBridgeError(f"cannot write the report: {exc.strerror or exc}", self.path) from None


def check_report_target(path: Path, inputs: Iterable[Path], force: bool, out_dir: Path | None = None,
                        outputs: Sequence[Path] = (), resolved: Sequence[str] = ()) -> None:
    """Refuse a report path whose file the batch must not replace: one of its inputs or ``outputs`` (under
    ``out_dir``; ``resolved``: the same with symbolic links resolved), a path inside one or a folder one goes in
    (``OUT_DIR`` itself; even with ``force``), a
    FIFO or device, or (without ``force``) a file that is not an earlier batch's report. Why: the report is
    renamed into place when the batch ends, after the outputs, and ``--report`` can name any path (a typo for
    an input's or an output's). Paths are compared resolved (``..``, symbolic links), as the file system sees them.

    Example:
        >>> check_report_target(Path("/dev/null"), [], force=True)
        Traceback (most recent call last):
        lorabridge.errors.LoraBridgeError: /dev/null: --report names a character device, not a regular file; refusing to replace it
    """
    inputs = list(inputs)
    if out_dir is not None:
        clash = _output_clash(path, out_dir, outputs, resolved)
        if clash:
            raise LoraBridgeError(f"--report names {clash}; refusing to write there", path)
    folders = [Path(os.path.realpath(source)) for source in inputs if os.path.isdir(source)]  # PEFT adapter folders
    if any(Path(os.path.realpath(path)).is_relative_to(folder) for folder in folders):
        raise LoraBridgeError("--report names a file inside an input adapter folder; refusing to write there", path)
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # nothing there to replace (creating it fails on its own)
        return
    except OSError as exc:
        raise LoraBridgeError(f"--report cannot be checked: {exc.strerror or exc}", path) from None
    if not stat.S_ISREG(info.st_mode):
        raise LoraBridgeError(f"--report names {kind_of(info.st_mode)}, not a regular file; refusing to replace it", path)
    for source in inputs:
        with contextlib.suppress(OSError):
            if os.path.samefile(source, path):
                raise LoraBridgeError("--report names an input of this batch; refusing to replace it", path)
    if not force and not _is_report(path):
        raise LoraBridgeError("--report names a file that is not a lorabridge batch report; pass --force to "
                              "replace it", path)


NOT_CONVERTED = ": not converted: "  # in the error of a file a stopped batch did not convert (batch.work.unrun)


def _not_started(entry: Entry) -> bool:
    """Whether ``entry`` is a file the batch did not convert because it stopped (``--fail-fast``, a signal)."""
    return entry.status == FAILED and NOT_CONVERTED in (entry.error or "")


def _output_clash(report: Path, out_dir: Path, outputs: Sequence[Path], resolved: Sequence[str]) -> str | None:
    """What ``report`` is to the batch's output tree, if it is part of it: OUT_DIR or a folder above it, one of
    ``outputs``, inside one (a PEFT output folder), or a folder they go in. Asked of its path as named against the
    outputs as named, and resolved (``..``, symbolic links) against the outputs ``resolved`` (a link inside OUT_DIR
    leads some elsewhere). Compared as strings: ~0.3 µs an output."""
    for path, root, mine in ((os.path.abspath(report), os.path.abspath(out_dir), list(map(os.fspath, outputs))),
                             (os.path.realpath(report), os.path.realpath(out_dir), resolved)):
        if path == root or root.startswith(path.rstrip(os.sep) + os.sep):
            return "the output directory or a folder it is in"
        for output in mine:
            if path == output:
                return "one of this batch's outputs"
            if path.startswith(output + os.sep):
                return "a path inside one of this batch's outputs"
            if output.startswith(path + os.sep):
                return "a folder this batch writes outputs into"
    return None


def _is_report(path: Path) -> bool:
    """Whether ``path`` is empty or starts with a report line (a JSON object with ``input`` and ``status``)."""
    try:
        with open(path, "rb") as handle:
            first = handle.readline(REPORT_LINE_LIMIT)
        if not first:
            return True
        line = json.loads(first)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(line, dict) and {"input", "status"} <= line.keys()


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
        unstarted = [entry.error or "" for entry in self.entries if _not_started(entry)]
        failures = [entry.error or entry.input for entry in self.entries if entry.status == FAILED and not _not_started(entry)]
        lines = [f"{files} file{'s' * (files != 1)}: {self.count(CONVERTED)} converted, "
                 f"{self.count(SKIPPED)} skipped (up to date), {self.count(FAILED)} failed"
                 + (f" ({len(unstarted)} of them not converted as the batch stopped)" if unstarted else "") + "; "
                 f"{total / 1e6:.1f} MB in {self.seconds:.1f} s ({total / 1e6 / max(self.seconds, 1e-9):.1f} MB/s)"]
        if failures:
            lines.append(f"failed: {listed(failures, 5)}")
        if unstarted:
            lines.append(f"not converted: {unstarted[0].rpartition(NOT_CONVERTED)[2]}")
        lines.append(f"report: {shown(self.report)}")
        return "\n".join(lines)
