"""One file of a batch, as a worker process runs it: detect, hash, decide (resume), convert, record.

The conversion is :func:`lorabridge.converters.convert`, the call behind ``lorabridge convert``, so
each file behaves exactly as that command would (same detection, same errors, atomic output, the
same refusal to replace a file that is not the batch's own without ``--force``). What the batch adds
is the resume rule of :mod:`~lorabridge.batch.state`, an :class:`~lorabridge.batch.report.Entry`
instead of an exception (a bad file is one failed line, and the batch goes on), and outputs that leave
the page cache once the disk has them (:mod:`~lorabridge.io.drop_behind`).

Workers run one conversion at a time per process (a lock): lorabridge holds its inputs still with
per-process file leases (:mod:`lorabridge.io.input_file`), which threads of one process would share.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from ..converters import convert
from ..converters.registry import FORMATS, get_writer
from ..converters.torch import detect_input
from ..errors import LoraBridgeError, single_line
from ..io.atomic import EXISTS, syncing_at_the_end
from ..io.drop_behind import dropping_behind
from ..io.input_file import check_regular, held_inputs
from ..io.streaming import one_thread
from ..stopping import Stopped, stop_on_signals, stop_when_gone
from .plan import Job
from .report import CONVERTED, FAILED, SKIPPED, Entry
from .state import (CONVERT, FOREIGN, REDO, UP_TO_DATE, Record, decide, read_record, record_path, recorded_digest,
                    settled_stamp, source_digest, source_stamp, stamp, write_record)

_one_at_a_time = threading.Lock()


@dataclass(frozen=True)
class Settings:
    """What every file of a batch is converted with (picklable: it travels to worker processes)."""

    out_dir: Path
    to: str
    from_format: str | None = None
    options: tuple[tuple[str, Any], ...] = ()  # conversion options given (not at their defaults), as convert() takes them
    force: bool = False
    sync_at_the_end: bool = False  # outputs published without an fsync each; the batch syncs the file system at its end
    helper_threads: bool = True  # False where the workers keep every core busy: see lorabridge.io.streaming.one_thread
    rehash: bool = False  # hash every source, even one whose stamp says it is unchanged since its record's hash
    fail_fast: bool = False  # a worker whose file failed starts no new file (prepare_worker), nor do the others

    def candidates(self) -> list[str]:
        """The input formats a file may be: the one ``--from`` names, else every readable one (detected)."""
        return [self.from_format] if self.from_format else list(FORMATS)

    def recorded(self) -> dict[str, Any]:
        """What a record keeps of these settings: an output made with other ones is not up to date."""
        return {"to": self.to, "from": self.from_format, "options": dict(self.options)}


_no_new_file: Any = None  # the batch's "start no new file" flag, in a worker process (prepare_worker)


def prepare_worker(command_pid: int, no_new_file: Any = None) -> None:
    """Set a worker process up once, before its first file.

    * What it imported (lorabridge, and numpy, which every file's NaN/Inf scan imports otherwise) is frozen out
      of the garbage collector's full passes, which would otherwise walk all of it every few files (~12 ms each,
      measured: 2-3 ms a file of a rank-4 LoRA, 40 files in a row).
    * SIGTERM and SIGHUP stop it cleanly (:mod:`lorabridge.stopping`), as does the end of the batch's command
      (``command_pid``) however it ended: a worker otherwise outlives a command that was killed, waiting forever.
    * ``no_new_file`` (a shared byte, ``multiprocessing.RawValue``), once set to 1 by the command (``--fail-fast``
      after a failure, a stop signal) or a worker (its file failed under ``--fail-fast``), makes
      :func:`convert_in_worker` start no file: files already handed to the pool, queued behind the one a worker
      converts, are not converted after the batch decided to stop.
    """
    global _no_new_file
    import numpy  # noqa: F401  (imported where used, so not yet: frozen with the rest)

    _no_new_file = no_new_file
    stop_on_signals()
    stop_when_gone(command_pid)
    gc.freeze()


def convert_in_worker(job: Job, settings: Settings) -> Entry | None:
    """:func:`convert_job` as a worker process runs it; None, converting nothing, once the batch starts no new file
    (:func:`prepare_worker`). Told to stop, the worker leaves once the file has unwound (its temporaries
    removed), and the batch retries the file, or is itself stopping."""
    if _no_new_file is not None and _no_new_file.value:
        return None
    try:
        entry = convert_job(job, settings)
        if settings.fail_fast and entry.status == FAILED and _no_new_file is not None:
            _no_new_file.value = 1  # now: the file queued behind this one must not start before the command hears of it
        return entry
    except Stopped as stop:
        # Leave now: back in the pool's loop, a worker whose command is gone would wait for its next file forever.
        os._exit(stop.code if isinstance(stop.code, int) else 1)


@contextlib.contextmanager
def _collected_once() -> Iterator[None]:
    """No automatic garbage collection during one file, one pass over what it left after it.

    Why: a rank-4 file makes ~30,000 short-lived containers, nearly all freed by reference counting; the
    collector's automatic passes over them (~22 of the youngest generation per file) took 4.8 ms a file,
    one full pass at the end 0.9 ms (measured in a worker, 40 files). The pass is over the youngest
    generation only, which holds everything the file made (nothing is promoted while the collector is off):
    its cost does not grow with the process's heap (a Dask worker's). Cycles (an exception's traceback)
    wait at most until the file ends.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
            gc.collect(0)


def convert_job(job: Job, settings: Settings) -> Entry:
    """Convert one file of a batch (or skip it, up to date); a :class:`LoraBridgeError` becomes a failed entry.

    Example:
        >>> job = Job(Path("/no/such.ckpt"), Path("/tmp/out/such.safetensors"), 0)
        >>> entry = convert_job(job, Settings(Path("/tmp/out"), "neutral"))
        >>> entry.status, entry.error
        ('failed', '/no/such.ckpt: no such file or directory')
    """
    started = time.perf_counter()
    skipped = unchanged_entry(job, settings)
    if skipped is not None:
        return skipped
    entry = Entry(os.fspath(job.source), os.fspath(job.output), bytes=job.nbytes)
    with (_one_at_a_time, _collected_once(), dropping_behind(),
          syncing_at_the_end() if settings.sync_at_the_end else contextlib.nullcontext(),
          contextlib.nullcontext() if settings.helper_threads else one_thread()):
        try:
            # Held around the whole file, detection included: its header is read and checked once, not once to detect
            # its format and again to convert it (a kohya SDXL LoRA's 1,680 entries: ~10 ms each time). Inside the
            # try: an error leaving the block is first turned into "this input changed" when it did (check_unchanged).
            with held_inputs():
                _convert(job, settings, entry)
        except LoraBridgeError as exc:
            entry.status, entry.error = FAILED, exc.one_line()
    entry.seconds = round(time.perf_counter() - started, 4)
    return entry


def _convert(job: Job, settings: Settings, entry: Entry) -> None:
    if job.error:
        raise LoraBridgeError(job.error, job.source)
    check_regular(job.source, directory_ok=True)
    candidates = settings.candidates()
    target, wanted, out_dir = get_writer(settings.to), settings.recorded(), settings.out_dir
    hashed_from, before = time.time_ns(), source_stamp(job.source)
    exists = os.path.lexists(job.output)
    stored = read_record(out_dir, job.output) if exists else None
    # A source unchanged since its record's hash (same inode, size and times) is not read again, unless --rehash
    # (here: its settings changed, or the output did; an unchanged one was skipped by unchanged_entry already).
    entry.sha256 = None if settings.rehash else recorded_digest(stored, before)
    # A new output whose target records the source's sha256 (neutral): convert hashes the file beside reading
    # it, so it is taken from there instead of a pass of its own. Otherwise hashed first: the resume decision needs it.
    hashed_by_convert = target.records_source_hash and job.source.is_file() and not exists
    if entry.sha256 is None and not hashed_by_convert:
        entry.sha256 = source_digest(job.source)
    trust_manifest = target.records_source_hash and not wanted["options"] and not settings.from_format
    action, record = decide(job.output, stored, entry.sha256, wanted, trust_manifest)
    if action == UP_TO_DATE and not settings.force:
        # Detected when it was converted, from these very bytes (the sha256 matched): not again (for a kohya or
        # diffusers file, a dozen formats' detection is most of a rerun's time), unless the record lacks it.
        known = record.format if record is not None and record.format in candidates else None
        entry.status, entry.architecture = SKIPPED, record.architecture if record else None
        entry.format = known or detect_input(job.source, candidates)
        if record is not None and record is stored:  # the batch's own record (not a neutral output's manifest, which stays foreign)
            _restamp(out_dir, job.output, record, settled_stamp(before, source_stamp(job.source), hashed_from))
        return
    entry.format = detect_input(job.source, candidates)
    if action == FOREIGN and not settings.force:
        raise LoraBridgeError(EXISTS, job.output)
    _make_folder(job.output.parent)
    source = os.fspath(job.source)
    unpublished = stamp(job.output)  # what is there before this conversion (None: nothing)
    write_record(out_dir, job.output, Record(source, entry.sha256, wanted, "converting"))
    if action == CONVERT and os.path.lexists(job.output):
        # Another batch on this OUT_DIR published it since we decided, and may have recorded it "done" before our
        # "converting" replaced that: converted again (our record claims it now), the record ends "done" either way.
        # Checked after our record is written: a publish after this check is followed by its "done", which wins.
        action = REDO
    try:
        result = convert(job.source, job.output, settings.to, from_formats=[entry.format], progress=False,
                         force=settings.force or action == REDO, read_back=False, **dict(settings.options))
    except BaseException:
        if stamp(job.output) == unpublished:  # nothing published: the record says again what it said before
            _put_back(out_dir, job.output, stored)
        raise
    entry.architecture, entry.sha256 = result.model.architecture, entry.sha256 or result.model.provenance["source_sha256"]
    entry.warnings = [single_line(warning) for warning in result.warnings]
    write_record(out_dir, job.output, Record(source, entry.sha256, wanted, "done", stamp(job.output), entry.format,
                                             entry.architecture, settled_stamp(before, source_stamp(job.source), hashed_from)))
    entry.status = CONVERTED


def _put_back(out_dir: Path, output: Path, record: Record | None) -> None:
    """Make ``output``'s record ``record`` again (None: no record) after a conversion that failed before it published
    anything. Why: a "converting" record left behind claims the output for the batch (it may have been published by
    a worker killed before it recorded "done"), so a file the user puts there later would be replaced without
    ``--force`` (measured: a full disk failed three files, and the rerun replaced the user's file put in one's place)."""
    with contextlib.suppress(LoraBridgeError, OSError):  # the failure being reported matters more than this
        if record is None:
            os.unlink(record_path(out_dir, output))
        else:
            write_record(out_dir, output, record)


def _make_folder(folder: Path) -> None:
    """Create the folder of the mirrored tree an output goes in; a file in the way fails that file in one line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = "is not a directory" if isinstance(exc, FileExistsError) else f"cannot create: {exc.strerror or exc}"
        raise LoraBridgeError(problem, exc.filename or folder) from None


def unchanged_entry(job: Job, settings: Settings) -> Entry | None:
    """The "skipped" entry of a file whose output is up to date by its record alone (its source's stamp is the
    one recorded with its hash, :func:`~lorabridge.batch.state.recorded_digest`, and the settings and output are
    the recorded ones); None when the file needs a worker: to be hashed, converted, or to fail.

    Why apart from :func:`convert_job`: the batch asks it of every file before handing any to a worker, so a
    rerun of a library that has not changed costs a stat and a record read per file in one process, not a task
    and its exchange with a worker process or a Dask cluster.

    Example:
        >>> unchanged_entry(Job(Path("/no/such.ckpt"), Path("/tmp/out/such.safetensors"), 0),
        ...                 Settings(Path("/tmp/out"), "neutral")) is None
        True
    """
    started = time.perf_counter()
    if job.error or settings.force or settings.rehash or not os.path.lexists(job.output):
        return None
    stored = read_record(settings.out_dir, job.output)
    sha256 = recorded_digest(stored, source_stamp(job.source))
    if stored is None or sha256 is None or stored.format not in settings.candidates():
        return None
    action, _ = decide(job.output, stored, sha256, settings.recorded(), trust_manifest=False)
    if action != UP_TO_DATE:
        return None
    if _legacy(stored):
        with contextlib.suppress(LoraBridgeError):  # the file is skipped either way
            _restamp(settings.out_dir, job.output, stored, None)
    return Entry(os.fspath(job.source), os.fspath(job.output), SKIPPED, sha256=sha256, format=stored.format,
                 architecture=stored.architecture, seconds=round(time.perf_counter() - started, 4), bytes=job.nbytes)


def _restamp(out_dir: Path, output: Path, record: Record, now: list[int] | None) -> None:
    """Keep the source's new stamp in the record of an output found up to date by hashing (a source only
    touched, copied back in place, or hashed too soon after a change last time): the next run need not hash it.
    Not if the record changed while the source was hashed (another batch on this OUT_DIR converted it again since).
    A record from before output stamps held the inode and change time gets them (:func:`_legacy`)."""
    new_source = now is not None and record.source_stamp != now
    if not (new_source or _legacy(record)) or read_record(out_dir, output) != record:
        return
    write_record(out_dir, output, replace(record, source_stamp=now if new_source else record.source_stamp,
                                          stamp=stamp(output) if _legacy(record) else record.stamp))


def _legacy(record: Record) -> bool:
    """Whether ``record``'s output stamp is from before it held the inode and change time (2 numbers): the power-cut
    rule then takes any shorter file for the batch's own (:mod:`~lorabridge.batch.state`)."""
    return record.stamp is not None and len(record.stamp) == 2


NOT_RUN = "not converted: the batch stopped at an earlier failure (--fail-fast)"


def stopped_by(reason: BaseException) -> str:
    """Why the files a stopped batch did not convert are not converted: ``reason`` is what stopped it.

    Example:
        >>> stopped_by(KeyboardInterrupt())
        'not converted: the batch was interrupted (Ctrl-C)'
    """
    return (f"not converted: the batch was stopped by {reason.signal_name}" if isinstance(reason, Stopped)
            else "not converted: the batch was interrupted (Ctrl-C)")
DIED_TWICE = "its worker process died twice (killed, or out of memory)"


def unrun(job: Job, why: str) -> Entry:
    """The entry of a file no worker converted: ``why`` (its worker died twice, a bug's exception...)."""
    return Entry(os.fspath(job.source), os.fspath(job.output), FAILED, LoraBridgeError(why, job.source).one_line(),
                 bytes=job.nbytes)


def crashed(job: Job, exc: BaseException) -> Entry:
    """The entry of a file whose conversion raised something other than a LoraBridgeError: a bug, reported, not fatal."""
    return unrun(job, f"unexpected {type(exc).__name__} (a lorabridge bug; `lorabridge --debug convert` on this file "
                      f"shows the traceback): {exc}")
