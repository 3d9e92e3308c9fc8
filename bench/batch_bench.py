"""Library-scale conversion (issue 14 item 2): one ``lorabridge batch`` over a directory of rank-4 SDXL
LoRAs (MindONE ``.ckpt``, about 23 MB each; ``--input rank4-attn-kohya``: kohya ``.safetensors``) against ``cp -r`` of the same directory and against one
``lorabridge convert`` process per file, measured side by side in one run (wall time, warm page cache).

    python bench/batch_bench.py [--files 100] [--jobs N] [--input rank4-attn] [--to neutral] [--repeat 1]
                                [--memory as-is|cold|warm] [--workdir /tmp/lorabridge-batch-bench]

Prints a Markdown section for bench/RESULTS.md ("Batch"). Every contender reads the same warm
sources and writes a fresh directory; ``cp -r`` is also timed with an fsync of every copy (``sync
FILES``), as a single ``lorabridge convert`` fsyncs its output before publishing it. Inputs are copies of one
generated file under nested folders (conversion cost does not depend on the values). A batch on one
machine syncs its outputs to the disk once, as it ends (``syncfs``), so ``cp -r`` is also timed followed
by ``sync -f`` of its output's file system; ``sync`` runs between contenders, so none pays for
another's dirty pages. A floor is timed too: hashing every file twice (sha256, the source's and the
tensors' hash a neutral output records) in as many processes as the batch, without converting. On a VM
whose free memory goes back to the host, what writing costs depends on how long ago memory was freed:
``--memory cold`` or ``warm`` starts every contender alike (:data:`MEMORY`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_inputs import INPUTS, InputSpec, generate  # noqa: E402

from lorabridge.batch.state import RACY_NS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
LORABRIDGE = [sys.executable, "-m", "lorabridge"]
PER_FOLDER = 10
CP_SYNC = "cp -r, then sync -f (the file system once, as the batch ends)"
PER_PROCESS = "lorabridge convert, one process per file"
RERUN = "lorabridge batch, rerun (all up to date)"
REHASH = "lorabridge batch --rehash, rerun (all up to date, every source hashed again)"


# The two sha256 passes a neutral output needs (the source's, for provenance and resume; tensor_sha256 over
# the same bytes), with hashlib as lorabridge uses it, in a pool of worker processes: a floor no conversion
# to neutral can go under, timed beside cp -r.
HASH_TWICE = """
import hashlib, sys
from multiprocessing import Pool
def twice(path):
    buffer = bytearray(1 << 20)
    for _ in range(2):
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                digest.update(memoryview(buffer)[:count])
if __name__ == "__main__":
    with Pool(int(sys.argv[1])) as pool:
        pool.map(twice, sys.argv[2:])
"""


def _settled() -> None:
    """Wait until freed memory has gone back to the host: this VM's balloon reports free pages (kernel
    ``page_reporting``), and writing into memory the host must hand over again took ~50 ms per 23 MB here
    against ~6 ms into pages just freed; 20 s after a removal, every page it freed was cold again (measured)."""
    time.sleep(20)


def _warmed() -> None:
    """Touch and free 3 GiB (more than the library) right before the contender: its outputs go to pages just freed."""
    import numpy as np

    block = np.ones(3 << 30, np.uint8)
    del block


# The state of free memory every contender starts in, alike: as the previous one left it ("as-is": memory its
# removed output freed, part of it already gone back to the host), all of it gone back to the host ("cold",
# as a VM's free memory mostly is), or just freed ("warm", as a machine without a balloon always has it).
MEMORY: dict[str, Callable[[], None]] = {"as-is": lambda: None, "cold": _settled, "warm": _warmed}


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=ENV, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def median_table(runs: dict[str, list[float]], first_column: str) -> str:
    """A Markdown table of each contender's median wall time with its range, for RESULTS.md."""
    rows = [f"| {first_column} | wall s (median, min-max) |", "| --- | ---: |"]
    rows += [f"| {name} | {statistics.median(s):.2f} ({min(s):.2f}-{max(s):.2f}) |" for name, s in runs.items()]
    return "\n".join(rows)


def library(work: Path, files: int, spec: InputSpec) -> Path:
    """``files`` copies of the input, ten per folder: work/src-rank4-attn/g00/lora000.ckpt ...

    A library made now is left to age past :data:`lorabridge.batch.state.RACY_NS` first: a batch records no stamp
    for a source changed less than that before its hash, so the first reruns would hash every source again, which
    a user's rerun of a library that has sat for a minute does not.
    """
    one = generate(spec, work)
    src = work / f"src-{spec.name}"
    if src.is_dir() and len(list(src.rglob(f"*{spec.suffix}"))) == files:
        return src
    shutil.rmtree(src, ignore_errors=True)
    for i in range(files):
        folder = src / f"g{i // PER_FOLDER:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(one, folder / f"lora{i:03d}{spec.suffix}")
    print(f"waiting {RACY_NS / 1e9:.0f} s for the new library to age (see library())", file=sys.stderr)
    time.sleep(RACY_NS / 1e9 + 1)
    return src


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--input", default="rank4-attn", choices=[n for n, s in INPUTS.items() if s.rank == 4],
                        help="the library's LoRA: rank4-attn (MindONE .ckpt) or rank4-attn-kohya (kohya .safetensors)")
    parser.add_argument("--to", default="neutral")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorabridge-batch-bench"))
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every contender in turn; medians reported")
    parser.add_argument("--memory", choices=list(MEMORY), default="as-is",
                        help="the state of free memory each contender starts in (see MEMORY)")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    spec = INPUTS[args.input]
    src = library(work, args.files, spec)
    sources = sorted(src.rglob(f"*{spec.suffix}"))
    total = sum(p.stat().st_size for p in sources)
    for path in sources:  # warm the page cache for every contender alike
        path.read_bytes()

    out = work / "cp"  # every contender's output: one at a time, so the disk holds two copies of the library at most

    def cp_then_fsync_each() -> float:
        started = time.perf_counter()
        subprocess.run(["cp", "-r", str(src), str(out)], check=True)
        subprocess.run(["sync", *[str(p) for p in out.rglob(f"*{spec.suffix}")]], check=True)
        return time.perf_counter() - started

    def one_process_per_file() -> float:
        started = time.perf_counter()
        for path in sources:
            target = out / path.relative_to(src).with_suffix(".safetensors")
            target.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([*LORABRIDGE, "convert", str(path), "--to", args.to, "-o", str(target)], env=ENV, check=True,
                           stdout=subprocess.DEVNULL)
        return time.perf_counter() - started

    batch_name = f"lorabridge batch --jobs {args.jobs}"
    batch = [*LORABRIDGE, "batch", str(src), "--to", args.to, "-o", str(out), "--jobs", str(args.jobs)]
    contenders: dict[str, Callable[[], float]] = {  # run in this order each round, each after a sync
        "cp -r": lambda: timed(["cp", "-r", str(src), str(out)]),
        CP_SYNC: lambda: timed(["sh", "-c", 'cp -r "$1" "$2" && sync -f "$2"', "sh", str(src), str(out)]),
        "cp -r + fsync each copy": cp_then_fsync_each,
        batch_name: lambda: timed(batch),
        RERUN: lambda: timed(batch),
        REHASH: lambda: timed([*batch, "--rehash"]),
        f"floor: sha256 of every file twice, {args.jobs} processes (no conversion)": lambda: timed(
            [sys.executable, "-c", HASH_TWICE, str(args.jobs), *map(str, sources)]),
        PER_PROCESS: one_process_per_file,
    }
    load_before = os.getloadavg()
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeat):
        for name, run in contenders.items():
            if name not in (RERUN, REHASH):  # (reruns read the batch's output) the last output goes before the memory is set
                shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)  # no contender pays for another's dirty pages
            MEMORY[args.memory]()
            runs[name].append(run())
    load_after = os.getloadavg()
    shutil.rmtree(out, ignore_errors=True)
    rows = {name: statistics.median(seconds) for name, seconds in runs.items()}

    batch = rows[batch_name]
    print(f"{args.files} files x {total / args.files / 1e6:.1f} MB ({spec.name}, {spec.writer}) = {total / 1e6:.0f} MB, --to {args.to}, "
          f"{os.cpu_count()} CPUs, free memory {args.memory} before each contender, "
          f"{args.repeat} round(s) of every contender in turn, medians; load average "
          f"{load_before[0]:.1f} before / {load_after[0]:.1f} after\n")
    print("| contender | wall s (median, min-max) | MB/s | time / batch's |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.2f} ({min(runs[name]):.2f}-{max(runs[name]):.2f}) | {total / 1e6 / seconds:.0f} "
              f"| {seconds / batch:.2f}x |")
    cp, cp_sync, per_file = rows["cp -r"], rows[CP_SYNC], rows[PER_PROCESS]
    print(f"\nGoals (issue 14): batch <= 2x cp -r: {'met' if batch <= 2 * cp else 'MISSED'}, {batch / cp:.2f}x "
          f"({batch / cp_sync:.2f}x cp -r then sync, which the batch's closing sync matches); "
          f">= 5x faster than one process per file: {'met' if per_file >= 5 * batch else 'MISSED'}, {per_file / batch:.2f}x")
    if args.to == "neutral":
        floor = next(seconds for name, seconds in rows.items() if name.startswith("floor"))
        print(f"The two sha256 passes alone take {floor / cp:.2f}x cp -r; the batch takes {batch / floor:.2f}x them.")


if __name__ == "__main__":
    main()
