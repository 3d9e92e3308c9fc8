"""Converting a LoRA library: many files in one run, in parallel, resumable, with a per-file report.

The pieces, each a small module:

* :mod:`~lorabridge.batch.discover`: which files the sources name (files, directories, globs);
* :mod:`~lorabridge.batch.plan`: where each output goes (the source tree mirrored under ``OUT_DIR``);
* :mod:`~lorabridge.batch.work`: one file, exactly as ``lorabridge convert`` converts it, plus the
  resume rule of :mod:`~lorabridge.batch.state` (skip what is up to date, redo what changed);
* :mod:`~lorabridge.batch.local` / :mod:`~lorabridge.batch.cluster`: worker processes on this
  machine, or tasks on a Dask cluster;
* :mod:`~lorabridge.batch.report`: the JSON Lines report and the summary.

Failures never stop a batch unless asked (``fail_fast``): a bad file is a failed line in the
report, and the batch succeeds (:attr:`BatchResult.ok`) only if every file converted or was up to date.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .run import REPORT_NAME, run_batch

__all__ = ["REPORT_NAME", "run_batch"]


def __getattr__(name: str) -> Any:
    """``run_batch`` and ``REPORT_NAME``, imported when first asked for. Why not at once: a command starts the
    workers' server (:func:`lorabridge.batch.workers.start_server`) before it imports the batch machinery, and
    importing any module of this package runs this file first."""
    if name in __all__:
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
