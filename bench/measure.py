"""Run commands as child processes and measure them: wall time, peak RSS, peak anonymous RSS.

Peak RSS is the kernel's own figure (``ru_maxrss`` from ``os.wait4``). It counts the pages of
memory-mapped files a process has touched, although those are page cache, shared and dropped
for free; so anonymous memory (``RssAnon`` of ``/proc/<pid>/status``: the heap, numpy and torch
buffers) is sampled too, every few milliseconds by a thread, together with ``RssFile``.

    with Launcher() as launcher:
        run = launcher.measure(["cp", "a", "b"])
    run.wall_s, run.peak_rss_bytes, run.peak_anon_bytes
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

SAMPLE_INTERVAL_S = 0.003
STATUS_FIELDS = ("RssAnon", "RssFile")


@dataclass
class Run:
    wall_s: float
    cpu_s: float  # user + system time of the process and its threads
    returncode: int
    peak_rss_bytes: int  # ru_maxrss: everything resident, mapped file pages included
    peak_anon_bytes: int  # highest RssAnon sampled
    peak_file_bytes: int  # highest RssFile sampled (mapped file pages, shared libraries)
    samples: int
    stderr: str
    output_bytes: int = 0  # filled in by the caller that knows the output


def _status(pid: int, fields: tuple[str, ...] = STATUS_FIELDS) -> dict[str, int]:
    """``fields`` of /proc/<pid>/status in bytes ({} once the process has exited)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            text = handle.read().decode("ascii", "replace")
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            found[name] = int(value.split()[0]) * 1024
    return found


class _Sampler(threading.Thread):
    """Polls /proc/<pid>/status until told to stop, keeping the highest values."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.samples = pid, dict.fromkeys(STATUS_FIELDS, 0), 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for name, value in _status(self.pid).items():
                self.peak[name] = max(self.peak[name], value)
            self.samples += 1
            self.done.wait(SAMPLE_INTERVAL_S)


# The launcher: a small process started once, before the benchmark loads anything big. Children are
# spawned from it, because the kernel records the spawning process's peak RSS into the child's
# ru_maxrss at exec (posix_spawn runs the child in the parent's memory until then): spawned from the
# benchmark itself, every child would report the benchmark's own peak. It reads one JSON request per
# line (argv, cwd, env, stdout, stderr), replies {"pid"} once spawned and then the result.
LAUNCHER = r"""
import json, os, sys, time
for line in sys.stdin:
    job = json.loads(line)
    actions = [(os.POSIX_SPAWN_OPEN, fd, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
               for fd, path in ((1, job["stdout"]), (2, job["stderr"]))]
    os.chdir(job["cwd"])
    started = time.perf_counter()
    try:
        pid = os.posix_spawn(job["program"], job["argv"], job["env"], file_actions=actions)
    except OSError as exc:
        print(json.dumps({"error": f"cannot start {job['program']}: {exc}"}), flush=True)
        continue
    print(json.dumps({"pid": pid}), flush=True)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - started
    print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                      "returncode": os.waitstatus_to_exitcode(status), "maxrss": usage.ru_maxrss * 1024}), flush=True)
"""


class Launcher:
    """Runs commands from a small separate process and measures them (see :data:`LAUNCHER`).

    Example:
        >>> with Launcher() as launcher:   # doctest: +SKIP
        ...     run = launcher.measure(["cp", "a", "b"])
    """

    def __init__(self, python: str = sys.executable):
        self.process = subprocess.Popen([python, "-S", "-I", "-c", LAUNCHER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> "Launcher":
        return self

    def __exit__(self, *exc) -> None:
        self.process.stdin.close()
        self.process.wait()

    def own_rss(self) -> int:
        """The launcher's resident memory: a floor under every child's ru_maxrss."""
        return _status(self.process.pid, ("VmHWM",)).get("VmHWM", 0)

    def measure(self, argv: Sequence[str], *, cwd: str | os.PathLike = ".", env: dict[str, str] | None = None,
                log: Path | None = None) -> Run:
        """Run ``argv`` (stdout to ``log`` or /dev/null, stderr beside it) and return its :class:`Run`."""
        err_path = Path(log).with_suffix(".stderr") if log else None
        program = os.path.abspath(shutil.which(argv[0]) or argv[0])  # before the launcher's chdir to cwd
        job = {"program": program, "argv": [program, *argv[1:]], "cwd": os.fspath(Path(cwd).resolve()),
               "env": env if env is not None else dict(os.environ), "stdout": os.fspath(log or os.devnull),
               "stderr": os.fspath(err_path or os.devnull)}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        started = json.loads(self.process.stdout.readline())
        if "error" in started:
            raise OSError(started["error"])
        sampler = _Sampler(started["pid"])
        sampler.start()
        result = json.loads(self.process.stdout.readline())
        sampler.done.set()
        sampler.join()
        stderr = err_path.read_text(errors="replace")[-2000:] if err_path else ""
        return Run(result["wall_s"], result["cpu_s"], result["returncode"], result["maxrss"], sampler.peak["RssAnon"],
                   sampler.peak["RssFile"], sampler.samples, stderr)
