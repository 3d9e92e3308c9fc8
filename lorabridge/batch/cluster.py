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
cache. Results stream back as tasks finish (``as_completed``) into the one report. A task that fails for a
reason other than the file (its worker died and the scheduler gave up on it: ``KilledWorker``, a
lost connection, a bug) is submitted once more; its second failure is reported. A worker that dies
mid-file leaves no partial output (outputs are published by a rename), and the scheduler itself
reruns the tasks a lost worker held.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Callable, Generator, Sequence

from ..errors import LoraBridgeError
from ..io.atomic import sync_file_system
from ..stopping import Stopped, check_stopped
from .cores import keep_every_core_busy, usable_cores
from .plan import Job
from .report import Entry
from .work import DIED_TWICE, NOT_RUN, Settings, convert_job, crashed, stopped_by, unrun

if TYPE_CHECKING:
    from distributed import Client, Future

CONNECT_SECONDS = 30


def connect(address: str) -> Client:
    """A client of the Dask scheduler at ``address``; a one-line error when dask.distributed is missing, the
    address is not one, or no scheduler answers within :data:`CONNECT_SECONDS`. Called before the batch
    writes anything, so a typo in ``--dask`` leaves no ``OUT_DIR`` and no empty report behind."""
    try:
        from distributed import Client
    except ImportError:
        raise LoraBridgeError("--dask needs dask.distributed: pip install 'lorabridge[cluster]'") from None
    try:
        return Client(address, timeout=CONNECT_SECONDS, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise LoraBridgeError(f"cannot reach the Dask scheduler: {exc}", address) from None
    except (ValueError, TypeError) as exc:  # "missing port number in address", an unknown protocol
        raise LoraBridgeError(f"not a Dask scheduler address (tcp://HOST:PORT): {exc}", address) from None


def cluster_fills_its_cores(client: Client, files: int) -> bool:
    """Whether ``files`` tasks keep every CPU of the cluster's machines busy (:mod:`~lorabridge.batch.cores`): the
    workers of each host have, together, as many threads as that host lets them use (each worker is asked, with
    :func:`~lorabridge.batch.cores.usable_cores`). A worker that does not answer counts as a core to spare; workers
    that join later are not counted."""
    workers = client.scheduler_info()["workers"]
    answers = client.run(usable_cores, on_error="return")
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


def run_dask(jobs: Sequence[Job], settings: Settings, client: Client, stop: Callable[[], bool]) -> Generator[Entry, None, None]:
    """Convert ``jobs`` on the cluster ``client`` is connected to (:func:`connect`), yielding each file's entry as
    it finishes; the client is closed when the generator ends.

    ``stop()`` as for :func:`~lorabridge.batch.local.run_local`: once True, unfinished tasks are
    cancelled and their files reported as not converted.
    """
    from distributed import KilledWorker, as_completed

    with client:
        live: dict[object, tuple[Job, int, Future]] = {}  # task key -> (job, earlier attempts, future)
        finished = as_completed(loop=client.loop)  # not default_client()'s: another Client may be the default

        def submit(job: Job, attempt: int) -> None:
            future = client.submit(convert_job, job, settings, pure=False)
            live[future.key] = (job, attempt, future)
            finished.add(future)

        for job in jobs:
            submit(job, 0)
        for future in finished:
            job, attempt, _ = live.pop(future.key)
            if future.status == "finished":
                yield future.result()
            elif attempt == 0:
                submit(job, 1)
            elif isinstance(future.exception(), KilledWorker):
                yield unrun(job, DIED_TWICE)
            else:
                yield crashed(job, future.exception())
            try:
                check_stopped()  # here, between files: a stop signal (deferred by run_batch) ends the batch
            except (Stopped, KeyboardInterrupt) as stopped:
                # Tasks still queued are cancelled; one a worker is converting finishes there (Dask cannot stop it)
                # and publishes its output, as after --fail-fast. Every file is still reported once.
                client.cancel([future for _, _, future in live.values()])
                yield from (unrun(job, stopped_by(stopped)) for job, _, _ in live.values())
                raise
            if stop() and live:
                client.cancel([future for _, _, future in live.values()])
                yield from (unrun(job, NOT_RUN) for job, _, _ in live.values())
                break
        # Tasks publish their outputs without an fsync each (Settings.sync_at_the_end): every worker now syncs the
        # output's file system once, as a local batch does at its end (one write-out instead of an fsync per file).
        # A worker that cannot is an error; one that left meanwhile is not (its machine writes its page cache back).
        synced = client.run(sync_file_system, settings.out_dir, on_error="return")
        failures = [answer for answer in synced.values() if isinstance(answer, LoraBridgeError)]
        if failures:
            raise failures[0]
