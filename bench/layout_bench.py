"""One batch over a flat library (every file in one folder) against the same files nested, side by side in one run.

A model hub's mirror is often flat. Per-output work that reads the whole output folder (the removal of stale
temporaries before each write did, until a large folder was read at most once a minute) grows with the folder, so
a flat library's batch costs the square of its size; a nested one, ``--per-folder`` files to a folder, does not.
The library: ``--files`` hard links of one small kohya SDXL LoRA (``--modules`` of the rank-4 bench input's
modules, a few tens of KB: the per-file cost, not the bytes, is what is measured), converted to ``--to``.

    python bench/layout_bench.py [--files 5000] [--per-folder 50] [--jobs 2] [--repeat 2] [--memory warm]

Prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch_bench import LORABRIDGE, MEMORY, median_table, timed  # noqa: E402
from bench_inputs import INPUTS, generate  # noqa: E402


def small_lora(work: Path, modules: int) -> Path:
    """The first ``modules`` modules of the rank-4 kohya bench input, as a kohya file of their own."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(generate(INPUTS["rank4-attn-kohya"], work))
    kept = sorted({name.split(".")[0] for name in tensors})[:modules]
    path = work / f"small-{modules}.safetensors"
    save_file({name: value for name, value in tensors.items() if name.split(".")[0] in kept}, path)
    return path


def libraries(work: Path, one: Path, files: int, per_folder: int) -> dict[str, Path]:
    """``files`` hard links of ``one``: all in one folder, and ``per_folder`` to a folder."""
    flat, nested = work / f"flat-{files}", work / f"nested-{files}-{per_folder}"
    for root in (flat, nested):
        shutil.rmtree(root, ignore_errors=True)
    flat.mkdir(parents=True)
    for i in range(files):
        os.link(one, flat / f"lora{i:06d}.safetensors")
        folder = nested / f"g{i // per_folder:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        os.link(one, folder / f"lora{i:06d}.safetensors")
    return {"flat": flat, "nested": nested}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--per-folder", type=int, default=50)
    parser.add_argument("--modules", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--to", default="kohya")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorabridge-layout-bench"))
    parser.add_argument("--repeat", type=int, default=1, help="rounds of both layouts in turn; medians reported")
    parser.add_argument("--memory", choices=list(MEMORY), default="warm",
                        help="the state of free memory each layout's batch starts in (batch_bench.MEMORY)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    one = small_lora(args.workdir, args.modules)
    roots = libraries(args.workdir, one, args.files, args.per_folder)
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        for layout, root in roots.items():
            out = args.workdir / f"out-{layout}"
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            MEMORY[args.memory]()
            runs.setdefault(layout, []).append(timed([*LORABRIDGE, "batch", str(root), "--to", args.to, "-o", str(out),
                                                      "--jobs", str(args.jobs)]))
            shutil.rmtree(out, ignore_errors=True)
    flat, nested = statistics.median(runs["flat"]), statistics.median(runs["nested"])
    print(f"{args.files} files of {one.stat().st_size / 1e3:.0f} KB (hard links), --to {args.to}, {args.jobs} workers, "
          f"{args.repeat} round(s), memory {args.memory}, medians; flat / nested = {flat / nested:.2f}\n")
    print(median_table(runs, "layout"))

if __name__ == "__main__":
    main()
