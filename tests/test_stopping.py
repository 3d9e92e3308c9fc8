"""Told to stop (SIGTERM, SIGHUP: ``kill``, a service manager, a scheduler's time limit), a command stops as on
Ctrl-C: no temporary left behind, a batch's report published, its workers gone, the shell's exit code. Killed
outright (SIGKILL), a batch's workers still stop on their own instead of waiting forever."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from lorabridge.formats.neutral import write_neutral
from lorabridge.stopping import wait_for_exit
from tests.fixtures.core import make_lora_model

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
# The lorabridge command, its writes slowed (a sleep per tensor stands in for a slow disk) so that it is surely
# mid-write when the signal comes.
SLOW_CLI = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as under a terminal: a test run under nohup has it ignored
    from lorabridge.io import safetensors_file
    real_write = safetensors_file.write_safetensors
    def slow_write(path, tensors, metadata=None, progress=None, **options):
        return real_write(path, tensors, metadata, progress=lambda n: time.sleep(0.02), **options)
    safetensors_file.write_safetensors = slow_write   # before any format module imports it
    from lorabridge.cli import main
    sys.argv[0] = "lorabridge"
    main()
""")


def wait_until(condition, what: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the command ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.005)


def hidden_files(folder: Path) -> list[Path]:
    """Temporaries (names starting with a dot) under ``folder``, the batch's record folder's contents aside."""
    return [p for p in folder.rglob(".*") if ".lorabridge-batch" not in p.parts]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_conversion_told_to_stop_mid_write_removes_its_temporary_and_exits_with_the_shell_s_code(tmp_path, signum):
    modules = {f"unet.mid_block.attentions.0.transformer_blocks.{i}.ff.net.2": (5120, 1280) for i in range(10)}
    source, out = tmp_path / "big.safetensors", tmp_path / "out" / "big.safetensors"
    write_neutral(make_lora_model(modules, rank=64), source)
    out.parent.mkdir()
    command = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "convert", str(source), "--to", "kohya", "-o", str(out)],
                               cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: any(p.stat().st_size for p in out.parent.glob(".*.partial")), "temporary output", command)
    command.send_signal(signum)
    _, stderr = command.communicate(timeout=60)
    assert command.returncode == 128 + signum
    assert stderr.strip().splitlines()[-1] == f"error: stopped by {signal.Signals(signum).name}"
    assert list(out.parent.iterdir()) == []


@pytest.fixture
def library(tmp_path) -> Path:
    """300 small LoRAs (hard links of one): a batch of them runs for seconds."""
    root = tmp_path / "lib"
    root.mkdir()
    write_neutral(make_lora_model(seed=3), root / "000.safetensors")
    for number in range(1, 300):
        os.link(root / "000.safetensors", root / f"{number:03d}.safetensors")
    return root


def as_under_a_terminal() -> None:
    """Ctrl-C's and the hang-up's signals at their defaults, as a command started from a terminal has them: a test
    run in the background (CI) has SIGINT ignored, and one under nohup SIGHUP; an ignored signal stays ignored."""
    for number in (signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)


def start_batch(library: Path, out: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """A batch, once it has reported its first file; with its worker processes (and their forkserver)."""
    command = subprocess.Popen([sys.executable, "-m", "lorabridge", "batch", str(library), "--to", "kohya", "-o",
                                str(out), "--jobs", "2"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               preexec_fn=as_under_a_terminal)
    wait_until(lambda: any(p.stat().st_size for p in out.glob(".lorabridge-report.jsonl.*.partial")),
               "first report line", command)
    helpers = psutil.Process(command.pid).children(recursive=True)
    assert len([p for p in helpers if "forkserver" in " ".join(p.cmdline())]) >= 3  # the server and 2 workers
    return command, helpers


def gone(processes: list[psutil.Process], timeout: float = 30) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:  # not to leave them to the next test
        process.kill()
    return not alive


@pytest.mark.slow
@pytest.mark.parametrize("whom, signum", [("command", signal.SIGTERM), ("process group", signal.SIGTERM),
                                          ("process group", signal.SIGINT)], ids=["kill", "killpg", "ctrl-c"])
def test_a_batch_told_to_stop_publishes_its_report_and_leaves_no_temporary_or_worker(tmp_path, library, whom, signum):
    out = tmp_path / "out"
    command, helpers = start_batch(library, out)
    if whom == "command":  # kill PID: the workers are not told; the batch waits for the files they convert
        command.send_signal(signum)
    else:  # a service manager stopping the whole group, or Ctrl-C in a terminal: each worker gets it too
        os.killpg(command.pid, signum)
    output, _ = command.communicate(timeout=60)
    said = "error: stopped by SIGTERM" if signum == signal.SIGTERM else "error: interrupted (Ctrl-C)"
    assert (command.returncode, output.strip().splitlines()[-1]) == (128 + signum, said), output  # the shell's codes
    assert gone(helpers)
    lines = [json.loads(line) for line in (out / "lorabridge-report.jsonl").read_text().splitlines()]
    # Every file reported once: those converted (the ones the workers held when told included), the others not
    # converted, saying why. Before, files the workers finished after the signal, or started after it (queued
    # behind theirs), were published and recorded but left out of the report.
    assert sorted(line["input"] for line in lines) == sorted(map(str, library.iterdir()))
    converted = {line["output"] for line in lines if line["status"] == "converted"}
    why = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted (Ctrl-C)"
    assert 0 < len(converted) < 300 and all(line["error"].endswith(f"not converted: the batch was {why}")
                                            for line in lines if line["status"] != "converted")
    published = {str(p) for p in out.glob("*.safetensors")}
    # a worker told too may be stopped between publishing its file and returning it: reported not converted, its
    # record "converting" (a rerun converts it again); one that was not told finishes its file and reports it
    assert published == converted if whom == "command" else published >= converted
    assert hidden_files(out) == []


@pytest.mark.slow
def test_a_batch_killed_outright_has_its_workers_stop_and_the_next_batch_removes_its_report_temporary(tmp_path, library):
    out = tmp_path / "out"
    command, helpers = start_batch(library, out)
    command.kill()
    command.communicate(timeout=60)
    assert gone(helpers)  # without the watch on the command, they wait for their next file forever
    # Only the command's own report temporary is left (SIGKILL runs no cleanup); no worker left an output's.
    assert [p.name.split(".")[1:3] for p in hidden_files(out)] == [["lorabridge-report", "jsonl"]]
    rerun = subprocess.run([sys.executable, "-m", "lorabridge", "batch", str(library), "--to", "kohya", "-o", str(out)],
                           cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert hidden_files(out) == []  # the next batch removed it: named and locked as lorabridge's temporaries are


def test_only_the_first_signal_stops_later_ones_cannot_cut_the_cleanup_short():
    probe = ("import os, signal\n"
             "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"  # as under a terminal (a test run may be under nohup)
             "from lorabridge.stopping import Stopped, stop_on_signals; stop_on_signals()\n"
             "try:\n    os.kill(os.getpid(), signal.SIGHUP)\nexcept Stopped as stop:\n    print(stop.code)\n"
             "os.kill(os.getpid(), signal.SIGTERM)\nos.kill(os.getpid(), signal.SIGHUP)\nprint('cleanup went on')")
    shown = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert (shown.returncode, shown.stdout.split("\n")[:2]) == (0, ["129", "cleanup went on"]), shown


def test_a_signal_that_was_ignored_stays_ignored():
    probe = ("import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
             "from lorabridge.stopping import stop_on_signals; stop_on_signals()\n"
             "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL)")
    shown = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True)
    assert shown.stdout.split() == ["True", "True"]  # nohup's SIGHUP still ignored; SIGTERM now stops cleanly


def test_waiting_for_a_process_returns_once_it_has_ended():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    assert psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE
    wait_for_exit(child.pid)
    assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE  # ended, not yet reaped (by child.wait)
    assert child.wait() == 0
