"""The batch as one call: :func:`run_batch` finds the files, plans their outputs, runs them on this machine's
worker processes or a Dask cluster, and writes the report as each file ends (see :mod:`lorabridge.batch`)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Generator, Sequence

from ..converters.registry import get_format, get_writer
from ..errors import LoraBridgeError
from ..formats.contract import OPTION_DEFAULTS
from ..io.atomic import sync_file_system
from ..stopping import check_stopped, deferring
from .cores import LOCAL, MAX_JOBS, keep_every_core_busy, usable_cores
from .discover import find_inputs
from .plan import check_out_dir, plan_jobs, resolver
from .report import FAILED, BatchResult, Entry, ReportWriter, check_report_target
from .state import STATE_DIR, make_state_dir
from .work import Settings, unchanged_entry

REPORT_NAME = "lorabridge-report.jsonl"


def run_batch(sources: Sequence[str | os.PathLike], out_dir: str | os.PathLike, to: str, *,
              from_format: str | None = None, jobs: int | None = None, dask: str | None = None,
              report: str | os.PathLike | None = None, fail_fast: bool = False, force: bool = False,
              rehash: bool = False, progress: bool = True, **options: Any) -> BatchResult:
    """Convert every LoRA that ``sources`` name to format ``to``, mirrored under ``out_dir``.

    ``jobs``: worker processes (default: :func:`~lorabridge.batch.cores.usable_cores`); ``dask``: a scheduler address to run on
    instead; ``report``: the JSON Lines report (default ``out_dir/lorabridge-report.jsonl``);
    ``fail_fast``: start no new file after a failure; ``force``: convert every file again, replacing
    existing outputs; ``rehash``: hash every source to decide whether its output is up to date, even one whose
    inode, size and times are those its record kept (:mod:`~lorabridge.batch.state`); ``options``: conversion
    options as :func:`lorabridge.converters.convert` takes them.

    Example:
        >>> result = run_batch(["loras/"], "converted", to="neutral")   # doctest: +SKIP
        >>> result.ok, result.count("converted")   # doctest: +SKIP
        (True, 300)
    """
    started = time.perf_counter()
    if dask is not None and not dask.strip():  # an unset $SCHEDULER: not a reason to convert here instead
        raise LoraBridgeError("--dask needs a scheduler address (tcp://HOST:PORT); it was given an empty one")
    if dask and jobs:
        raise LoraBridgeError("--jobs sets this machine's worker processes; with --dask the cluster's workers run "
                              "the files (start them with --nworkers N --nthreads 1)")
    if jobs is not None and not 1 <= jobs <= MAX_JOBS:
        raise LoraBridgeError(f"--jobs must be 1 to {MAX_JOBS}, not {jobs}")
    target = get_writer(to)  # an unknown or read-only target fails once, before any file
    if from_format is not None:
        get_format(from_format)  # so does an unknown --from (not once per file, each hashed first)
    if any(os.fspath(path) == "" for path in (*sources, out_dir, *([report] if report is not None else []))):
        raise LoraBridgeError("an empty path was given (an unset variable?); name the folder, or '.' for this one")
    out = Path(out_dir)
    report_path = Path(report) if report is not None else out / REPORT_NAME
    # What the batch keeps for itself in OUT_DIR: a file whose output would be there fails alone (a --report given
    # is the user's choice: one naming an output refuses the batch below, as a typo should)
    reserved = {out / STATE_DIR: "the batch's records", **({report_path: "the batch's report"} if report is None else {})}
    jobs_ = plan_jobs(find_inputs(sources, exclude=[out]), out, target, reserved=reserved)
    check_out_dir(out, jobs_)
    read = [job.source for job in jobs_ if job.error is None or not os.path.isdir(job.source)]  # not OUT_DIR named as one
    written = [*(job.output for job in jobs_ if job.error is None), Path(os.path.abspath(out / STATE_DIR))]
    check_report_target(report_path, read, force, out, outputs=written, resolved=list(map(resolver(), written)))
    client = marker = None
    if dask:  # first: a typo in the address leaves nothing behind
        from .cluster import check_workers, cluster_fills_its_cores, connect, run_dask

        client = connect(dask)
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LoraBridgeError(f"cannot create the output directory: {exc.strerror or exc}", out) from None
        make_state_dir(out)
        cores = usable_cores()
        workers = jobs or cores
        if client is not None:
            probe = next((job.source for job in jobs_ if not job.error and os.path.exists(job.source)), None)  # no typo
            marker = check_workers(client, Path(os.path.abspath(out)), probe)
            busy = cluster_fills_its_cores(client, len(jobs_))
        else:
            busy = keep_every_core_busy({LOCAL: workers}, {LOCAL: cores}, len(jobs_))
        writer = ReportWriter(report_path)  # before any file runs: a report that cannot be written stops nothing half-way
    except BaseException:
        if marker is not None:
            marker.close()
        if client is not None:
            client.close()
        raise
    given = tuple(sorted((k, v) for k, v in options.items() if v != OPTION_DEFAULTS.get(k)))
    # The batch syncs the output's file system once at its end instead of an fsync per output: this machine's, and
    # on Dask every worker's (they may be other machines, each writing through its own page cache). A file converts
    # without helper threads where the files converting at once keep every core busy (lorabridge.batch.cores).
    settings = Settings(Path(os.path.abspath(out)), to, from_format, given, force, sync_at_the_end=True,
                        helper_threads=not busy, rehash=rehash, fail_fast=fail_fast)
    bar = _bar(len(jobs_), sum(job.nbytes for job in jobs_)) if progress else None
    done: list[Entry] = []
    entries: Generator[Entry, None, None] | None = None
    failed = False

    def add(entry: Entry) -> None:
        nonlocal failed
        failed = failed or entry.status == FAILED
        done.append(entry)
        writer.add(entry)
        if bar is not None:
            bar.update(entry.bytes)
            bar.set_postfix_str(f"{len(done)}/{len(jobs_)} files" + (", some failed" if failed else ""))

    # A stop signal (SIGTERM, SIGHUP: lorabridge.stopping) is acted on between files, never inside the worker pool's
    # or the Dask client's locks, where the exception it raises could leave one held and the batch hung.
    with deferring():
        try:
            to_run = []
            for job in jobs_:  # up to date by its record alone: reported now, without a worker (a stat and a record read)
                check_stopped()
                entry = unchanged_entry(job, settings)
                if entry is None:
                    to_run.append(job)
                else:
                    add(entry)
            if client is not None and marker is not None:
                entries = run_dask(to_run, settings, client, marker, lambda: fail_fast and failed)
            else:
                from .local import run_local

                entries = run_local(to_run, settings, workers, lambda: fail_fast and failed)
            for entry in entries:
                add(entry)
        finally:
            if entries is not None:
                entries.close()  # an interrupted batch stops its workers (or cancels its tasks) now, not at garbage collection
            elif client is not None and marker is not None:  # stopped before the first task
                marker.close()
                client.close()
            writer.close()
            if bar is not None:
                bar.close()
            for directory in {out, report_path.parent}:  # what the workers published, and the report, on the disk
                sync_file_system(directory)
    return BatchResult(done, time.perf_counter() - started, report_path)


def _bar(files: int, nbytes: int):
    """One progress bar (bytes, with files done as its postfix) on a terminal; None elsewhere."""
    if sys.stderr is None or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=nbytes, unit="B", unit_scale=True, desc=f"converting {files} files", leave=False)
