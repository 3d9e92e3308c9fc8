"""``lorabridge batch --dask``: files as tasks on a Dask cluster (issue 14 item 3).

A ``LocalCluster`` of two worker processes, one thread each, on localhost only. Checked: the same
library gives the same report as a local batch and resumes alike; a worker killed while it converts
a file does not stop the batch, leaves no partial output, and every file is reported once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lorabridge.batch import REPORT_NAME, cluster as batch_cluster, run_batch
from lorabridge.batch.cores import usable_cores
from lorabridge.errors import LoraBridgeError
from lorabridge.report import validation_report
from tests.test_batch import big_and_small_library, converting, good_library
from tests.test_stopping import ENV, ROOT, wait_until

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
        given.append(args[3])  # the task's Settings, as fields (args: version, task, job, settings, ...)
        return real_submit(self, function, *args, **kwargs)

    def run(self, function, *args, **kwargs):
        answers = real_run(self, function, *args, **kwargs)
        runs.append((function, args, set(answers), {p.name for p in out.rglob("*.safetensors")}))
        return answers

    monkeypatch.setattr(distributed.Client, "submit", submit)
    monkeypatch.setattr(distributed.Client, "run", run)
    result = run_batch([root], out, "kohya", dask=local.scheduler_address, progress=False)
    assert result.ok and len(given) == 5 and all(settings["sync_at_the_end"] for settings in given)
    syncs = [(args[2], workers, published) for _, args, workers, published in runs
             if args[1] == "lorabridge.batch.cluster:sync_outputs"]
    every_output = {"style.safetensors", "k.safetensors", "p.safetensors", "m.safetensors", "f.safetensors"}
    assert syncs == [(os.path.abspath(out), set(client.scheduler_info()["workers"]), every_output)]


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


@pytest.mark.parametrize("address, why", [("not a url", r"not a Dask scheduler address \(tcp://HOST:PORT\): missing port number"),
                                          ("foo://x:1", r"not a Dask scheduler address \(tcp://HOST:PORT\): unknown address scheme"),
                                          ("tcp://127.0.0.1:99999", "port 99999 is not 1-65535"),
                                          ("tcp://nosuchhost.invalid:8786", "cannot resolve 'nosuchhost.invalid'")])
def test_a_bad_scheduler_address_fails_in_one_line_before_anything_is_written(tmp_path, address, why):
    """At once: before, a port out of range or a host that does not resolve took 30 s to say "timed out"."""
    good_library(tmp_path / "lib")
    with pytest.raises(LoraBridgeError, match=why):
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


def test_an_empty_scheduler_address_is_refused_not_taken_for_no_cluster(tmp_path):
    """``--dask "$SCHEDULER"`` with the variable unset: before, the batch converted on this machine without a word."""
    good_library(tmp_path / "lib")
    with pytest.raises(LoraBridgeError, match="--dask needs a scheduler address"):
        run_batch([tmp_path / "lib"], tmp_path / "out", "neutral", dask="", progress=False)
    assert not (tmp_path / "out").exists()


# Scripts a Dask worker runs as it starts (--preload), making it unlike this machine: without lorabridge; on a machine
# that does not mount the folder holding OUT_DIR (here: its os.path says nothing is there below a '/blind/').
NO_LORABRIDGE = "import sys\nsys.modules['lorabridge'] = None\n"
BLIND = ("import genericpath\nimport os.path\n\ndef dask_setup(worker):\n    real = genericpath.exists\n"
         "    genericpath.exists = os.path.exists = lambda p: '/blind/' not in str(p) and real(p)\n")


def worker_preload(tmp_path: Path, code: str) -> str:
    """A script a Dask worker runs as it starts (``--preload``): how these tests make a worker unlike this machine."""
    script = tmp_path / f"preload_{abs(hash(code))}.py"
    script.write_text(code)
    return str(script)


@pytest.mark.parametrize("preload, why", [
    (NO_LORABRIDGE,
     r"Dask worker\(s\) that cannot run lorabridge 0\.1\.0: tcp://127\.0\.0\.1:\d+ has no lorabridge "
     r"\(ModuleNotFoundError: .*\); install lorabridge 0\.1\.0 there$"),
    (BLIND,
     r"blind/out: Dask worker\(s\) that do not see the output directory at this path: tcp://127\.0\.0\.1:\d+; "),
], ids=["no lorabridge", "no OUT_DIR"])
def test_workers_that_cannot_run_the_batch_fail_it_in_one_line_before_any_task(tmp_path, preload, why):
    """Before: a worker without lorabridge dropped its connection on the batch's first question and the batch
    waited forever; one that does not see OUT_DIR converted every file into its own folder, reported converted."""
    root, out = tmp_path / "lib", tmp_path / "blind" / "out"
    good_library(root)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0", preload=[worker_preload(tmp_path, preload)]) as local:
        with pytest.raises(LoraBridgeError, match=why):
            run_batch([root], out, "kohya", dask=local.scheduler_address, progress=False)
        assert len(local.scheduler_info["workers"]) == 1  # still there
    assert not list(out.rglob("*.safetensors")) and not list(out.glob(".lorabridge-batch/.visible*"))


@pytest.mark.parametrize("preload, why", [
    (NO_LORABRIDGE,
     r"has no lorabridge \(ModuleNotFoundError: .*\); install lorabridge 0\.1\.0 there"),
    (BLIND,
     r"does not see OUT_DIR at this path; the inputs and OUT_DIR must be on a file system every worker mounts at "
     r"the same path"),
], ids=["no lorabridge", "no OUT_DIR"])
def test_a_worker_that_joins_after_the_check_and_cannot_run_the_batch_converts_nothing_and_says_why(tmp_path, preload,
                                                                                                      why):
    """An adaptive cluster adds workers mid-batch, after :func:`check_workers`. Before: one without lorabridge
    dropped its connection on its first task, reconnected, was sent it again, and the batch waited forever; one not
    seeing OUT_DIR published every file into a folder of its own, reported converted. Now each task is refused
    there (and submitted once more), and its file reported "not converted" naming the worker and what it lacks."""
    root, out = tmp_path / "lib", tmp_path / "blind" / "out"
    good_library(root)
    with distributed.LocalCluster(n_workers=0, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0", preload=[worker_preload(tmp_path, preload)]) as local:
        command = subprocess.Popen([sys.executable, "-m", "lorabridge", "batch", str(root), "--to", "kohya", "-o",
                                    str(out), "--dask", local.scheduler_address], cwd=ROOT, env=ENV,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: any(out.glob(".lorabridge-report.jsonl.*.partial")), "the batch's start", command)
        local.scale(1)  # checked with no worker: this one joins after
        output, _ = command.communicate(timeout=120)
    assert command.returncode == 1, output
    errors = [json.loads(line)["error"] for line in (out / REPORT_NAME).read_text().splitlines()]
    assert len(errors) == 5 and all(re.search(r": not converted: its Dask worker tcp://127\.0\.0\.1:\d+ " + why + "$",
                                              error) for error in errors), errors
    assert not list(out.rglob("*.safetensors")) and not list(out.glob(".lorabridge-batch/.visible*"))


def test_files_a_late_worker_refuses_go_to_the_other_workers(cluster, tmp_path, monkeypatch):
    """A worker that cannot run the batch refuses at once, and so takes task after task. Before its refused files
    went only to the others, 163 of 405 files failed with one such worker beside a good one; now none does."""
    local, client = cluster
    root, out = tmp_path / "lib", tmp_path / "blind" / "out"
    good_library(root)
    for number in range(40):
        os.link(root / "sdxl" / "deep" / "k.safetensors", root / f"k{number:02d}.safetensors")
    late, real_check, refusers = [], batch_cluster.check_workers, []

    def check_then_add_a_blind_worker(*args):
        marker = real_check(*args)  # the check done, a worker that does not see OUT_DIR joins before any task
        late.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", local.scheduler_address,
                                      "--nthreads", "1", "--no-dashboard", "--preload", worker_preload(tmp_path, BLIND)],
                                     stderr=subprocess.DEVNULL, env=ENV))
        client.wait_for_workers(3, timeout=60)
        return marker

    def holder(*args):
        refusers.append(real_holder(*args))
        return refusers[-1]

    real_holder = batch_cluster._holder
    monkeypatch.setattr(batch_cluster, "check_workers", check_then_add_a_blind_worker)
    monkeypatch.setattr(batch_cluster, "_holder", holder)
    try:
        result = run_batch([root], out, "kohya", dask=local.scheduler_address, progress=False)
    finally:
        for process in late:
            process.kill()
            process.wait()
    assert result.ok and result.count("converted") == 45, [e.error for e in result.entries if e.error]
    assert len(list(out.rglob("*.safetensors"))) == 45 and refusers and len(set(refusers)) == 1


def test_a_batch_on_a_cluster_with_no_worker_stops_at_once_when_told(tmp_path):
    """No task ever ends there; before, the command looked for a stop only when one did, and waited forever
    (SIGTERM and Ctrl-C deferred, a second signal ignored)."""
    root, out = tmp_path / "lib", tmp_path / "out"
    good_library(root)
    with distributed.LocalCluster(n_workers=0, processes=True, host="127.0.0.1", dashboard_address=":0") as local:
        command = subprocess.Popen([sys.executable, "-m", "lorabridge", "batch", str(root), "--to", "kohya", "-o",
                                    str(out), "--dask", local.scheduler_address], cwd=ROOT, env=ENV,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: any(out.glob(".lorabridge-report.jsonl.*.partial")), "the batch's start", command)
        time.sleep(1)
        command.send_signal(signal.SIGTERM)
        output, _ = command.communicate(timeout=30)
    assert (command.returncode, output.strip().splitlines()[-1]) == (143, "error: stopped by SIGTERM"), output
    errors = [json.loads(line)["error"] for line in (out / REPORT_NAME).read_text().splitlines()]
    assert len(errors) == 5 and all(e.endswith(": not converted: the batch was stopped by SIGTERM") for e in errors)
    assert not list(out.glob(".lorabridge-batch/.visible*"))  # the batch's marker goes with it


def test_fail_fast_on_dask_reports_what_its_workers_converted(cluster, tmp_path):
    """A stop cancels the tasks no worker holds; those a worker holds end and are reported as they ended. Before,
    they were cancelled from the report's point of view but converted on the workers: reported "not converted",
    published and recorded "done"."""
    local, _ = cluster
    root, out = tmp_path / "lib", tmp_path / "out"
    good_library(root)
    (root / "0bad.ckpt").write_bytes(b"broken")
    for number in range(12):
        os.link(root / "sdxl" / "deep" / "k.safetensors", root / f"k{number:02d}.safetensors")
    result = run_batch([root], out, "kohya", dask=local.scheduler_address, fail_fast=True, progress=False)
    assert not result.ok and len(result.entries) == 18
    converted = {e.output for e in result.entries if e.status == "converted"}
    assert {str(p) for p in out.rglob("*.safetensors")} == converted
    assert all(e.error.endswith("not converted: the batch stopped at an earlier failure (--fail-fast)")
               for e in result.entries if e.status == "failed" and "0bad" not in e.input)


def test_losing_the_scheduler_mid_batch_ends_it_in_one_line_with_every_file_reported(tmp_path):
    """Before: the files lost with it were "unexpected NoneType (a lorabridge bug)", and the command ended in a
    traceback (its closing sync asked a client without a scheduler)."""
    root, out = big_and_small_library(tmp_path / "lib", small=8), tmp_path / "out"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port",
                                  str(port), "--no-dashboard"], stderr=subprocess.DEVNULL, env=ENV)
    workers = None
    try:
        address = f"tcp://127.0.0.1:{port}"
        with distributed.Client(address, timeout=60) as client:
            workers = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "2",
                                        "--nthreads", "1", "--no-dashboard"], stderr=subprocess.DEVNULL, env=ENV)
            client.wait_for_workers(2, timeout=60)
        threading.Thread(target=lambda: converting(out, root / "big.safetensors") and scheduler.kill(),
                         daemon=True).start()
        with pytest.raises(LoraBridgeError, match=f"{address}: lost the Dask scheduler; the files it had not "
                                                  r"reported are not converted \(a rerun resumes\)"):
            run_batch([root], out, "neutral", dask=address, progress=False)
    finally:
        for process in (scheduler, workers):
            if process is not None:
                process.kill()
                process.wait()
    lines = [json.loads(line) for line in (out / REPORT_NAME).read_text().splitlines()]
    assert sorted(line["input"] for line in lines) == sorted(str(p) for p in root.iterdir())
    assert all(line["status"] == "converted" or line["error"].endswith("not converted: the batch lost its Dask "
                                                                       "scheduler") for line in lines)
    assert not list(out.glob(".lorabridge-batch/.visible*"))


def test_a_missing_source_does_not_fail_the_check_of_what_the_workers_see(cluster, tmp_path):
    """The workers are asked whether they see an input that exists here: before, a mistyped source named first
    made every worker "not see" it, and the whole batch was refused."""
    local, _ = cluster
    good_library(tmp_path / "lib")
    result = run_batch([tmp_path / "no-such.safetensors", tmp_path / "lib"], tmp_path / "out", "kohya",
                       dask=local.scheduler_address, progress=False)
    assert result.count("converted") == 5 and [e.error for e in result.entries if e.status == "failed"] == [
        f"{tmp_path / 'no-such.safetensors'}: no such file or directory"]
