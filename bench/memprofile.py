"""Where a command's Python-allocated memory is at its peak: tracemalloc, sampled by a thread.

Runs ``cli.py`` with the given arguments in this process; a thread takes a tracemalloc snapshot
whenever traced memory reaches a new high, and the largest allocation sites of the highest
snapshot are printed (numpy buffers are traced too). Mapped file pages are not allocations and do
not show here: RssFile in the benchmark tables counts those.

    python bench/memprofile.py neutral2ms lora.safetensors -o lora.ckpt
"""

from __future__ import annotations

import runpy
import sys
import threading
import tracemalloc
from pathlib import Path

TOP = 10
POLL_S = 0.005


def main(argv: list[str]) -> None:
    tracemalloc.start(8)
    best: dict[str, object] = {"bytes": 0, "snapshot": None}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(POLL_S):
            current, _ = tracemalloc.get_traced_memory()
            if current > best["bytes"]:
                best["bytes"], best["snapshot"] = current, tracemalloc.take_snapshot()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    sys.argv = ["cli.py", *argv]
    try:
        runpy.run_path(str(Path(__file__).resolve().parent.parent / "cli.py"), run_name="__main__")
    except SystemExit:
        pass
    finally:
        done.set()
        watcher.join()
        _, peak = tracemalloc.get_traced_memory()
        print(f"traced peak {peak / 2**20:.1f} MiB; sampled high {best['bytes'] / 2**20:.1f} MiB, by allocation site:")
        if best["snapshot"] is not None:
            for stat in best["snapshot"].statistics("traceback")[:TOP]:
                frames = [f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback if "lorabridge" in f.filename]
                where = " <- ".join(reversed(frames[-3:])) or stat.traceback[-1]
                print(f"{stat.size / 2**20:8.1f} MiB in {stat.count:6d} blocks  {where}")


if __name__ == "__main__":
    main(sys.argv[1:])
