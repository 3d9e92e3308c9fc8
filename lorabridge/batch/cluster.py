"""Running a batch on a Dask cluster (``--dask tcp://scheduler:8786``): one task per file.

Needs ``dask.distributed`` (``pip install 'lorabridge[cluster]'``) here and lorabridge, at the same
version, on every worker. Every worker must see the inputs and ``OUT_DIR`` at the same paths as this
machine (a shared file system: NFS, Lustre, a mounted bucket): tasks carry paths, not bytes, so a
file is read once, by the worker converting it, and its output is written beside the others with
the same atomic publish and the same resume records as a local batch. Start workers with one
thread each (``dask worker tcp://scheduler:8786 --nworkers N --nthreads 1``): a worker process
converts one file at a time (see :mod:`~lorabridge.batch.work`).

Tasks publish their outputs without an fsync each; once the last has ended, every worker syncs the output's
file system (``syncfs``), as a local batch syncs this machine's at its end: each worker machine has its own page
cache. Results stream back as tasks finish (``as_completed``) into the one report. A worker that dies mid-file
leaves no partial output (outputs are published by a rename), and the scheduler itself reruns the task (up to its
``distributed.scheduler.allowed-failures``, 3 by default) before it gives up on it (``KilledWorker``), which is
reported; a task that fails for another reason than its file (a lost connection, a bug) is submitted once more,
and its second failure reported.

Before any task, every worker is asked whether it has lorabridge at this version and sees ``OUT_DIR`` and the first
input at the same paths (:func:`check_workers`): one that did not either killed its connection on the batch's first
question or converted "successfully" into a folder the submitting machine never sees. A worker that joins later (an
adaptive cluster) is asked by each task it runs: everything the batch sends goes through :func:`_worker_call`, which
any worker can unpickle, and a task converts only where lorabridge is at this version and the batch's marker in
``OUT_DIR`` is seen; elsewhere it is submitted once more, to the workers that have not refused one, then its file
reported "not converted", naming the worker and what it lacks. A stop (``--fail-fast``, a signal) starts no new task: those still queued are cancelled, those a worker holds finish and are reported (a task
that had not begun when told returns without converting). The command looks for a stop every :data:`POLL_S`
seconds, also while no task ends (a cluster without workers), and a scheduler lost mid-batch ends it in one line,
every file reported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator, Sequence

from .. import __version__
from ..errors import LoraBridgeError
from ..io.atomic import create_locked, new_temporary, sync_file_system
from ..stopping import Stopped, check_stopped
from .cores import keep_every_core_busy
from .plan import Job
from .report import Entry
from .state import STATE_DIR
from .work import NOT_RUN, Settings, convert_job, crashed, stopped_by, unrun

if TYPE_CHECKING:
    from distributed import Client, Future

CONNECT_SECONDS = 30
POLL_S = 0.1  # how often the command looks for a stop or a lost scheduler while no task ends
KILLED = "its Dask worker died each time the scheduler ran it (killed, or out of memory: KilledWorker)"
LOST = "not converted: the batch lost its Dask scheduler"


def connect(address: str) -> Client:
    """A client of the Dask scheduler at ``address``; a one-line error when dask.distributed is missing, the
    address is not one, or no scheduler answers within :data:`CONNECT_SECONDS`. Called before the batch
    writes anything, so a typo in ``--dask`` leaves no ``OUT_DIR`` and no empty report behind."""
    try:
        from distributed import Client
    except ImportError:
        raise LoraBridgeError("--dask needs dask.distributed: pip install 'lorabridge[cluster]'") from None
    _check_host(address)
    try:
        return Client(address, timeout=CONNECT_SECONDS, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise LoraBridgeError(f"cannot reach the Dask scheduler: {exc}", address) from None
    except (ValueError, TypeError) as exc:  # "missing port number in address", an unknown protocol
        raise LoraBridgeError(f"not a Dask scheduler address (tcp://HOST:PORT): {exc}", address) from None


def _check_host(address: str) -> None:
    """Refuse at once a TCP address whose port is out of range or whose host name does not resolve: the client
    would try for :data:`CONNECT_SECONDS`, then say only "timed out"."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        if scheme not in ("tcp", "tls"):
            return
        host, port = parse_host_port(location)
    except (ValueError, TypeError):  # the client says what is wrong with it
        return
    if not 0 < port < 65536:
        raise LoraBridgeError(f"not a Dask scheduler address (tcp://HOST:PORT): port {port} is not 1-65535", address)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise LoraBridgeError(f"cannot reach the Dask scheduler: cannot resolve {host!r}: "
                              f"{getattr(exc, 'strerror', None) or exc}", address) from None


REFUSED = "lorabridge: refused"  # the first item of what a worker answers when it cannot run what the batch sent


def _worker_call(refused: str = REFUSED) -> Callable[..., Any]:
    """The one function the batch sends its workers: ``call(version, "module:function", *args)`` imports lorabridge
    on the worker and calls the function if lorabridge is there at ``version``, else answers ``(REFUSED, why)``.

    Why: a worker unpickles what it is sent before running it, and one without lorabridge, sent a function or
    object of lorabridge's, drops its connection to the scheduler, reconnects and is sent it again: the batch
    waited forever (measured with a worker that joined mid-batch). This function is nested, so cloudpickle sends
    it by value, and it holds builtins only: any worker unpickles it. The batch's own objects go as their fields
    (paths and builtins), made objects again by the function called, once lorabridge is known to be there.

    Example:
        >>> call = _worker_call()
        >>> call("0.0.0-other", "os.path:exists", "/")
        ('lorabridge: refused', 'has lorabridge 0.1.0, not 0.0.0-other; install lorabridge 0.0.0-other there')
        >>> call(__version__, "os.path:exists", "/")
        True
    """
    def call(version: str, target: str, *args: Any) -> Any:
        import importlib

        try:
            found = importlib.import_module("lorabridge").__version__
        except ImportError as exc:
            return refused, f"has no lorabridge ({type(exc).__name__}: {exc}); install lorabridge {version} there"
        if found != version:
            return refused, f"has lorabridge {found}, not {version}; install lorabridge {version} there"
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)(*args)

    return call


_call = _worker_call()


def _refusal(answer: object) -> str | None:
    """Why a worker refused (its answer through :func:`_worker_call`), or None when it did not."""
    if isinstance(answer, tuple) and len(answer) == 2 and answer[0] == REFUSED:
        return str(answer[1])
    return None


def _on_every_worker(client: Client, target: str, *args: Any) -> dict[str, Any]:
    """``target(*args)`` on every worker, through :func:`_worker_call`: each worker's answer, a refusal or the
    exception it raised."""
    return client.run(_call, __version__, target, *args, on_error="return")


class Marker:
    """A file in ``OUT_DIR``'s records folder that lives as long as the batch: a worker that does not see it does
    not see ``OUT_DIR`` where this machine does (:func:`seen_by_this_worker`). Created locked, under a temporary's
    name (:func:`~lorabridge.io.atomic.new_temporary`), so one a killed batch left is removed by a later run."""

    def __init__(self, out_dir: Path):
        self.path = new_temporary(out_dir / STATE_DIR / "visible")
        self._fd: int | None = create_locked(self.path)

    def close(self) -> None:
        """Remove the marker (once; again does nothing): its batch has no task left."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None


def seen_by_this_worker(path: str) -> bool:
    """On a worker: whether it sees ``path`` (an input, or the batch's :class:`Marker`)."""
    return os.path.exists(path)


def check_workers(client: Client, out_dir: Path, source: Path | None) -> Marker:
    """Fail in one line, before any task, naming the workers that cannot run this batch: without lorabridge at
    this version, or not seeing ``out_dir`` (or ``source``, an input) at the same path as this machine. Returns the
    batch's :class:`Marker`, which its tasks look for (workers that join later are asked by each task).

    Why here and why so: a worker that lacks lorabridge dropped its connection on the batch's first question
    (a function of lorabridge it could not unpickle) and the batch waited forever; one that does not see
    ``OUT_DIR`` published each output into its own folder of that name, reported converted."""
    marker = Marker(out_dir)
    try:
        seen = _on_every_worker(client, "lorabridge.batch.cluster:seen_by_this_worker", os.fspath(marker.path))
        wrong = {address: _refusal(answer) or f"raised {type(answer).__name__}: {answer}"
                 for address, answer in seen.items() if _refusal(answer) or isinstance(answer, BaseException)}
        if wrong:
            said = "; ".join(f"{address} {why}" for address, why in sorted(wrong.items()))
            raise LoraBridgeError(f"Dask worker(s) that cannot run lorabridge {__version__}: {said}")
        blind = _not_seeing(seen)
        if blind:
            raise LoraBridgeError(f"Dask worker(s) that do not see the output directory at this path: {blind}; the "
                                  "inputs and OUT_DIR must be on a file system every worker mounts at the same path",
                                  out_dir)
        if source is not None:
            blind = _not_seeing(_on_every_worker(client, "lorabridge.batch.cluster:seen_by_this_worker",
                                                 os.fspath(source)))
            if blind:
                raise LoraBridgeError(f"Dask worker(s) that do not see this input at this path: {blind}; the inputs "
                                      "and OUT_DIR must be on a file system every worker mounts at the same path", source)
    except BaseException:
        marker.close()
        raise
    return marker


def _not_seeing(answers: dict[str, Any]) -> str:
    return ", ".join(sorted(address for address, seen in answers.items() if seen is not True))


def cluster_fills_its_cores(client: Client, files: int) -> bool:
    """Whether ``files`` tasks keep every CPU of the cluster's machines busy (:mod:`~lorabridge.batch.cores`): the
    workers of each host have, together, as many threads as that host lets them use (each worker is asked, with
    :func:`~lorabridge.batch.cores.usable_cores`). A worker that does not answer counts as a core to spare; workers
    that join later are not counted."""
    workers = client.scheduler_info()["workers"]
    answers = _on_every_worker(client, "lorabridge.batch.cores:usable_cores")  # a refusal is no int: unknown
    threads: Counter[str] = Counter()
    cores: dict[str, int | None] = {}
    for address, worker in workers.items():
        host, answer = worker["host"], answers.get(address)
        threads[host] += worker["nthreads"]
        if not isinstance(answer, int):
            cores[host] = None
        elif cores.get(host, answer) is not None:  # a host one of whose workers did not answer stays unknown
            cores[host] = answer
    return keep_every_core_busy(threads, cores, files)


def run_dask(jobs: Sequence[Job], settings: Settings, client: Client, marker: Marker,
             stop: Callable[[], bool]) -> Generator[Entry, None, None]:
    """Convert ``jobs`` on the cluster ``client`` is connected to (:func:`connect`), yielding each file's entry as
    it finishes; ``marker`` (from :func:`check_workers`) is removed and the client closed when the generator ends.
    A task refused by its worker (no lorabridge at this version, ``OUT_DIR`` not seen: a worker that joined after
    the check) is submitted once more, to the workers that have not refused one, then its file reported "not
    converted", naming the worker and why.

    ``stop()`` as for :func:`~lorabridge.batch.local.run_local`: once True, no new task starts (queued ones are
    cancelled, a task told before it began converts nothing) and the files not converted are reported so; those
    a worker is converting finish and are reported. A stop signal does the same, then is raised.
    """
    from distributed import Event, KilledWorker, as_completed

    address = client.scheduler.address if client.scheduler is not None else None
    with client, contextlib.closing(marker):
        live: dict[object, tuple[Job, int, Future]] = {}  # task key -> (job, earlier attempts, future)
        finished = as_completed(loop=client.loop)  # not default_client()'s: another Client may be the default
        told = Event(f"lorabridge-stop-{uuid.uuid4().hex}", client=client)
        why: str | None = None  # once set: no new task starts, and why the files not converted were not
        stopped: BaseException | None = None

        refusers: set[str] = set()  # workers that refused a task: a refused file is sent again only to others

        def submit(job: Job, attempt: int, workers: list[str] | None = None) -> None:
            future = client.submit(_call, __version__, "lorabridge.batch.cluster:convert_task", asdict(job),
                                   asdict(settings), os.fspath(marker.path), told.name, pure=False,
                                   workers=workers, allow_other_workers=False)
            live[future.key] = (job, attempt, future)
            finished.add(future)

        def stop_now(reason: str) -> Generator[Entry, None, None]:
            """No new task: cancel those no worker holds yet and report them; the others end on their own."""
            def not_started(keys: list, dask_scheduler=None) -> list:
                """On the scheduler: which of ``keys`` no worker has been given yet. (Nested, so pickled by value:
                a scheduler need not have lorabridge.)"""
                waiting = ("released", "waiting", "no-worker", "queued")
                return [key for key in keys if key in dask_scheduler.tasks and dask_scheduler.tasks[key].state in waiting]

            try:
                told.set()
                # Asked of the scheduler itself, after the event: a task it has not given a worker yet cannot have
                # begun, and one it gives a worker from now on finds the event set. (The client's view lags: a task
                # that had just ended looked unstarted here, was cancelled and reported "not converted".)
                queued = set(client.run_on_scheduler(not_started, list(live)))
                client.cancel([live[key][2] for key in queued])
            except Exception:  # a closed connection, a client without a scheduler: it is gone
                raise _Lost from None
            for key in queued:
                yield unrun(live.pop(key)[0], reason)

        try:
            for job in jobs:
                submit(job, 0)
            while live:
                for future in finished.next_batch(block=False) if finished.has_ready() else ():
                    if future.key not in live:  # cancelled by stop_now, reported there
                        continue
                    job, attempt, _ = live.pop(future.key)
                    if future.status == "finished":
                        try:
                            entry = future.result()  # fetched from the worker that holds it
                        except OSError:  # the connection closed under it (CommClosedError): the scheduler is gone
                            live[future.key] = (job, attempt, future)
                            raise _Lost from None
                        refused = _refusal(entry)
                        if refused is None:
                            yield entry or unrun(job, why or NOT_RUN)
                            continue
                        # A worker that cannot run the batch refuses at once and so takes task after task: sent only
                        # to the other workers, a refused file is not lost to it (measured: 163 of 405 files were,
                        # when a refused file went back to every worker).
                        holder = _holder(client, future)
                        refusers.add(holder)
                        others = sorted(set(client.scheduler_info()["workers"]) - refusers)
                        if attempt == 0 and why is None and others:
                            submit(job, 1, others)
                        else:
                            yield unrun(job, f"not converted: its Dask worker {holder} {refused}")
                    elif future.status == "cancelled":  # not by us: the scheduler is gone
                        live[future.key] = (job, attempt, future)
                        raise _Lost
                    elif isinstance(future.exception(), KilledWorker):  # the scheduler already retried it
                        yield unrun(job, KILLED)
                    elif attempt == 0 and why is None:
                        submit(job, 1)
                    else:
                        yield crashed(job, future.exception())
                if not finished.has_ready():
                    time.sleep(POLL_S)
                if client.status not in ("running", "connecting"):
                    raise _Lost
                if stopped is None:
                    try:
                        check_stopped()  # here, between files: a stop signal (deferred by run_batch) stops the batch
                    except (Stopped, KeyboardInterrupt) as exc:
                        stopped, why = exc, stopped_by(exc)
                        yield from stop_now(why)
                if why is None and stop():
                    why = NOT_RUN
                    yield from stop_now(why)
        except _Lost:
            yield from (unrun(job, LOST) for job, _, _ in live.values())
            _close_quietly(client)
            raise LoraBridgeError("lost the Dask scheduler; the files it had not reported are not converted "
                                  "(a rerun resumes)", address) from None
        # Tasks publish their outputs without an fsync each (Settings.sync_at_the_end): every worker now syncs the
        # output's file system once, as a local batch does at its end (one write-out instead of an fsync per file),
        # a stopped batch too. A worker that cannot is an error (a stopped batch still says why it stopped); one that
        # left meanwhile is not (its machine writes its page cache back).
        try:
            synced = _on_every_worker(client, "lorabridge.batch.cluster:sync_outputs", os.fspath(settings.out_dir),
                                      os.fspath(marker.path))
        except Exception as exc:  # the scheduler went away after the last task (a closed comm, a closed pool)
            if stopped is not None:
                raise stopped from None
            raise LoraBridgeError(f"cannot ask the Dask workers to sync the outputs: {exc}", settings.out_dir) from None
        if stopped is not None:
            raise stopped
        failures = [answer for answer in synced.values() if isinstance(answer, LoraBridgeError)]
        if failures:
            raise failures[0]


def _holder(client: Client, future: Future) -> str:
    """The address of the worker that ran ``future`` (it holds the result), for the report."""
    with contextlib.suppress(Exception):
        return ", ".join(client.who_has(future).get(future.key, ())) or "(gone)"
    return "(unknown)"


def _close_quietly(client: Client) -> None:
    """Close a client whose scheduler is gone without the traceback distributed logs (at ERROR) as its reconnection
    attempt is cancelled: the batch says what happened in its one line."""
    log = logging.getLogger("distributed.client")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        client.close()
    finally:
        log.setLevel(level)


class _Lost(Exception):
    """The Dask scheduler is gone (its futures cancelled under us, the client no longer connected)."""


BLIND = ("does not see OUT_DIR at this path; the inputs and OUT_DIR must be on a file system every worker mounts at "
         "the same path")


def convert_task(job: dict[str, Any], settings: dict[str, Any], marker: str, told: str) -> Entry | None | tuple[str, str]:
    """A task, run through :func:`_worker_call`: :func:`~lorabridge.batch.work.convert_job` of the :class:`Job` and
    :class:`Settings` whose fields are ``job`` and ``settings`` (sent as plain fields, paths and builtins, so that
    a worker without lorabridge unpickles them too). Not where the batch has told its tasks to start no new file
    (the ``distributed.Event`` named ``told``): None, converting nothing (reported "not converted"). Refused on a
    worker that does not see ``marker`` (the batch's :class:`Marker`): it does not see ``OUT_DIR``, and would
    publish into a folder of its own."""
    from distributed import Event

    if Event(told).is_set():
        return None
    if not os.path.exists(marker):
        return REFUSED, BLIND
    return convert_job(Job(**job), Settings(**settings))


def sync_outputs(out_dir: str, marker: str) -> None:
    """On every worker once the last task has ended: put the outputs it published on the disk (``syncfs``). A
    worker that does not see the batch's ``marker`` converted nothing of it (its tasks were refused): nothing to do."""
    if os.path.exists(marker):
        sync_file_system(out_dir)
