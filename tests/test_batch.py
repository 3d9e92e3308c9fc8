"""``lorabridge batch``: a whole library in one run (issue 14 item 2).

A mixed library: SDXL LoRAs in several formats (neutral, kohya, PEFT directory, MindONE .ckpt), a
Flux.1 LoRA, a corrupt file, a .safetensors that is not a LoRA, a README, nested folders. Checked:
the report (one line per input, its fields), exit codes, the mirrored tree, resume (a rerun skips,
a changed source or changed settings are redone, a foreign output is refused), --jobs 1 and 2 write
the same bytes, --fail-fast, and two batches at once on one OUT_DIR.
"""

from __future__ import annotations

import dataclasses
import gc
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorabridge.batch import REPORT_NAME, local, run_batch, state, work
from lorabridge.batch.discover import expand_glob, find_inputs
from lorabridge.batch.plan import Job
from lorabridge.batch.report import Entry, ReportWriter
from lorabridge.batch.state import STATE_DIR, read_record, record_path
from lorabridge.batch.work import convert_job
from lorabridge.converters import convert
from lorabridge.errors import LoraBridgeError
from lorabridge.formats.neutral import read_neutral, write_neutral
from lorabridge.io import atomic
from lorabridge.io.safetensors_file import write_safetensors
from lorabridge.report import validation_report
from lorabridge.tensor import Tensor
from tests.fixtures.core import make_lora_model

ROOT = Path(__file__).resolve().parent.parent
SDXL = "stable-diffusion-xl-v1-base"
FLUX_MODULES = {"transformer.transformer_blocks.0.attn.to_q": (3072, 3072),
                "transformer.single_transformer_blocks.0.proj_out": (3072, 15360)}


def write_flux(path: Path, seed: int = 0) -> None:
    """A diffusers-layout Flux.1 LoRA (two real modules, rank 4)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (out, inp) in FLUX_MODULES.items():
        tensors[f"{name}.lora_A.weight"] = Tensor.from_numpy(rng.standard_normal((4, inp)).astype("f4"))
        tensors[f"{name}.lora_B.weight"] = Tensor.from_numpy(rng.standard_normal((out, 4)).astype("f4"))
    write_safetensors(path, tensors, {})


def good_library(root: Path) -> dict[str, tuple[str, str]]:
    """SDXL in four formats and a Flux LoRA, nested; relative path -> (detected format, architecture)."""
    (root / "sdxl" / "deep").mkdir(parents=True)
    (root / "flux").mkdir()
    write_neutral(make_lora_model(seed=1), root / "sdxl" / "style.safetensors")
    for fmt, name in [("kohya", "sdxl/deep/k.safetensors"), ("peft", "sdxl/p"), ("mindone-sgm", "sdxl/deep/m.ckpt")]:
        convert(root / "sdxl" / "style.safetensors", root / name, fmt, progress=False)
    write_flux(root / "flux" / "f.safetensors")
    return {"sdxl/style.safetensors": ("neutral", SDXL), "sdxl/deep/k.safetensors": ("kohya", SDXL),
            "sdxl/p": ("peft", SDXL), "sdxl/deep/m.ckpt": ("mindone-sgm", SDXL),
            "flux/f.safetensors": ("diffusers", "flux-1-dev")}


@pytest.fixture
def library(tmp_path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """The good library plus a corrupt file, a non-LoRA .safetensors and files that are no LoRA candidates."""
    root = tmp_path / "lib"
    good = good_library(root)
    (root / "sdxl" / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    write_safetensors(root / "vae.safetensors", {"decoder.weight": Tensor.from_numpy(np.ones((2, 2), "f4"))}, {})
    (root / "README.md").write_text("my loras")
    (root / "sdxl" / "preview.png").write_bytes(b"\x89PNG")
    return root, good


@pytest.fixture
def one_lora(tmp_path) -> Path:
    """A library folder holding one neutral SDXL LoRA, ``x.safetensors``."""
    root = tmp_path / "lib"
    root.mkdir()
    write_neutral(make_lora_model(seed=1), root / "x.safetensors")
    return root


def report_of(out: Path) -> dict[str, dict]:
    lines = (out / REPORT_NAME).read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert len({e["input"] for e in entries}) == len(entries), "an input reported twice"
    return {e["input"]: e for e in entries}


def test_a_mixed_library_converts_every_lora_reports_every_candidate_and_fails_the_bad_ones(library, tmp_path):
    root, good = library
    out = tmp_path / "out"
    result = run_batch([root], out, "neutral", jobs=2, progress=False)
    assert not result.ok and result.count("converted") == 5 and result.count("failed") == 2
    report = report_of(out)
    assert sorted(report) == sorted(str(root / p) for p in [*good, "sdxl/bad.safetensors", "vae.safetensors"])
    for relative, (fmt, architecture) in good.items():
        entry = report[str(root / relative)]
        output = out / Path(relative).with_suffix(".safetensors")
        assert entry["status"] == "converted" and entry["error"] is None, entry
        assert (entry["format"], entry["architecture"], entry["output"]) == (fmt, architecture, str(output))
        assert entry["bytes"] > 0 and entry["seconds"] > 0 and len(entry["sha256"]) == 64
        assert validation_report(output)["valid"]
        assert read_neutral(output).provenance["source_sha256"] == (entry["sha256"] if fmt != "peft" else None)
    bad = report[str(root / "sdxl" / "bad.safetensors")]
    assert bad["status"] == "failed" and bad["error"].startswith(f"{root / 'sdxl' / 'bad.safetensors'}: truncated")
    vae = report[str(root / "vae.safetensors")]
    assert "none of its 1 tensor keys is a LoRA key" in vae["error"] and "\n" not in vae["error"]
    assert not (out / "sdxl" / "bad.safetensors").exists() and not (out / "vae.safetensors").exists()
    assert "7 files: 5 converted, 0 skipped (up to date), 2 failed" in result.render()


def test_the_command_exits_0_only_when_every_file_converted_and_a_rerun_skips_them(tmp_path, run_cli):
    root, out = tmp_path / "lib", tmp_path / "out"
    good_library(root)
    first = run_cli("batch", root, "--to", "kohya", "-o", out, "--jobs", "2")
    assert first.exit_code == 0, first.output
    assert first.output.startswith("5 files: 5 converted, 0 skipped (up to date), 0 failed")
    assert (out / "sdxl" / "deep" / "m.safetensors").is_file() and (out / "sdxl" / "p.safetensors").is_file()
    again = run_cli("batch", root, "--to", "kohya", "-o", out, "--jobs", "2")
    assert again.exit_code == 0 and again.output.startswith("5 files: 0 converted, 5 skipped (up to date), 0 failed")
    assert {e["status"] for e in report_of(out).values()} == {"skipped"}
    rehashed = run_cli("batch", root, "--to", "kohya", "-o", out, "--rehash")
    assert rehashed.exit_code == 0 and rehashed.output.startswith("5 files: 0 converted, 5 skipped (up to date)")
    (root / "junk.ckpt").write_bytes(b"not a checkpoint")
    failing = run_cli("batch", root, "--to", "kohya", "-o", out)
    assert failing.exit_code == 1 and "1 failed" in failing.output and "junk.ckpt" in failing.output


def test_a_changed_source_and_changed_settings_are_redone_and_foreign_outputs_are_refused(tmp_path):
    root, out = tmp_path / "lib", tmp_path / "out"
    good_library(root)
    run_batch([root], out, "kohya", jobs=1, progress=False)
    write_flux(root / "flux" / "f.safetensors", seed=7)  # changed source
    result = run_batch([root], out, "kohya", jobs=1, progress=False)
    assert {Path(e.input).name: e.status for e in result.entries}["f.safetensors"] == "converted"
    assert result.count("skipped") == 4 and result.ok
    record = read_record(out.resolve(), (out / "flux" / "f.safetensors").resolve())
    assert record.status == "done" and record.settings == {"to": "kohya", "from": None, "options": {}}
    changed = run_batch([root], out, "kohya", jobs=1, progress=False, dtype="fp16")  # changed settings
    assert changed.count("converted") == 5 and changed.ok
    foreign = out / "sdxl" / "style.safetensors"
    foreign.write_bytes(foreign.read_bytes())  # touched since the batch wrote it: no longer known as its own
    refused = run_batch([root], out, "kohya", jobs=1, progress=False, dtype="fp16")
    entry = next(e for e in refused.entries if e.output == str(foreign))
    assert entry.status == "failed" and entry.error == f"{foreign}: output exists; pass --force to replace it"
    forced = run_batch([root], out, "kohya", jobs=1, progress=False, dtype="fp16", force=True)
    assert forced.count("converted") == 5


def bytes_read(action) -> int:
    """How many bytes this process read (``read``-family calls, page cache included) while ``action()`` ran."""
    before = psutil.Process().io_counters().read_chars
    action()
    return psutil.Process().io_counters().read_chars - before


def test_a_rerun_takes_an_unchanged_sources_sha256_from_its_record_without_reading_it(tmp_path, monkeypatch):
    """Inode, size, modification and change time unchanged since the source was hashed: its bytes are too, and a
    library's rerun costs a stat per file instead of reading every source again. ``--rehash`` reads them anyway."""
    monkeypatch.setattr(state, "RACY_NS", 0)  # the source was written a moment ago (see the racy test below)
    source, out = tmp_path / "f.safetensors", tmp_path / "out"
    write_flux(source)
    job = Job(source, out / "f.safetensors", source.stat().st_size)
    assert convert_job(job, work.Settings(out, "kohya")).status == "converted"
    info = source.stat()
    assert read_record(out, job.output).source_stamp == [info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]
    entries = []
    read = bytes_read(lambda: entries.append(convert_job(job, work.Settings(out, "kohya"))))
    assert read < info.st_size // 4, f"read {read} bytes of a {info.st_size}-byte source that did not change"
    assert (entries[0].status, entries[0].sha256) == ("skipped", hashlib.sha256(source.read_bytes()).hexdigest())
    read = bytes_read(lambda: entries.append(convert_job(job, work.Settings(out, "kohya", rehash=True))))
    assert read >= info.st_size and entries[1].status == "skipped"


def test_a_source_rewritten_with_its_size_and_mtime_put_back_is_still_seen_changed(tmp_path, monkeypatch):
    """What ``touch -d`` or a copy that keeps times can put back, the change time cannot: it moves on every write
    and on every utime, so the source is hashed again, found changed and converted again."""
    monkeypatch.setattr(state, "RACY_NS", 0)
    source, out = tmp_path / "f.safetensors", tmp_path / "out"
    write_flux(source)
    job, settings = Job(source, out / "f.safetensors", source.stat().st_size), work.Settings(out, "kohya")
    assert convert_job(job, settings).status == "converted"
    info = source.stat()
    time.sleep(0.05)  # past a tick of the kernel's coarse clock (1-10 ms), which file times come from
    replacement = tmp_path / "g.safetensors"
    write_flux(replacement, seed=7)
    source.write_bytes(replacement.read_bytes())  # in place: same inode, same size
    os.utime(source, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert (source.stat().st_size, source.stat().st_mtime_ns) == (info.st_size, info.st_mtime_ns)
    entry = convert_job(job, settings)
    assert (entry.status, entry.sha256) == ("converted", hashlib.sha256(replacement.read_bytes()).hexdigest())


def test_a_source_changed_just_before_it_was_hashed_gets_no_stamp_until_a_later_run_hashes_it_again(tmp_path, monkeypatch):
    """A source changed less than RACY_NS before its hash could be written again within the same clock tick with
    all four the same ("racily clean", as git calls it): its record keeps no stamp, so the next run hashes it, and
    that run, the change now old, records the stamp that spares the runs after it."""
    source, out = tmp_path / "f.safetensors", tmp_path / "out"
    write_flux(source)
    job, settings = Job(source, out / "f.safetensors", source.stat().st_size), work.Settings(out, "kohya")
    assert convert_job(job, settings).status == "converted"
    assert read_record(out, job.output).source_stamp is None
    size = source.stat().st_size
    assert bytes_read(lambda: convert_job(job, settings)) >= size  # hashed: still racy, no stamp recorded
    monkeypatch.setattr(state, "RACY_NS", 0)  # as if the change were old now
    assert bytes_read(lambda: convert_job(job, settings)) >= size  # hashed, up to date, and the stamp recorded
    assert read_record(out, job.output).source_stamp is not None
    assert bytes_read(lambda: convert_job(job, settings)) < size // 4


def test_a_rerun_of_an_unchanged_library_decides_in_the_command_and_hands_no_file_to_a_worker(tmp_path, monkeypatch):
    """Up to date by its record alone (stamp, settings, output as recorded): the command reports the file skipped
    itself; a file whose source, settings or output changed, or any file with --force or --rehash, goes to a worker."""
    monkeypatch.setattr(state, "RACY_NS", 0)
    root, out = tmp_path / "lib", tmp_path / "out"
    good_library(root)
    jobs = {}
    for source in sorted(p for p in root.rglob("*") if p.is_file() and "p" not in p.relative_to(root).parts) + [root / "sdxl" / "p"]:
        job = Job(source, out / source.relative_to(root).with_suffix(".safetensors"), source.stat().st_size)
        assert convert_job(job, work.Settings(out, "kohya")).status == "converted"
        jobs[source.name] = job
    handed = []
    real = local.run_local
    monkeypatch.setattr(local, "run_local", lambda to_run, *rest: handed.append([j.source.name for j in to_run]) or
                        real(to_run, *rest))
    result = run_batch([root], out, "kohya", jobs=1, progress=False)
    assert result.ok and result.count("skipped") == 5 and handed == [["p"]]  # the PEFT folder: hashed every time
    entry = next(e for e in result.entries if e.input == str(jobs["k.safetensors"].source))
    assert (entry.format, entry.architecture, entry.sha256) == (
        "kohya", SDXL, hashlib.sha256(jobs["k.safetensors"].source.read_bytes()).hexdigest())
    settings = work.Settings(out.resolve(), "kohya")
    job = Job(jobs["k.safetensors"].source.resolve(), jobs["k.safetensors"].output.resolve(), 1)
    assert work.unchanged_entry(job, settings) is not None
    for other in [work.Settings(out.resolve(), "kohya", force=True), work.Settings(out.resolve(), "kohya", rehash=True),
                  work.Settings(out.resolve(), "kohya", options=(("dtype", "fp16"),)),
                  work.Settings(out.resolve(), "diffusers")]:
        assert work.unchanged_entry(job, other) is None, other
    job.output.write_bytes(job.output.read_bytes())  # the output touched since: not the batch's own any more
    assert work.unchanged_entry(job, settings) is None


def test_a_new_stamp_never_replaces_a_record_another_batch_wrote_while_the_source_was_hashed(tmp_path, monkeypatch):
    """Keeping the stamp of a source found up to date by hashing writes its record again: not if another batch on the
    same OUT_DIR replaced the record meanwhile (its record describes the output now there; ours would not)."""
    source, out = tmp_path / "f.safetensors", tmp_path / "out"
    write_flux(source)
    job, settings = Job(source, out / "f.safetensors", source.stat().st_size), work.Settings(out, "kohya")
    assert convert_job(job, settings).status == "converted"  # no stamp: the source was written a moment ago
    monkeypatch.setattr(state, "RACY_NS", 0)
    theirs = state.Record("elsewhere", "cd" * 32, settings.recorded(), "done", state.stamp(job.output), "kohya")
    real = work.source_digest
    monkeypatch.setattr(work, "source_digest", lambda path: state.write_record(out, job.output, theirs) or real(path))
    assert convert_job(job, settings).status == "skipped"
    assert read_record(out, job.output) == theirs


def test_a_neutral_output_whose_manifest_records_the_source_sha256_is_up_to_date_without_a_record(tmp_path):
    root, out = tmp_path / "lib", tmp_path / "out"
    good_library(root)
    out.mkdir()
    convert(root / "flux" / "f.safetensors", out / "f.safetensors", "neutral", progress=False)  # `lorabridge convert`
    result = run_batch([root / "flux"], out, "neutral", jobs=1, progress=False)
    assert [e.status for e in result.entries] == ["skipped"]
    assert result.entries[0].architecture == "flux-1-dev"


def test_on_this_machine_outputs_are_synced_once_at_the_end_not_each(tmp_path, monkeypatch):
    """A local batch publishes each output without an fsync (the file system is synced once when the batch
    ends: one write-out of everything instead of an fsync per file waiting on the disk); a single file fsyncs
    its output (on Dask, see test_batch_dask: every worker syncs once the last task has ended)."""
    root = tmp_path / "lib"
    good_library(root)
    fsyncs, started, real = [], [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real(fd))
    real_start = atomic._start_write_out
    monkeypatch.setattr(atomic, "_start_write_out", lambda fd: started.append(fd) or real_start(fd))
    source = root / "sdxl" / "style.safetensors"
    for at_the_end, expected in ((True, 0), (False, 2)):  # the file, then its directory
        fsyncs.clear(), started.clear()
        out = tmp_path / f"out-{at_the_end}"
        entry = work.convert_job(Job(source, out / "style.safetensors", 0), work.Settings(out, "kohya", sync_at_the_end=at_the_end))
        assert entry.status == "converted" and len(fsyncs) == expected
        assert len(started) == (1 if at_the_end else 0), "without an fsync, its write to the disk is started, not waited for"
    synced, settings = [], []
    monkeypatch.setattr("lorabridge.batch.run.sync_file_system", synced.append)
    real_run = local.run_local
    monkeypatch.setattr(local, "run_local", lambda jobs, given, *rest: settings.append(given) or real_run(jobs, given, *rest))
    result = run_batch([root], tmp_path / "batch", "kohya", jobs=1, progress=False)
    assert result.ok and synced == [tmp_path / "batch"] and settings[0].sync_at_the_end


def test_an_output_cut_short_by_a_power_cut_before_the_closing_sync_is_converted_again(tmp_path):
    """Until the batch's closing sync a power cut can leave a published output short or empty; its record knows
    the size it was published with, so the rerun converts it again instead of refusing it as foreign."""
    root, out = tmp_path / "lib", tmp_path / "out"
    good_library(root)
    run_batch([root], out, "neutral", jobs=1, progress=False)
    short = out / "sdxl" / "deep" / "m.safetensors"
    whole = short.read_bytes()
    cut_short_by_a_power_cut(out, short, whole[:len(whole) // 3])
    cut_short_by_a_power_cut(out, out / "flux" / "f.safetensors", b"")
    rerun = run_batch([root], out, "neutral", jobs=1, progress=False)
    statuses = {Path(e.output).name: e.status for e in rerun.entries}
    assert statuses["m.safetensors"] == statuses["f.safetensors"] == "converted" and rerun.ok
    assert len(short.read_bytes()) == len(whole) and read_neutral(short).modules and read_neutral(out / "flux" / "f.safetensors").modules


def cut_short_by_a_power_cut(out: Path, output: Path, left: bytes) -> None:
    """``output`` as a power cut before the batch's closing sync leaves it: its inode, with fewer bytes, and the
    change time the journal last wrote, which is no later than the one its record kept at publication (here:
    the record is given the truncation's, as the test cannot set a file's change time back)."""
    output.write_bytes(left)
    record = read_record(out, output)
    state.write_record(out, output, dataclasses.replace(record, stamp=[*record.stamp[:3], os.stat(output).st_ctime_ns]))


def test_a_record_from_before_stamps_held_inode_and_change_time_is_honoured_and_brought_up_to_date(tmp_path, one_lora):
    out = tmp_path / "out"
    run_batch([one_lora], out, "kohya", jobs=1, progress=False)
    output = out / "x.safetensors"
    record = read_record(out, output)
    state.write_record(out, output, dataclasses.replace(record, stamp=record.stamp[:2]))  # as written before
    assert [e.status for e in run_batch([one_lora], out, "kohya", jobs=1, progress=False).entries] == ["skipped"]
    assert read_record(out, output).stamp == record.stamp


def test_a_shorter_file_the_user_put_in_an_outputs_place_is_foreign_not_cut_short(tmp_path, one_lora):
    """Before, any output shorter than published was taken for one cut short by a power cut, and replaced without
    --force: a user's file copied over it (same inode, a later change time) or renamed into its place."""
    out = tmp_path / "out"
    run_batch([one_lora], out, "kohya", jobs=1, progress=False)
    output = out / "x.safetensors"
    for put_there in (lambda: output.write_bytes(b"my notes"),
                      lambda: (tmp_path / "mine").write_bytes(b"my notes") or os.replace(tmp_path / "mine", output)):
        put_there()
        rerun = run_batch([one_lora], out, "kohya", jobs=1, progress=False)
        assert [e.error for e in rerun.entries] == [f"{output}: output exists; pass --force to replace it"]
        assert output.read_bytes() == b"my notes"


def test_workers_that_keep_every_core_busy_start_no_helper_threads_and_write_the_same_bytes(tmp_path, monkeypatch):
    """Where the files a batch converts at once keep every core busy, a file's hashes and NaN/Inf scan run in its
    worker's one thread (lorabridge.io.streaming.one_thread): same output, same verdicts. With a core to spare
    (fewer jobs, or fewer files, than cores), helper threads."""
    root = tmp_path / "lib"
    good_library(root)
    monkeypatch.setattr("lorabridge.manifest.now_utc", lambda: "2026-01-01T00:00:00Z")
    source = root / "sdxl" / "deep" / "m.ckpt"  # -> neutral: the source's hash, the tensors' hash and the scan
    started = []
    real_start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda thread: started.append(thread.name) or real_start(thread))
    written = {}
    for helpers in (True, False):
        started.clear()
        out = tmp_path / f"out-{helpers}"
        entry = convert_job(Job(source, out / "m.safetensors", 0), work.Settings(out, "neutral", helper_threads=helpers))
        assert entry.status == "converted" and entry.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
        assert bool(started) == helpers, started
        written[helpers] = (out / "m.safetensors").read_bytes()
    assert written[True] == written[False]
    settings = []
    real_run = local.run_local
    monkeypatch.setattr(local, "run_local", lambda jobs, given, *rest: settings.append(given) or real_run(jobs, given, *rest))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for name, (library, jobs) in enumerate([(root, None), (root, 2), (root, 1), (root / "flux", None)]):
        assert run_batch([library], tmp_path / f"batch-{name}", "neutral", jobs=jobs, progress=False).ok
    assert [given.helper_threads for given in settings] == [False, False, True, True]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_the_default_jobs_are_the_cpus_this_process_may_run_on_not_the_machines():
    """Under ``taskset -c 0`` (or a container's cpuset) a batch starts one worker, not one per CPU of the machine."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from lorabridge.batch.cores import usable_cores; print(usable_cores(), os.cpu_count())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.split()[0] == "1"


def test_jobs_1_and_jobs_2_write_the_same_bytes(tmp_path):
    root = tmp_path / "lib"
    good_library(root)
    run_batch([root], tmp_path / "one", "kohya", jobs=1, progress=False)
    run_batch([root], tmp_path / "two", "kohya", jobs=2, progress=False)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.safetensors"))
    assert len(files) == 5
    for relative in files:
        assert (tmp_path / "one" / relative).read_bytes() == (tmp_path / "two" / relative).read_bytes(), relative


def test_fail_fast_starts_no_new_file_after_a_failure_and_still_reports_every_file(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    (root / "a_bad.safetensors").write_bytes(b"garbage")
    for i in range(5):
        write_flux(root / f"f{i}.safetensors", seed=i)
    result = run_batch([root], tmp_path / "out", "neutral", jobs=1, fail_fast=True, progress=False)
    # the first file fails; the one queued behind it in the worker (before: converted) does not start either
    assert [e.status for e in result.entries] == ["failed"] * 6 and not result.ok
    assert sum("stopped at an earlier failure (--fail-fast)" in (e.error or "") for e in result.entries) == 5
    assert not list((tmp_path / "out").glob("*.safetensors"))
    summary = result.render().splitlines()  # the one real failure listed, the files not started counted apart
    assert summary[0].startswith("6 files: 0 converted, 0 skipped (up to date), 6 failed (5 of them not converted "
                                 "as the batch stopped); ")
    assert summary[1].startswith(f"failed: {root / 'a_bad.safetensors'}: ") and "f0.safetensors" not in summary[1]
    assert summary[2] == "not converted: the batch stopped at an earlier failure (--fail-fast)"


def test_inputs_are_files_directories_and_globs_each_once_and_the_output_tree_is_never_read(tmp_path):
    root = tmp_path / "lib"
    good_library(root)
    (root / "notes.txt").write_text("x")
    (root / ".hidden.safetensors").write_bytes(b"x")
    out = root / "converted"  # inside the source tree
    (out / "sdxl").mkdir(parents=True)
    (out / "sdxl" / "style.safetensors").write_bytes(b"old")
    found = find_inputs([root, root / "sdxl" / "style.safetensors", str(root / "**" / "*.ckpt"), root / "notes.txt",
                      str(root / "*.nothing")], exclude=[out])
    assert [str(f.path.relative_to(root)) for f in found if f.error is None] == [
        "flux/f.safetensors", "sdxl/deep/k.safetensors", "sdxl/deep/m.ckpt", "sdxl/p", "sdxl/style.safetensors",
        "notes.txt"]  # named explicitly: an input (it fails as not a LoRA file)
    assert [f.error for f in found if f.error] == ["no file matches this pattern"]
    assert found[2].relative == Path("sdxl/deep/m.ckpt")


def test_a_library_folder_holding_a_unet_adapter_is_walked_not_taken_for_one_adapter(library, tmp_path):
    """A folder of per-component adapters (``unet/``, ``text_encoder/``...) is one input only while it holds
    nothing else to convert; before, a library folder with a ``unet/`` adapter in it was one "adapter" whose
    other LoRAs were neither converted nor reported."""
    root, _ = library
    loras = tmp_path / "loras"
    shutil.copytree(root / "sdxl" / "p" / "unet", loras / "unet")
    (loras / "styles").mkdir()
    shutil.copy(root / "sdxl" / "deep" / "m.ckpt", loras / "styles" / "b.ckpt")
    shutil.copy(root / "sdxl" / "deep" / "k.safetensors", loras / "c.safetensors")
    (loras / "README.md").write_text("not a LoRA")
    assert relatives([loras]) == ["c.safetensors", "styles/b.ckpt", "unet"]
    result = run_batch([loras], tmp_path / "out", "neutral", jobs=1, progress=False)
    assert result.ok and [e.format for e in sorted(result.entries, key=lambda e: e.input)] == [
        "kohya", "mindone-sgm", "peft"]
    # an adapter folder of components, with only what such a folder holds beside them, stays one input
    assert sorted(p.name for p in (root / "sdxl" / "p").iterdir()) == ["text_encoder", "text_encoder_2", "unet"]
    (root / "sdxl" / "p" / "README.md").write_text("a model card")
    (root / "sdxl" / "p" / "samples").mkdir()  # a folder without LoRAs beside the components: still one adapter
    (root / "sdxl" / "p" / "samples" / "1.png").write_bytes(b"png")
    assert [str(f.relative) for f in find_inputs([root / "sdxl"]) if f.relative.parts[0] == "p"] == ["p"]


def test_a_glob_reaching_into_a_peft_adapter_folder_takes_the_folder_whole(library):
    """``lib/**/*.safetensors`` matches an adapter's ``unet/adapter_model.safetensors``; converted alone it has no
    config, so no alpha (before: assumed = rank, silently). The folder is the input, as a walk takes it; a path
    that names the inside of an adapter literally is taken as named."""
    root, _ = library
    named = [str(f.relative) for f in find_inputs([str(root / "**" / "*.safetensors")])]
    assert "sdxl/p" in named and not any(name.startswith("sdxl/p/") for name in named)
    inside = find_inputs([str(root / "sdxl" / "p" / "unet" / "*.safetensors")])
    assert [f.path for f in inside] == [root / "sdxl" / "p" / "unet" / "adapter_model.safetensors"]


def hub_mirror(root: Path) -> None:
    """A hub mirror's layout: one folder per repository, each holding a file of the same name."""
    for seed, repo in enumerate(["repoA", "repoB"]):
        (root / repo).mkdir(parents=True)
        write_neutral(make_lora_model(seed=seed), root / repo / "pytorch_lora_weights.safetensors")
    write_neutral(make_lora_model(seed=3), root / "loose.safetensors")


def relatives(sources) -> list[str]:
    return sorted(str(f.relative) for f in find_inputs(sources))


def test_outputs_mirror_the_sources_below_the_folder_holding_them_all_so_a_shells_glob_and_ours_agree(
        tmp_path, monkeypatch):
    """``batch lib/*`` (the shell expands it) and ``batch 'lib/*'`` (we do) name the same files, so they must put
    them in the same places; before, the shell's version mirrored each folder's contents into OUT_DIR itself, and
    every repository's ``pytorch_lora_weights.safetensors`` but the first failed on one output."""
    monkeypatch.chdir(tmp_path)
    hub_mirror(Path("lib"))
    whole = ["loose.safetensors", "repoA/pytorch_lora_weights.safetensors", "repoB/pytorch_lora_weights.safetensors"]
    assert relatives(["lib"]) == whole  # one folder: its contents
    assert relatives(["lib/*"]) == relatives(sorted(glob.glob("lib/*"))) == whole
    assert relatives(["lib/repoB", "lib/repoA"]) == whole[1:]  # several: each under its own name, in any order
    assert relatives(["lib/repoA/pytorch_lora_weights.safetensors", "lib/repoB/pytorch_lora_weights.safetensors"]) \
        == whole[1:]
    assert relatives(["lib/repoA", "lib"]) == relatives(["lib", "lib/repoA"]) == whole  # each file once, one place
    assert relatives(["lib/repoA", str(tmp_path / "lib" / "repoB")]) == whole[1:]  # relative and absolute alike
    assert relatives(["lib/repoA/pytorch_lora_weights.safetensors"]) == ["pytorch_lora_weights.safetensors"]
    # a source that names nothing moves no other's output
    assert relatives(["lib/repoA", "/no/such.ckpt", "/no/such/*.ckpt"]) == [
        "*.ckpt", "pytorch_lora_weights.safetensors", "such.ckpt"]
    result = run_batch(sorted(glob.glob("lib/*")), Path("out"), "kohya", jobs=1, progress=False)
    assert result.ok and sorted(str(p.relative_to("out")) for p in Path("out").rglob("*.safetensors")) == whole
    # a glob's matches keep their paths below its fixed part: one that matches later moves none of the others
    assert relatives(["lib/**/pytorch_lora_weights.safetensors"]) == whole[1:]
    shutil.rmtree("lib/repoB")
    assert relatives(["lib/**/pytorch_lora_weights.safetensors"]) == whole[1:2]  # before: its name alone
    # an adapter named from inside it: below the folder it is in, never "..", which put the output above OUT_DIR
    convert(Path("lib/loose.safetensors"), Path("lib/p"), "peft", progress=False)
    monkeypatch.chdir(tmp_path / "lib" / "p" / "unet")
    assert relatives([".."]) == ["p"]



def test_symbolic_link_loops_are_walked_once_and_globbed_once(tmp_path):
    """``glob.glob`` follows links back to a parent until the path is 40 links deep: two in one folder make 2^40 paths."""
    root = tmp_path / "lib"
    (root / "sub").mkdir(parents=True)
    write_neutral(make_lora_model(seed=1), root / "sub" / "a.safetensors")
    (root / "sub" / "up").symlink_to("..")
    (root / "again").symlink_to(".")
    (root / "and-again").symlink_to(".")
    (root / "loop.ckpt").symlink_to("loop.ckpt")  # itself: stat says "too many levels of symbolic links"
    for sources, expected in [([root], ["loop.ckpt", "sub/a.safetensors"]),
                              ([str(root / "**" / "*.safetensors")], ["sub/a.safetensors"]),
                              ([str(root / "**")], ["loop.ckpt", "sub/a.safetensors"])]:
        found = find_inputs(sources)
        assert sorted(str(f.path.relative_to(root)) for f in found) == expected, sources
        assert all(f.error is None for f in found)


def test_a_library_nested_deeper_than_python_recursion_is_walked(tmp_path):
    deep = tmp_path / "lib"
    for _ in range(sys.getrecursionlimit() + 100):  # Path.mkdir(parents=True) recurses itself
        deep = deep / "d"
        deep.mkdir(parents=True)
    (deep / "a.ckpt").write_bytes(b"x")
    try:
        assert [f.path for f in find_inputs([tmp_path / "lib"])] == [deep / "a.ckpt"]
        assert [f.path for f in find_inputs([str(tmp_path / "lib" / "**" / "*.ckpt")])] == [deep / "a.ckpt"]
    finally:  # removed here: shutil.rmtree, which pytest cleans its old temporaries with, recurses too
        (deep / "a.ckpt").unlink()
        while deep != tmp_path:
            deep.rmdir()
            deep = deep.parent


@pytest.mark.parametrize("pattern", ["*", "**", "**/*.ckpt", "*/*", "sub/*/x.*", ".h*", "**/.h*", "sub/**/[xy].ckpt",
                                     "sub/deep", "no/**/x.ckpt"])
def test_globs_match_what_glob_glob_matches_where_there_is_no_loop(tmp_path, pattern):
    for name in ["a.ckpt", ".hidden.ckpt", "sub/x.ckpt", "sub/y.ckpt", "sub/deep/x.pt", "sub/deep/z.ckpt",
                 "sub/.h/x.ckpt", "other/x.bin"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "linked").symlink_to(tmp_path / "sub")
    expected = {os.path.realpath(p) for p in glob.glob(str(tmp_path / pattern), recursive=True)}
    assert {os.path.realpath(p) for p in expand_glob(str(tmp_path / pattern))} == expected  # "linked/x" is "sub/x"



NAME = st.sampled_from(["a", "b.ckpt", ".h", "c.pt", "[x]", "d"])
PART = st.sampled_from(["*", "?", "**", "*.ckpt", "[ab]*", ".*", "[!a]", "a", "d", "[x]", "*[", ""])


@settings(max_examples=200, deadline=None)
@given(paths=st.lists(st.lists(NAME, min_size=1, max_size=3), max_size=8),
       pattern=st.lists(PART, min_size=1, max_size=4))
def test_fuzzed_globs_over_fuzzed_trees_match_what_glob_glob_matches(paths, pattern):
    with tempfile.TemporaryDirectory() as top:
        for parts in paths:
            folder = Path(top, *parts[:-1])
            if any(p.is_file() for p in [folder, *folder.parents] if str(p).startswith(top)):
                continue  # a name already taken by a file
            folder.mkdir(parents=True, exist_ok=True)
            if not Path(folder, parts[-1]).is_dir():
                Path(folder, parts[-1]).write_bytes(b"x")
        text = os.path.join(top, *pattern)
        # glob's "missing/**" yields "missing/" (it does not check that a folder before ** exists): not a match
        expected = {os.path.realpath(p) for p in glob.glob(text, recursive=True) if os.path.lexists(p)}
        assert {os.path.realpath(p) for p in expand_glob(text)} == expected, text

def test_lora_named_entries_that_are_not_files_are_reported_not_left_out(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    write_neutral(make_lora_model(seed=1), root / "good.safetensors")
    (root / "moved.safetensors").symlink_to(tmp_path / "gone.safetensors")
    os.mkfifo(root / "pipe.ckpt")
    (root / "pipe.txt").symlink_to("nowhere")  # not LoRA-named: not a candidate, as a README is not
    result = run_batch([root], tmp_path / "out", "kohya", jobs=1, progress=False)
    errors = {Path(e.input).name: e.error for e in result.entries}
    assert errors == {"good.safetensors": None,
                      "moved.safetensors": f"{root / 'moved.safetensors'}: is a broken symbolic link (to "
                                           f"{str(tmp_path / 'gone.safetensors')!r})",
                      "pipe.ckpt": f"{root / 'pipe.ckpt'}: is a FIFO (named pipe), not a regular file; refusing to read it"}
    assert not result.ok


def test_names_with_newlines_or_bytes_that_are_not_utf8_convert_and_report_as_json(tmp_path):
    """A library copied from a Latin-1 system keeps names that are not UTF-8: Python holds their bytes as lone
    surrogates, which neither a UTF-8 report line nor a manifest can take as they are."""
    root = tmp_path / "lib"
    root.mkdir()
    latin1 = os.fsdecode(b"caf\xe9.safetensors")
    for name in [latin1, "new\nline.safetensors", "ローラ.safetensors"]:
        write_neutral(make_lora_model(seed=1), root / name)
    result = run_batch([root], tmp_path / "out", "neutral", jobs=1, progress=False)
    assert result.ok and result.count("converted") == 3, result.render()
    lines = (tmp_path / "out" / REPORT_NAME).read_bytes().decode("utf-8").splitlines()
    reported = {os.fsencode(json.loads(line)["input"]) for line in lines}
    assert reported == {os.fsencode(root / name) for name in [latin1, "new\nline.safetensors", "ローラ.safetensors"]}
    assert any("ローラ" in line for line in lines)  # readable where the name is UTF-8
    assert read_neutral(tmp_path / "out" / latin1).provenance["source_file"] == "caf\ufffd.safetensors"


def test_the_report_never_replaces_an_input_an_output_a_device_or_a_file_that_is_not_a_report(tmp_path, one_lora):
    root, out = one_lora, tmp_path / "out"
    (tmp_path / "src" / "linked").mkdir(parents=True)
    shutil.copy(root / "x.safetensors", tmp_path / "src" / "linked" / "y.safetensors")
    convert(root / "x.safetensors", root / "adapter", "peft", progress=False)
    lora = (root / "x.safetensors").read_bytes()
    (tmp_path / "notes.txt").write_text("mine")
    refused = {root / "x.safetensors": "--report names an input of this batch; refusing to replace it",
               root / "adapter" / "report.jsonl": "--report names a file inside an input adapter folder",
               Path("/dev/null"): "--report names a character device, not a regular file; refusing to replace it",
               out / "x.safetensors": "--report names one of this batch's outputs; refusing to write there",
               # spelled otherwise: before, "out/sub/../x.safetensors" or a link to OUT_DIR replaced that output
               out / "sub" / ".." / "x.safetensors": "--report names one of this batch's outputs",
               tmp_path / "link" / "x.safetensors": "--report names one of this batch's outputs",
               out / STATE_DIR / "r.jsonl": "--report names a path inside one of this batch's outputs",
               # before, found out only when the report was renamed over OUT_DIR, after every file had converted
               out: "--report names the output directory or a folder it is in",
               tmp_path: "--report names the output directory or a folder it is in"}
    (tmp_path / "link").symlink_to(out)
    for report, why in refused.items():
        with pytest.raises(LoraBridgeError, match=re.escape(why)):
            run_batch([root], out, "neutral", report=report, force=True, progress=False)
    out.mkdir()  # a folder of OUT_DIR that is a link elsewhere: outputs are written through it, and so would be this
    (tmp_path / "elsewhere").mkdir()
    (out / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LoraBridgeError, match="--report names one of this batch's outputs"):
        run_batch([tmp_path / "src"], out, "neutral", report=out / "linked" / "y.safetensors", force=True, progress=False)
    shutil.rmtree(out)
    for report, why in [(out / "x" / "r.jsonl", "a path inside one of this batch's outputs"),  # a PEFT folder
                        (out / "adapter", "one of this batch's outputs")]:
        with pytest.raises(LoraBridgeError, match=re.escape(f"--report names {why}")):
            run_batch([root], out, "peft", report=report, force=True, progress=False)
    (root / "sub").mkdir()
    shutil.copy(root / "x.safetensors", root / "sub" / "y.safetensors")
    with pytest.raises(LoraBridgeError, match="--report names a folder this batch writes outputs into"):
        run_batch([root], out, "neutral", report=out / "sub", progress=False)
    shutil.rmtree(root / "sub")
    with pytest.raises(LoraBridgeError, match="not a lorabridge batch report; pass --force to replace it"):
        run_batch([root], out, "neutral", report=tmp_path / "notes.txt", progress=False)
    assert not out.exists() and (root / "x.safetensors").read_bytes() == lora
    assert (tmp_path / "notes.txt").read_text() == "mine"
    for _ in range(2):  # an earlier report is the batch's own: replaced without --force
        assert run_batch([root], out, "neutral", report=tmp_path / "r.jsonl", jobs=1, progress=False).ok
    assert run_batch([root], out, "neutral", report=tmp_path / "notes.txt", force=True, jobs=1, progress=False).ok
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "r.jsonl").stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_the_output_directory_named_as_a_source_fails_instead_of_converting_nothing(one_lora):
    root = one_lora
    result = run_batch([root], root, "kohya", jobs=1, progress=False)
    assert not result.ok and [e.error for e in result.entries] == [
        f"{root}: is the output directory, which a batch never reads (a rerun would convert its own outputs); "
        "choose another -o"]


def test_an_output_directory_inside_an_input_adapter_folder_is_refused_before_anything_is_written(tmp_path, one_lora):
    adapter = one_lora / "adapter"
    convert(one_lora / "x.safetensors", adapter, "peft", progress=False)
    before = sorted(adapter.rglob("*"))
    link = tmp_path / "link"
    link.symlink_to(adapter)
    cases = [([adapter], adapter / "out", adapter),  # sources, -o, the folder the message names
             ([one_lora], adapter, adapter),  # the adapter found in a library
             ([link], adapter / "out", link),  # one named through a symbolic link, the other not
             ([adapter], link / "sub", adapter)]
    for sources, out, folder in cases:
        why = f"{out}: the output directory is inside the input adapter folder {folder}; choose another -o"
        with pytest.raises(LoraBridgeError, match=re.escape(why)):
            run_batch(sources, out, "neutral", report=tmp_path / "r.jsonl", jobs=1, progress=False)
    assert sorted(adapter.rglob("*")) == before and not (tmp_path / "r.jsonl").exists()


HOSTILE_RECORDS = {"deep": lambda path: path.write_text("[" * 100_000 + "]" * 100_000),
                   "huge": lambda path: path.write_text('{"source": "' + "x" * (2 << 20) + '"}'),
                   "stamp of text": lambda path: path.write_text(json.dumps(
                       {**json.loads(path.read_text()), "stamp": ["big", "late"]})),
                   "source stamp of floats": lambda path: path.write_text(json.dumps(
                       {**json.loads(path.read_text()), "source_stamp": [1.0, 2, 3, 4]})),
                   "fifo": lambda path: (path.unlink(), os.mkfifo(path))}


@pytest.mark.parametrize("kind", list(HOSTILE_RECORDS))
def test_a_hostile_state_record_makes_the_output_foreign_never_a_crash_or_a_hang(tmp_path, one_lora, kind):
    root, out = one_lora, tmp_path / "out"
    assert run_batch([root], out, "kohya", jobs=1, progress=False).ok
    HOSTILE_RECORDS[kind](record_path(out, out / "x.safetensors"))
    entry = convert_job(Job(root / "x.safetensors", out / "x.safetensors", 1), work.Settings(out, "kohya"))
    assert (entry.status, entry.error) == ("failed", f"{out / 'x.safetensors'}: output exists; pass --force to replace it")
    assert convert_job(Job(root / "x.safetensors", out / "x.safetensors", 1),
                       work.Settings(out, "kohya", force=True)).status == "converted"


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                    max_leaves=20)
RECORD_FIELDS = ["source", "source_sha256", "settings", "status", "stamp", "format", "architecture", "source_stamp"]
INTEGERS = st.lists(st.integers(min_value=-2, max_value=1 << 70), min_size=1, max_size=5)
WELL_FORMED = st.fixed_dictionaries(
    {"source": st.text(max_size=4), "source_sha256": st.none() | st.just("ab" * 32),
     "settings": st.just({"to": "kohya", "from": None, "options": {}}), "status": st.sampled_from(["done", "converting"])},
    optional={"stamp": INTEGERS, "source_stamp": INTEGERS, "format": st.sampled_from(["kohya", "made-up"]),
              "architecture": st.text(max_size=4)})
ONE_FIELD_OFF = st.tuples(WELL_FORMED, st.sampled_from(RECORD_FIELDS), JSON).map(lambda t: {**t[0], t[1]: t[2]})


@settings(max_examples=300, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(RECORD_FIELDS) | st.text(max_size=6), JSON, max_size=9) | WELL_FORMED | ONE_FIELD_OFF)
def test_fuzzed_state_records_are_believed_only_when_well_formed_and_never_crash_a_decision(fields):
    """A record in a shared OUT_DIR is untrusted input: any JSON there is either a well-formed record (every field of
    its type) or none at all, and deciding about an output, or skipping it by its stamp, never raises on it."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        source, output = out / "x.ckpt", out / "x.safetensors"
        source.write_bytes(b"source")
        output.write_bytes(b"output")
        path = record_path(out, output)
        path.parent.mkdir()
        path.write_text(json.dumps(fields))
        record = read_record(out, output)
        if record is not None:
            assert set(fields) <= set(RECORD_FIELDS) and {"source", "source_sha256", "settings", "status"} <= set(fields)
            for value, lengths in [(record.stamp, (2, 4)), (record.source_stamp, (4,))]:  # a stamp of before: 2
                assert value is None or (isinstance(value, list) and len(value) in lengths
                                         and all(type(n) is int for n in value))
        state.decide(output, record, "ab" * 32, {"to": "kohya"}, trust_manifest=True)
        work.unchanged_entry(Job(source, output, 6), work.Settings(out, "kohya"))


def test_an_output_directory_or_report_that_cannot_be_created_fails_in_one_line_before_any_file(tmp_path, run_cli):
    good_library(tmp_path / "lib")
    (tmp_path / "file").write_bytes(b"x")
    cases = {("-o", tmp_path / "file" / "out"): f"error: {tmp_path / 'file' / 'out'}: cannot create the output "
                                                 "directory: Not a directory",
             ("-o", tmp_path / "out", "--report", tmp_path / "file" / "r.jsonl"):
                 f"error: {tmp_path / 'file' / 'r.jsonl'}: cannot write the report: File exists"}  # mkdir's words
    for arguments, message in cases.items():
        result = run_cli("batch", tmp_path / "lib", "--to", "neutral", *arguments)
        assert result.exit_code == 1 and result.output.strip() == message, result.output
    assert not list((tmp_path / "out").rglob("*.safetensors"))  # no file was converted


def test_an_out_dir_whose_record_folder_is_a_file_fails_once_in_one_line(tmp_path, one_lora, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / STATE_DIR).write_bytes(b"not a folder")
    message = f"{out / STATE_DIR}: the batch keeps its records here, and this is not a directory"
    result = run_cli("batch", one_lora, "--to", "kohya", "-o", out)
    assert result.exit_code == 1 and result.output.strip() == f"error: {message}", result.output
    assert sorted(p.name for p in out.iterdir()) == [STATE_DIR]  # nothing converted, no report
    # A Dask task (or a direct call) that meets it: that file fails in the same line, not as a lorabridge bug.
    entry = convert_job(Job(one_lora / "x.safetensors", out / "x.safetensors", 0), work.Settings(out, "kohya"))
    assert (entry.status, entry.error) == ("failed", message)


def test_a_record_that_cannot_be_written_fails_its_file_in_one_line_and_leaves_no_temporary(tmp_path, one_lora,
                                                                                           monkeypatch):
    real_create = state.create_locked

    def on_a_full_disk(temporary):  # the temporary is made; every write to it fails as on a full disk
        fd = real_create(temporary)
        os.dup2(os.open("/dev/full", os.O_WRONLY), fd)
        return fd

    monkeypatch.setattr(state, "create_locked", on_a_full_disk)
    out = tmp_path / "out"
    entry = convert_job(Job(one_lora / "x.safetensors", out / "x.safetensors", 0), work.Settings(out, "kohya"))
    assert entry.status == "failed"
    assert entry.error == f"{record_path(out, out / 'x.safetensors')}: cannot write the batch's record: No space left on device"
    assert list((out / STATE_DIR).iterdir()) == [] and not (out / "x.safetensors").exists()


def test_an_output_a_full_disk_kept_from_being_published_leaves_no_claim_on_its_place(tmp_path, one_lora, monkeypatch):
    """A "converting" record claims the output for the batch (a worker killed after publishing it could not record
    "done"). Before, one left by a clean failure made the rerun replace, without --force, a file the user then put
    in that place; now the record goes back to what it was before the conversion (here: none)."""
    real_create = atomic.create_locked

    def on_a_full_disk(temporary):
        fd = real_create(temporary)
        os.dup2(os.open("/dev/full", os.O_WRONLY), fd)
        return fd

    out, job = tmp_path / "out", Job(one_lora / "x.safetensors", tmp_path / "out" / "x.safetensors", 0)
    with monkeypatch.context() as patch:
        patch.setattr(atomic, "create_locked", on_a_full_disk)
        entry = convert_job(job, work.Settings(out, "kohya"))
    assert entry.status == "failed" and "No space left on device" in entry.error
    assert list((out / STATE_DIR).iterdir()) == [] and list(out.iterdir()) == [out / STATE_DIR]
    job.output.write_bytes(b"the user's file")
    assert convert_job(job, work.Settings(out, "kohya")).error == f"{job.output}: output exists; pass --force to replace it"
    assert job.output.read_bytes() == b"the user's file"


def test_a_report_on_a_full_disk_is_a_one_line_error_and_leaves_no_temporary(tmp_path):
    writer = ReportWriter(tmp_path / "r.jsonl")
    writer._handle.close()
    writer._handle = open("/dev/full", "w", encoding="utf-8")  # every write: ENOSPC, as on a full disk
    for step in (lambda: writer.add(Entry("a.ckpt", "a.safetensors")), writer.close):
        with pytest.raises(LoraBridgeError, match="r.jsonl: cannot write the report: No space left on device"):
            step()
    assert list(tmp_path.iterdir()) == []

def test_two_inputs_that_map_to_one_output_are_not_both_converted(tmp_path, one_lora):
    root = one_lora
    convert(root / "x.safetensors", root / "x.ckpt", "mindone-sgm", progress=False)
    result = run_batch([root], tmp_path / "out", "kohya", jobs=1, progress=False)
    by_name = {Path(e.input).name: e for e in result.entries}
    assert by_name["x.ckpt"].status == "converted"
    assert by_name["x.safetensors"].error == (f"{root / 'x.safetensors'}: {root / 'x.ckpt'} is converted to the same "
                                             f"output {tmp_path / 'out' / 'x.safetensors'}")


def test_an_output_inside_another_outputs_folder_is_not_written_even_with_force(tmp_path, one_lora):
    """``x.ckpt`` and ``x/y.ckpt`` converted to PEFT folders: ``OUT/x`` and ``OUT/x/y``. Before, the second run
    (``--force``, as the first run's error suggested) replaced ``OUT/x`` and with it ``x/y``'s output, which the
    report called converted."""
    root, out = tmp_path / "mine", tmp_path / "out"
    (root / "x").mkdir(parents=True)
    convert(one_lora / "x.safetensors", root / "x.ckpt", "mindone-sgm", progress=False)
    shutil.copy(one_lora / "x.safetensors", root / "x" / "y.safetensors")
    for force in (False, True):
        result = run_batch([root], out, "peft", jobs=1, force=force, progress=False)
        by_name = {Path(e.input).name: e for e in result.entries}
        assert by_name["y.safetensors"].status == "converted"
        assert by_name["x.ckpt"].error == (f"{root / 'x.ckpt'}: {root / 'x' / 'y.safetensors'} is converted to "
                                           f"{out / 'x' / 'y'}, inside this file's output {out / 'x'}")
        assert (out / "x" / "y" / "unet" / "adapter_config.json").is_file()


def test_an_output_folder_that_would_hold_an_input_of_the_batch_fails_even_with_force(tmp_path, one_lora):
    """``a.safetensors`` to a PEFT folder ``lib/a`` where ``lib/a/b.safetensors`` is an input: before, --force
    replaced the folder, and the input with it."""
    root = tmp_path / "mine"
    (root / "a").mkdir(parents=True)
    shutil.copy(one_lora / "x.safetensors", root / "a.safetensors")
    shutil.copy(one_lora / "x.safetensors", root / "a" / "b.safetensors")
    result = run_batch([root / "a.safetensors", root / "a"], root, "peft", jobs=1, force=True,
                       report=tmp_path / "r.jsonl", progress=False)
    by_name = {Path(e.input).name: e for e in result.entries}
    assert by_name["a.safetensors"].error == (f"{root / 'a.safetensors'}: its output {root / 'a'} is an input of "
                                              "this batch or holds one, which a batch never replaces; choose another -o")
    assert (root / "a" / "b.safetensors").read_bytes() == (one_lora / "x.safetensors").read_bytes()


def test_an_output_that_would_replace_an_input_of_the_batch_fails_even_with_force(tmp_path, one_lora):
    """``-o`` the library's own folder with its files named one by one (the shell's ``lib/*``): ``a.ckpt``'s output
    is the input ``a.safetensors``. Before, ``--force`` replaced that input with ``a.ckpt``'s conversion."""
    root = tmp_path / "mine"
    root.mkdir()
    convert(one_lora / "x.safetensors", root / "a.ckpt", "mindone-sgm", progress=False)
    shutil.copy(one_lora / "x.safetensors", root / "a.safetensors")
    before = (root / "a.safetensors").read_bytes()
    (tmp_path / "link").symlink_to(root)
    for out in (root, tmp_path / "link"):  # as named, and through a link
        result = run_batch([root / "a.ckpt", root / "a.safetensors"], out, "kohya", jobs=1, force=True,
                           report=tmp_path / "report.jsonl", progress=False)
        assert [e.error for e in sorted(result.entries, key=lambda e: e.input)] == [
            f"{root / name}: its output {out / 'a.safetensors'} is an input of this batch or holds one, which a "
            "batch never replaces; choose another -o" for name in ("a.ckpt", "a.safetensors")]
        assert (root / "a.safetensors").read_bytes() == before


def test_a_file_where_the_mirrored_tree_needs_a_folder_fails_that_file_in_one_line(tmp_path):
    root, out = tmp_path / "lib", tmp_path / "out"
    (root / "sub").mkdir(parents=True)
    write_neutral(make_lora_model(seed=1), root / "sub" / "x.safetensors")
    write_neutral(make_lora_model(seed=2), root / "y.safetensors")
    out.mkdir()
    (out / "sub").write_bytes(b"the user's file")
    result = run_batch([root], out, "kohya", jobs=1, progress=False)
    by_name = {Path(e.input).name: e for e in result.entries}
    assert by_name["y.safetensors"].status == "converted"
    assert by_name["x.safetensors"].error == f"{out / 'sub'}: is not a directory"
    assert (out / "sub").read_bytes() == b"the user's file"


def test_an_unknown_or_read_only_target_or_jobs_with_dask_fails_once_before_any_file(tmp_path, run_cli):
    result = run_cli("batch", tmp_path, "--to", "xlabs", "-o", tmp_path / "out")
    assert result.exit_code == 1 and result.output.startswith("error: xlabs is read-only")
    both = run_cli("batch", tmp_path, "--to", "neutral", "-o", tmp_path / "out", "--jobs", "2", "--dask", "tcp://x:1")
    assert both.exit_code == 1 and both.output.startswith("error: --jobs sets this machine's worker processes")
    # before: every file failed alike, each hashed first (--from), and a traceback (a pool of 2**31 - 1 processes)
    source = run_cli("batch", tmp_path, "--to", "neutral", "--from", "nosuch", "-o", tmp_path / "out")
    assert source.exit_code == 1 and source.output.startswith("error: unknown format 'nosuch'; known: neutral, ")
    many = run_cli("batch", tmp_path, "--to", "neutral", "-o", tmp_path / "out", "--jobs", str(2**31 - 1))
    assert many.exit_code == 1 and many.output == "error: --jobs must be 1 to 1024, not 2147483647\n"
    assert not (tmp_path / "out").exists()


def test_a_batch_starts_no_more_worker_processes_than_it_has_files(tmp_path, one_lora, monkeypatch):
    pools = []
    monkeypatch.setattr(local, "_pool", lambda workers, flag, real=local._pool: pools.append(workers) or real(workers, flag))
    assert run_batch([one_lora], tmp_path / "out", "kohya", jobs=8, progress=False).ok and pools == [1]


@pytest.mark.slow
def test_two_batches_at_once_on_one_out_dir_leave_whole_outputs_and_a_readable_state(tmp_path):
    root, out = tmp_path / "lib", tmp_path / "out"
    good_library(root)
    (root / "many").mkdir()
    for i in range(6):
        write_flux(root / "many" / f"f{i}.safetensors", seed=i)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "lorabridge", "batch", str(root), "--to", "neutral", "-o", str(out), "--jobs", "1"]
    runs = [subprocess.Popen([*command, "--report", str(tmp_path / f"r{i}.jsonl")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for run in runs:
        output, _ = run.communicate(timeout=120)
        assert "11 files" in output, output
    for records in (out / STATE_DIR).iterdir():
        assert json.loads(records.read_text())["status"] == "done"  # every record whole, every conversion done
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]
    for output in out.rglob("*.safetensors"):
        assert validation_report(output)["valid"], output
    third = run_batch([root], out, "neutral", jobs=1, progress=False)
    assert third.count("skipped") == 11 and third.ok



def test_a_file_another_batch_publishes_between_our_decision_and_our_record_ends_converted_and_done(tmp_path, one_lora,
                                                                                                   monkeypatch):
    """The race two batches on one OUT_DIR can run into: the other one publishes the output and records it "done"
    after this one decided to convert it but before this one's "converting" record replaced that "done"."""
    root, out = one_lora, tmp_path / "out"
    job, settings = Job(root / "x.safetensors", out / "x.safetensors", 1), work.Settings(out, "kohya")
    real_write_record = work.write_record

    def other_batch_first(out_dir, output, record):
        if record.status == "converting" and not output.exists():  # the other batch, just before our record
            convert(job.source, output, "kohya", progress=False)
            real_write_record(out_dir, output, work.Record(os.fspath(job.source), record.source_sha256,
                                                           record.settings, "done", work.stamp(output)))
        real_write_record(out_dir, output, record)

    monkeypatch.setattr(work, "write_record", other_batch_first)
    entry = convert_job(job, settings)
    assert (entry.status, entry.error) == ("converted", None)
    assert read_record(out, job.output).status == "done"

def write_big_flux(path: Path, modules: int = 24, rank: int = 128) -> None:
    """A Flux.1 LoRA of about 75 MB (rank 128 on the q/k/v of the first double blocks): seconds to convert here."""
    tensors = {}
    for i in range(modules):
        name = f"transformer.transformer_blocks.{i // 3}.attn.to_{'qkv'[i % 3]}"
        tensors[f"{name}.lora_A.weight"] = Tensor.from_numpy(np.full((rank, 3072), 0.01, "f4"))
        tensors[f"{name}.lora_B.weight"] = Tensor.from_numpy(np.full((3072, rank), 0.02, "f4"))
    write_safetensors(path, tensors, {})


def big_and_small_library(root: Path, small: int) -> Path:
    """``root`` holding one big Flux.1 LoRA (seconds to convert: a worker can be caught mid-file) and ``small`` small ones."""
    root.mkdir()
    write_big_flux(root / "big.safetensors")
    for i in range(small):
        write_flux(root / f"small{i}.safetensors", seed=i)
    return root


def converting(out: Path, source: Path, timeout: float = 60.0) -> bool:
    """Wait until the batch's state record says ``source`` is being converted (the worker is mid-file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in (out / STATE_DIR).glob("*.json") if (out / STATE_DIR).is_dir() else ():
            try:
                data = json.loads(record.read_text())
            except (OSError, ValueError):
                continue
            if data["source"] == str(source) and data["status"] == "converting":
                return True
        time.sleep(0.005)
    return False


def test_a_local_worker_starts_with_every_format_imported_and_frozen():
    """A worker is forked from a server that imported numpy (every file's NaN/Inf scan needs it) and every
    format's module, so its first file imports nothing; what it imported is left out of the garbage
    collector's full passes (gc.freeze), which would otherwise walk it every few files."""
    from lorabridge.converters.registry import FORMATS

    wanted = sorted({"numpy", "lorabridge.architectures"} | {spec.split(":")[0] for spec in FORMATS.values()})
    pool = local._pool(1, None)
    try:
        assert pool.submit(gc.get_freeze_count).result(timeout=120) > 10_000
        # asked with eval: a function of this test module would import what it imports into the worker itself
        missing = pool.submit(eval, f"[m for m in {wanted!r} if m not in __import__('sys').modules]").result(timeout=120)
        assert missing == []
    finally:
        pool.shutdown()


def test_the_workers_server_starts_before_the_batch_command_imports_the_batch_machinery(one_lora, tmp_path):
    """``lorabridge batch`` starts the forkserver first thing, so that its imports (an interpreter, lorabridge,
    numpy, the formats) run beside the command's own instead of after them; ``lorabridge.batch.workers``, which
    starts it, imports nothing else of lorabridge."""
    script = """
import sys, importlib.abc, multiprocessing.forkserver as forkserver
events = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "lorabridge.batch.run":
            events.append("imported lorabridge.batch.run")
sys.meta_path.insert(0, Watch())
real = forkserver.ensure_running
forkserver.ensure_running = lambda: events.append("server started") or real()
import lorabridge.batch.workers
light = sorted(m for m in sys.modules if m.startswith("lorabridge"))
from lorabridge.cli import cli
try:
    cli(sys.argv[1:])
except SystemExit as exc:
    print(repr(exc.code), light, events[:2])
"""
    done = subprocess.run([sys.executable, "-c", script, "batch", str(one_lora), "--to", "neutral", "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.stdout.strip().splitlines()[-1] == (
        "0 ['lorabridge', 'lorabridge.batch', 'lorabridge.batch.workers'] "
        "['server started', 'imported lorabridge.batch.run']"), done.stderr


def test_a_source_opened_for_writing_while_a_worker_reads_it_is_reported_as_that_not_as_the_readers_error(
        one_lora, tmp_path, monkeypatch):
    """A reader that meets a file being rewritten says "truncated" or "not a LoRA"; the batch's line says what
    happened instead (the input's read lease was broken), as ``lorabridge convert`` does, and nothing is published."""
    source = one_lora / "x.safetensors"

    def rewritten_meanwhile(src, dst, *args, **kwargs):  # another process opens it for writing: the lease breaks
        subprocess.run([sys.executable, "-c", "import os, sys\ntry: os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK)\n"
                        "except BlockingIOError: pass", os.fspath(src)], check=True)
        raise LoraBridgeError("truncated: header claims 999 bytes", src)
    monkeypatch.setattr(work, "convert", rewritten_meanwhile)
    out = tmp_path / "out"
    entry = convert_job(Job(source, out / "x.safetensors", source.stat().st_size), work.Settings(out, "kohya"))
    assert entry.status == "failed" and "opened this input for writing" in entry.error, entry.error
    assert not (out / "x.safetensors").exists()


@pytest.mark.parametrize("to", ["neutral", "diffusers"])
def test_a_rerun_reports_an_up_to_date_files_format_from_its_conversion_without_detecting_it_again(tmp_path, monkeypatch, to):
    """The format detected when a file was converted holds while its sha256 does: a rerun reads it from the record
    (or, without one, from a neutral output's manifest); a record whose format is not a known one is not believed."""
    good_library(tmp_path / "lib")
    source = tmp_path / "lib" / "sdxl" / "deep" / "k.safetensors"
    job, settings = Job(source, tmp_path / "out" / "k.safetensors", source.stat().st_size), work.Settings(tmp_path / "out", to)
    assert convert_job(job, settings).status == "converted"
    detected = []
    real = work.detect_input
    monkeypatch.setattr(work, "detect_input", lambda *args: detected.append(args[0]) or real(*args))
    assert (convert_job(job, settings).status, convert_job(job, settings).format, detected) == ("skipped", "kohya", [])
    record = read_record(tmp_path / "out", job.output)
    (tmp_path / "out" / STATE_DIR).joinpath(record_path(tmp_path / "out", job.output).name).write_text(
        json.dumps({**record.__dict__, "format": "made-up"}))
    assert (convert_job(job, settings).format, detected) == ("kohya", [source])
    if to == "neutral":  # no record at all: the manifest's provenance says what the source was
        shutil.rmtree(tmp_path / "out" / STATE_DIR)
        assert (convert_job(job, settings).status, convert_job(job, settings).format, detected) == ("skipped", "kohya", [source])


@pytest.mark.parametrize("to", ["neutral", "diffusers"])
def test_a_worker_reads_and_checks_a_files_header_once_detection_included(tmp_path, monkeypatch, to):
    """Detecting a file's format (a dozen formats ask for its keys), hashing it and converting it share one map
    of the file and one checked header: a kohya SDXL LoRA's 1,680 entries are parsed once, not once per step."""
    from lorabridge.io import safetensors_file

    good_library(tmp_path / "lib")
    source = tmp_path / "lib" / "sdxl" / "deep" / "k.safetensors"
    parses = []
    parse = safetensors_file.load_json
    monkeypatch.setattr(safetensors_file, "load_json", lambda *args, **kw: parses.append(args[2]) or parse(*args, **kw))
    entry = convert_job(Job(source, tmp_path / "out" / "k.safetensors", source.stat().st_size),
                        work.Settings(tmp_path / "out", to))
    assert (entry.status, entry.format, parses) == ("converted", "kohya", [source])


def test_a_library_s_second_file_with_the_same_keys_is_detected_without_parsing_them_again(tmp_path):
    """The diffusers, PEFT and OneTrainer detectors each parse every key of a kohya file before kohya's turn (none
    of theirs parses): their parses are remembered, so a library's next file with the same keys costs lookups."""
    from lorabridge.converters import detect_format
    from lorabridge.naming import onetrainer_keys, peft_keys

    good_library(tmp_path / "lib")
    first = tmp_path / "lib" / "sdxl" / "deep" / "k.safetensors"
    second = tmp_path / "second.safetensors"
    shutil.copyfile(first, second)
    parsers = (peft_keys.parse_key, onetrainer_keys.parse_omi)
    for parser in parsers:
        parser.cache_clear()
    assert detect_format(first).name == "kohya"
    misses = [parser.cache_info().misses for parser in parsers]
    assert all(misses)  # the first file's keys were parsed
    assert detect_format(second).name == "kohya"
    assert [parser.cache_info().misses for parser in parsers] == misses


def test_a_file_converts_without_automatic_garbage_collection_and_its_cycles_are_freed_when_it_ends(tmp_path, monkeypatch):
    """The collector's automatic passes over a conversion's short-lived objects cost more than one pass after
    the file: none runs while the file converts, and garbage cycles it made are freed by the time it ends."""
    write_flux(tmp_path / "lora.safetensors")
    during, converting_now, cycles = [], [], []

    class Node:
        pass

    def converting(*args, **kwargs):
        converting_now.append(True)
        node = Node()
        node.itself = node  # garbage once this returns, freed only by a collector pass
        cycles.append(weakref.ref(node))
        try:
            return convert(*args, **kwargs)
        finally:
            converting_now.clear()

    def record(phase, info):
        if phase == "start" and converting_now:
            during.append(info["generation"])

    monkeypatch.setattr(work, "convert", converting)
    thresholds = gc.get_threshold()
    gc.callbacks.append(record)
    try:
        for threshold in (1, 10**9):  # a pass at nearly every allocation, were the collector on; then none
            gc.set_threshold(threshold)
            out = tmp_path / f"out-{threshold}"
            entry = work.convert_job(Job(tmp_path / "lora.safetensors", out / "lora.safetensors", 0), work.Settings(out, "neutral"))
            assert entry.status == "converted" and gc.isenabled()
            assert cycles[-1]() is None
    finally:
        gc.set_threshold(*thresholds)
        gc.callbacks.remove(record)
    assert during == []


@pytest.mark.slow
def test_a_local_worker_killed_mid_file_costs_a_retry_and_leaves_no_partial_output(tmp_path, monkeypatch):
    pools = []
    monkeypatch.setattr(local, "_pool", lambda workers, flag, make=local._pool: pools.append(workers) or make(workers, flag))
    root, out = big_and_small_library(tmp_path / "lib", small=3), tmp_path / "out"
    results = []
    batch = threading.Thread(target=lambda: results.append(run_batch([root], out, "neutral", jobs=2, progress=False)))
    batch.start()
    assert converting(out, root / "big.safetensors")
    server = [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]
    workers = [worker for process in server for worker in process.children()]
    for worker in workers:
        worker.kill()
    batch.join(timeout=180)
    [result] = results
    assert workers and result.ok, [e.error for e in result.entries]
    assert pools == [2, 2]  # the broken pool was replaced once
    assert sorted(Path(e.input).name for e in result.entries) == sorted(p.name for p in root.iterdir())
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]
    for output in out.glob("*.safetensors"):
        assert validation_report(output)["valid"], output


def neutral_at(path: Path, seed: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_neutral(make_lora_model(seed=seed), path)
    return path


def test_a_link_inside_out_dir_never_leads_an_output_over_an_input_or_the_report_over_an_output(tmp_path):
    """Outputs are compared with the inputs resolved, folder by folder: before, ``out/a -> ../lib/b`` let --force
    replace the input ``lib/b/x.safetensors`` (or a PEFT output delete a source folder), and a --report naming the
    link's target replaced the output written through it."""
    lib, out = tmp_path / "lib", tmp_path / "out"
    neutral_at(lib / "a" / "x.safetensors", seed=1)
    theirs = neutral_at(lib / "b" / "x.safetensors", seed=2).read_bytes()
    out.mkdir()
    (out / "a").symlink_to(lib / "b")
    result = run_batch([lib], out, "neutral", jobs=1, force=True, progress=False)
    assert {Path(e.input).parent.name: e.error for e in result.entries}["a"].endswith(
        "is an input of this batch or holds one, which a batch never replaces; choose another -o")
    assert (lib / "b" / "x.safetensors").read_bytes() == theirs
    (out / "a").unlink()
    (out / "a").symlink_to(tmp_path / "ext", target_is_directory=True)
    (tmp_path / "ext").mkdir()
    with pytest.raises(LoraBridgeError, match="--report names one of this batch's outputs"):
        run_batch([lib], out, "neutral", report=tmp_path / "ext" / "x.safetensors", progress=False)


def test_a_glob_never_reaches_into_out_dir_inside_the_library(tmp_path, monkeypatch):
    """Before, the rerun of ``batch 'lib/**/*.safetensors' -o lib/out`` converted the batch's own outputs into
    ``lib/out/out/...`` and failed the real sources."""
    monkeypatch.chdir(tmp_path)
    neutral_at(Path("lib/a/x.safetensors"))
    for _ in range(2):
        result = run_batch(["lib/**/*.safetensors"], Path("lib/out"), "kohya", jobs=1, progress=False)
        assert result.ok and [e.input for e in result.entries] == [str(tmp_path / "lib/a/x.safetensors")]
    assert not Path("lib/out/out").exists()
    # a library inside OUT_DIR (-o . around it) is read as usual
    assert [e.status for e in run_batch(["lib/a/*.safetensors"], Path("."), "kohya", jobs=1, progress=False).entries] \
        == ["converted"]


def test_a_folder_named_like_a_component_without_a_config_is_a_library_folder(library, tmp_path):
    root, _ = library
    lib = tmp_path / "mixed"
    shutil.copytree(root / "sdxl" / "p" / "unet", lib / "unet")
    neutral_at(lib / "text_encoder" / "style1.safetensors")  # not an adapter component: a folder of LoRAs
    assert relatives([lib]) == ["text_encoder/style1.safetensors", "unet"]


def test_a_file_whose_output_would_be_the_batch_s_records_or_report_fails_alone(tmp_path):
    lib = tmp_path / "lib"
    neutral_at(lib / "x.safetensors")
    shutil.copy(lib / "x.safetensors", lib / "lorabridge-report.jsonl.safetensors")
    shutil.copy(lib / "x.safetensors", lib / ".lorabridge-batch.safetensors")
    result = run_batch([lib, lib / ".lorabridge-batch.safetensors"], tmp_path / "out", "peft", jobs=1, progress=False)
    errors = {Path(e.input).name: e.error for e in result.entries}
    assert errors["x.safetensors"] is None and errors["lorabridge-report.jsonl.safetensors"].endswith(
        f"would take the place of the batch's report ({tmp_path / 'out' / REPORT_NAME}); rename the input")
    assert errors[".lorabridge-batch.safetensors"].endswith(f"would take the place of the batch's records "
                                                            f"({tmp_path / 'out' / STATE_DIR}); rename the input")
    assert read_record(tmp_path / "out", tmp_path / "out" / "x").status == "done"


def test_sources_are_read_where_their_names_lead_and_anchor_the_layout_even_when_empty(tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    far = neutral_at(Path("far/deep/z.safetensors"), seed=2)
    neutral_at(Path("lib/z.safetensors"), seed=3)
    Path("far/deep/a").mkdir()
    Path("lib/a").symlink_to(tmp_path / "far/deep/a")
    # "lib/a/.." is far/deep, as the kernel resolves it (before: lib, as text)
    [entry] = run_batch(["lib/a/../z.safetensors"], Path("out"), "kohya", jobs=1, progress=False).entries
    assert entry.sha256 == hashlib.sha256(far.read_bytes()).hexdigest()
    # a folder named, empty today, still counts: x's output does not move once b holds a LoRA
    neutral_at(Path("lib2/a/x.safetensors"))
    Path("lib2/b").mkdir()
    assert relatives(["lib2/a", "lib2/b"]) == ["a/x.safetensors"]
    assert [str(f.relative) for f in find_inputs(["lib2/a", "lib2/b/*.safetensors"]) if not f.error] == ["a/x.safetensors"]
    # a glob climbing out of its fixed part, an empty name, a name too long: one line each, no traceback
    assert relatives(["lib2/*/../../lib/*.safetensors"]) == ["lib/z.safetensors"]  # before: "outside OUT_DIR"
    for args, said in [(["", "--to", "kohya", "-o", "o"], "error: an empty path was given"),
                       (["lib", "--to", "kohya", "-o", ""], "error: an empty path was given")]:
        result = run_cli("batch", *args)
        assert result.exit_code == 1 and result.output.startswith(said), result.output
    long = run_cli("batch", "n" * 300 + ".safetensors", "--to", "kohya", "-o", "o3")
    assert long.exit_code == 1 and "File name too long" in long.output and "Traceback" not in long.output
