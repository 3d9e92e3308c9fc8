"""``lorabridge batch --dask``: files as tasks on a Dask cluster (issue 14 item 3).

A ``LocalCluster`` of two worker processes, one thread each, on localhost only. Checked: the same
library gives the same report as a local batch and resumes alike; a worker killed while it converts
a file does not stop the batch, leaves no partial output, and every file is reported once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from lorabridge.batch import REPORT_NAME, cluster as batch_cluster, run_batch
from lorabridge.batch.cores import usable_cores
from lorabridge.errors import LoraBridgeError
from lorabridge.io.atomic import sync_file_system
from lorabridge.report import validation_report
from tests.test_batch import big_and_small_library, converting, good_library

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=None) as local, distributed.Client(local) as client:
        yield local, client


def test_a_library_on_dask_reports_like_a_local_batch_and_resumes(cluster, tmp_path):
    local, _ = cluster
    root = tmp_path / "lib"
    good_library(root)
    (root / "bad.ckpt").write_bytes(b"broken")
    on_dask = run_batch([root], tmp_path / "dask", "kohya", dask=local.scheduler_address, progress=False)
    on_cpu = run_batch([root], tmp_path / "local", "kohya", jobs=1, progress=False)
    assert not on_dask.ok and on_dask.count("converted") == 5 and on_dask.count("failed") == 1

    def lines(result, out):
        return sorted((Path(e.input).name, e.status, e.format, e.architecture, e.sha256,
                       e.output and os.path.relpath(e.output, out)) for e in result.entries)

    assert lines(on_dask, tmp_path / "dask") == lines(on_cpu, tmp_path / "local")
    for output in (tmp_path / "local").rglob("*.safetensors"):
        assert output.read_bytes() == (tmp_path / "dask" / output.relative_to(tmp_path / "local")).read_bytes()
    again = run_batch([root], tmp_path / "dask", "kohya", dask=local.scheduler_address, progress=False)
    assert again.count("skipped") == 5 and again.count("failed") == 1


def test_tasks_publish_without_an_fsync_each_and_every_worker_syncs_once_the_last_task_has_ended(cluster, tmp_path,
                                                                                                  monkeypatch):
    """Each worker machine writes through its own page cache: once every task has ended, the batch asks every
    worker to sync the output's file system (as a local batch syncs this machine's), instead of an fsync per file."""
    local, client = cluster
    root, out = tmp_path / "lib", tmp_path / "out"
    good_library(root)
    given, runs, real_submit, real_run = [], [], distributed.Client.submit, distributed.Client.run

    def submit(self, function, *args, **kwargs):
        given.append(args[1])  # the task's Settings
        return real_submit(self, function, *args, **kwargs)

    def run(self, function, *args, **kwargs):
        answers = real_run(self, function, *args, **kwargs)
        runs.append((function, args, set(answers), {p.name for p in out.rglob("*.safetensors")}))
        return answers

    monkeypatch.setattr(distributed.Client, "submit", submit)
    monkeypatch.setattr(distributed.Client, "run", run)
    result = run_batch([root], out, "kohya", dask=local.scheduler_address, progress=False)
    assert result.ok and len(given) == 5 and all(settings.sync_at_the_end for settings in given)
    syncs = [(args, workers, published) for function, args, workers, published in runs if function is sync_file_system]
    every_output = {"style.safetensors", "k.safetensors", "p.safetensors", "m.safetensors", "f.safetensors"}
    assert syncs == [((Path(os.path.abspath(out)),), set(client.scheduler_info()["workers"]), every_output)]


def test_a_worker_that_cannot_sync_the_outputs_fails_the_batch_in_one_line_after_every_file_is_reported(tmp_path,
                                                                                                        monkeypatch):
    """The closing sync is part of the batch: a worker whose sync fails (an I/O error, OUT_DIR not where it looks)
    fails the command with that error, once every file's line is in the report (workers here: threads of this
    process, so the failure can be arranged)."""
    from lorabridge.io import atomic

    root, out = tmp_path / "lib", tmp_path / "out"
    good_library(root)
    real = atomic._syncfs
    main = threading.main_thread()  # the command's own closing sync, in this thread, works: the workers' fails
    monkeypatch.setattr(atomic, "_syncfs", lambda fd: real(fd) if threading.current_thread() is main else -1)
    with distributed.LocalCluster(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as local:
        with pytest.raises(LoraBridgeError, match="cannot put the outputs on the disk"):
            run_batch([root], out, "kohya", dask=local.scheduler_address, progress=False)
    assert len((out / REPORT_NAME).read_text().splitlines()) == 5


def test_a_worker_killed_mid_file_leaves_no_partial_output_and_every_file_is_reported_once(cluster, tmp_path):
    local, client = cluster
    root, out = big_and_small_library(tmp_path / "lib", small=4), tmp_path / "out"
    results = []
    batch = threading.Thread(target=lambda: results.append(
        run_batch([root], out, "neutral", dask=local.scheduler_address, progress=False)))
    batch.start()
    killed = kill_the_worker_converting(client, out, root / "big.safetensors")
    batch.join(timeout=180)
    assert killed, "no worker was caught converting the big file"
    [result] = results
    assert result.ok and sorted(Path(e.input).name for e in result.entries) == sorted(p.name for p in root.iterdir())
    reported = [json.loads(line)["input"] for line in (out / REPORT_NAME).read_text().splitlines()]
    assert sorted(reported) == sorted(str(p) for p in root.iterdir())
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]  # the killed worker's temporary was removed
    for output in out.glob("*.safetensors"):
        assert validation_report(output)["valid"], output


def kill_the_worker_converting(client, out: Path, source: Path) -> bool:
    """SIGKILL the Dask worker process(es) busy while ``source`` is being converted; True if any was."""
    pids = client.run(os.getpid)
    if not converting(out, source):
        return False
    busy = [address for address, keys in client.processing().items() if keys]
    for address in busy:
        os.kill(pids[address], signal.SIGKILL)
    return bool(busy)


@pytest.mark.parametrize("address, why", [("not a url", "missing port number"), ("foo://x:1", "unknown address scheme")])
def test_a_bad_scheduler_address_fails_in_one_line_before_anything_is_written(tmp_path, address, why):
    good_library(tmp_path / "lib")
    with pytest.raises(LoraBridgeError, match=f"not a Dask scheduler address \\(tcp://HOST:PORT\\): {why}"):
        run_batch([tmp_path / "lib"], tmp_path / "out", "neutral", dask=address, progress=False)
    assert not (tmp_path / "out").exists()


def test_tasks_convert_in_one_thread_where_the_cluster_s_workers_fill_their_machine_s_cores(cluster, tmp_path, monkeypatch):
    """The fixture's two one-thread workers share this machine: they fill its cores where it lets them use at most
    two (CI), and a batch of fewer files than workers leaves one free. See lorabridge.batch.cores."""
    local, client = cluster
    client.wait_for_workers(2, timeout=60)  # the nanny's replacement for the worker an earlier test killed
    fills = usable_cores() <= 2
    assert batch_cluster.cluster_fills_its_cores(client, files=10) is fills
    assert batch_cluster.cluster_fills_its_cores(client, files=1) is False
    root = tmp_path / "lib"
    good_library(root)
    settings = []
    real_run = batch_cluster.run_dask
    monkeypatch.setattr(batch_cluster, "run_dask", lambda jobs, given, *rest: settings.append(given) or real_run(jobs, given, *rest))
    assert run_batch([root], tmp_path / "out", "kohya", dask=local.scheduler_address, progress=False).ok
    assert settings[0].helper_threads is not fills
