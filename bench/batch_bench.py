"""Library-scale conversion (issue 14 item 2): one ``lorabridge batch`` over a directory of rank-4 SDXL
LoRAs (MindONE ``.ckpt``, about 23 MB each) against ``cp -r`` of the same directory and against one
``lorabridge convert`` process per file, measured side by side in one run (wall time, warm page cache).

    python bench/batch_bench.py [--files 100] [--jobs N] [--to neutral] [--workdir /tmp/lorabridge-batch-bench]

Prints a Markdown section for bench/RESULTS.md ("Batch"). Every contender reads the same warm
sources and writes a fresh directory; ``cp -r`` is also timed with an fsync of every copy (``sync
FILES``), as a single ``lorabridge convert`` fsyncs its output before publishing it. Inputs are copies of one
generated file under nested folders (conversion cost does not depend on the values). A batch on one
machine syncs its outputs to the disk once, as it ends (``syncfs``), so ``cp -r`` is also timed followed
by ``sync -f`` of its output's file system; ``sync`` runs between contenders, so none pays for
another's dirty pages.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_inputs import INPUTS, generate  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
LORABRIDGE = [sys.executable, "-m", "lorabridge"]
PER_FOLDER = 10


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=ENV, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def library(work: Path, files: int) -> Path:
    """``files`` copies of the rank-4 input, ten per folder: work/src/g00/lora000.ckpt ..."""
    one = generate(INPUTS["rank4-attn"], work)
    src = work / "src"
    if src.is_dir() and len(list(src.rglob("*.ckpt"))) == files:
        return src
    shutil.rmtree(src, ignore_errors=True)
    for i in range(files):
        folder = src / f"g{i // PER_FOLDER:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(one, folder / f"lora{i:03d}.ckpt")
    return src


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--to", default="neutral")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorabridge-batch-bench"))
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    src = library(work, args.files)
    sources = sorted(src.rglob("*.ckpt"))
    total = sum(p.stat().st_size for p in sources)
    for path in sources:  # warm the page cache for every contender alike
        path.read_bytes()

    def fresh(name: str) -> Path:  # one output folder at a time: the disk holds two copies of the library at most
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        return out

    load_before = os.getloadavg()
    rows = {}
    rows["cp -r"] = timed(["cp", "-r", str(src), str(fresh("cp"))])
    subprocess.run(["sync"], check=True)
    rows["cp -r, then sync -f (the file system once, as the batch ends)"] = timed(
        ["sh", "-c", 'cp -r "$1" "$2" && sync -f "$2"', "sh", str(src), str(fresh("cp"))])
    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(fresh("cp"))], check=True)
    subprocess.run(["sync", *[str(p) for p in (work / "cp").rglob("*.ckpt")]], check=True)
    rows["cp -r + fsync each copy"] = time.perf_counter() - started
    subprocess.run(["sync"], check=True)
    rows[f"lorabridge batch --jobs {args.jobs}"] = timed(
        [*LORABRIDGE, "batch", str(src), "--to", args.to, "-o", str(fresh("cp")), "--jobs", str(args.jobs)])
    rows["lorabridge batch, rerun (all up to date)"] = timed(
        [*LORABRIDGE, "batch", str(src), "--to", args.to, "-o", str(work / "cp"), "--jobs", str(args.jobs)])
    subprocess.run(["sync"], check=True)
    loop = fresh("cp")
    started = time.perf_counter()
    for path in sources:
        out = loop / path.relative_to(src).with_suffix(".safetensors")
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([*LORABRIDGE, "convert", str(path), "--to", args.to, "-o", str(out)], env=ENV, check=True,
                       stdout=subprocess.DEVNULL)
    rows["lorabridge convert, one process per file"] = time.perf_counter() - started
    load_after = os.getloadavg()
    shutil.rmtree(loop)

    batch = rows[f"lorabridge batch --jobs {args.jobs}"]
    print(f"{args.files} files x {total / args.files / 1e6:.1f} MB = {total / 1e6:.0f} MB, --to {args.to}, "
          f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after\n")
    print("| contender | wall s | MB/s | time / batch's |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.2f} | {total / 1e6 / seconds:.0f} | {seconds / batch:.2f}x |")
    cp, cp_sync, per_file = rows["cp -r"], rows["cp -r, then sync -f (the file system once, as the batch ends)"], \
        rows["lorabridge convert, one process per file"]
    print(f"\nGoals (issue 14): batch <= 2x cp -r: {'met' if batch <= 2 * cp else 'MISSED'}, {batch / cp:.2f}x "
          f"({batch / cp_sync:.2f}x cp -r then sync, which the batch's closing sync matches); "
          f">= 5x faster than one process per file: {'met' if per_file >= 5 * batch else 'MISSED'}, {per_file / batch:.2f}x")


if __name__ == "__main__":
    main()
