"""One log line per denoising step (step, seconds, ETA) where no progress bar is shown.

diffusers' and mindone's progress bars (tqdm) hide themselves when stderr is not a terminal, so a long
run sent to a log file or a CI job would say nothing between "LoRA applied" and the images: there,
:class:`StepLog` (the pipelines' ``callback_on_step_end``) writes a line per step instead.

Example:
    >>> clock = iter([0.0, 2.0, 3.5]).__next__
    >>> steps = StepLog(2, print, clock)
    >>> _ = steps(None, 0, 999, {})
    step 1/2: 2.0 s, ETA 2.0 s
    >>> _ = steps(None, 1, 500, {})
    step 2/2: 1.5 s, done in 3.5 s
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable


def duration(seconds: float) -> str:
    """``seconds`` as a person reads it: "4.2 s", "12 min 05 s", "1 h 03 min".

    Example:
        >>> duration(4.24), duration(725), duration(3790)
        ('4.2 s', '12 min 05 s', '1 h 03 min')
    """
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class StepLog:
    """A ``callback_on_step_end(pipe, step, timestep, kwargs) -> kwargs`` that logs each step's time and the ETA.

    The clock starts when the object is made (just before the pipeline call), so the first step's
    seconds include prompt encoding. The ETA is the mean step time so far times the steps left.
    ``then`` is another such callback, called after the line is logged.
    """

    def __init__(self, total: int, log: Callable[[str], None], clock: Callable[[], float] = time.perf_counter,
                 then: Callable[..., dict] | None = None):
        self.total, self.log, self.clock, self.then = total, log, clock, then
        self.started = self.last = clock()

    def __call__(self, pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        now = self.clock()
        done, total = step + 1, max(self.total, step + 1)
        tail = (f"ETA {duration((now - self.started) / done * (total - done))}" if done < total
                else f"done in {duration(now - self.started)}")
        self.log(f"step {done}/{total}: {duration(now - self.last)}, {tail}")
        self.last = now
        return kwargs if self.then is None else self.then(pipe, step, timestep, kwargs)


def step_log(total: int, log: Callable[[str], None] | None, then: Callable[..., dict] | None = None) -> StepLog | None:
    """A :class:`StepLog` when there is a log and stderr is no terminal (the progress bar's place), else None."""
    if log is None or sys.stderr.isatty():
        return None
    return StepLog(total, log, then=then)
