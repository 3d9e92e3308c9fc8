"""The batch on a Dask cluster against the batch on this machine's workers, side by side in one run.

A ``distributed.LocalCluster`` of ``--jobs`` worker processes, one thread each (as the README says to start
workers), and ``lorabridge batch ... --jobs N`` on the same library (``batch_bench.py``'s: ``--files`` copies of a
rank-4 SDXL LoRA, ten per folder), each converting it to ``--to`` into a fresh folder, then rerunning over its
own output (all up to date: the command skips them by their records) and rerunning with ``--rehash`` (every
source hashed again, by the workers). Needs ``pip install 'lorabridge[cluster]'``.

    python bench/dask_bench.py [--files 100] [--jobs 2] [--input rank4-attn-kohya] [--to neutral] [--repeat 1]

Prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch_bench import LORABRIDGE, library, median_table, timed  # noqa: E402
from bench_inputs import INPUTS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--input", default="rank4-attn-kohya", choices=[n for n, s in INPUTS.items() if s.rank == 4])
    parser.add_argument("--to", default="neutral")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorabridge-batch-bench"))
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every contender in turn; medians reported")
    args = parser.parse_args()
    from distributed import LocalCluster

    args.workdir.mkdir(parents=True, exist_ok=True)
    src = library(args.workdir, args.files, INPUTS[args.input])
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    out = args.workdir / "dask-bench-out"
    with LocalCluster(n_workers=args.jobs, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        where = {"local": ["--jobs", str(args.jobs)], "dask": ["--dask", cluster.scheduler_address]}
        runs: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            for name, flags in where.items():
                batch = [*LORABRIDGE, "batch", str(src), "--to", args.to, "-o", str(out), *flags]
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=True)
                runs.setdefault(f"{name}: convert", []).append(timed(batch))
                runs.setdefault(f"{name}: rerun, all up to date", []).append(timed(batch))
                runs.setdefault(f"{name}: rerun --rehash", []).append(timed([*batch, "--rehash"]))
    shutil.rmtree(out, ignore_errors=True)
    print(f"{args.files} files, {total / 1e6:.0f} MB ({args.input}), --to {args.to}, {args.jobs} workers, "
          f"{args.repeat} round(s), medians\n")
    print(median_table(runs, "contender"))


if __name__ == "__main__":
    main()
