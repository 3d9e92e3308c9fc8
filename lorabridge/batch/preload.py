"""What the forkserver imports once, before it forks a batch's workers (:mod:`lorabridge.batch.workers`): the
worker's entry point, numpy and every format with the architectures and namings they use. A worker then starts
its first file with nothing left to import (each worker imported ~75 ms of formats on its first file, both
workers at once on a two-core machine, while the forkserver's start is beside the command's own)."""

from __future__ import annotations

import numpy  # noqa: F401  (the NaN/Inf scan's; imported where used, so not by anything below)

from ..converters.registry import all_formats
from . import work  # noqa: F401  (the task every worker runs: lorabridge.batch.work.convert_in_worker)

all_formats()  # each format's module: imported as a file in that format is met, so only when asked
