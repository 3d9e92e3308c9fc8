"""Wall time and peak memory of ms2neutral and neutral2ms on full-size SDXL MindONE LoRAs.

Each command runs as a user runs it (``python cli.py ms2neutral ...``) in a child process; its
peak RSS comes from ``os.wait4`` and its wall time from the clock around it, best of ``--repeat``.
``cp`` of the same bytes is the floor for time, ``python cli.py --help`` the floor for memory
(the interpreter and click). Inputs come from ``bench_inputs.py`` (MindONE SGM .ckpt at SDXL-base
shapes); the round trip is checked byte for byte. Results go to stdout as a table and to
``bench/out/ms_bench.json``.

    .venv/bin/python bench/ms_bench.py                       # rank4-attn and rank128-attn-ff-proj-te
    .venv/bin/python bench/ms_bench.py --inputs rank4-attn --repeat 5
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INPUTS = ("rank4-attn", "rank128-attn-ff-proj-te")
# Run in a child: this process stays small, because a child's peak RSS counts its parent's pages
# from before exec (fork), which would hide the commands' own figures.
PREPARE = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/bench"]
from pathlib import Path
from bench_inputs import INPUTS, generate
from lorabridge.io.ms_ckpt import MsCheckpointFile
spec = INPUTS[sys.argv[2]]
path = generate(spec, Path(sys.argv[3]))
sizes = [t.nbytes for _, t in MsCheckpointFile(path).items()]
print(json.dumps({"path": str(path), "description": spec.description, "tensors": len(sizes), "largest": max(sizes)}))
"""


def _anon_bytes(pid: int) -> int:
    """Current anonymous (heap, not file-mapped) resident memory of a process, 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def run(argv: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS, sampled peak anonymous RSS) of one child; a failure stops the benchmark.

    Peak RSS (``ru_maxrss``) counts the pages of memory-mapped input files the command touched;
    the anonymous peak (sampled every 5 ms) is the memory the command allocated itself.
    """
    started = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    anon = 0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        anon = max(anon, _anon_bytes(child.pid))
        time.sleep(0.005)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{child.stderr.read().decode()}")
    child.stderr.close()
    return seconds, usage.ru_maxrss * 1024, anon  # Linux reports ru_maxrss in KiB


def best(argv: list[str], repeat: int) -> dict:
    runs = [run(argv) for _ in range(repeat)]
    return {"seconds": min(r[0] for r in runs), "peak_rss": max(r[1] for r in runs),
            "peak_anon": max(r[2] for r in runs)}


def measure(name: str, directory: Path, repeat: int) -> dict:
    prepared = subprocess.run([sys.executable, "-c", PREPARE, str(ROOT), name, str(directory)], check=True,
                              capture_output=True, text=True).stdout
    spec = json.loads(prepared.strip().splitlines()[-1])
    source = Path(spec["path"])
    neutral, back, copy = (directory / f"{name}.neutral.safetensors", directory / f"{name}.back.ckpt",
                           directory / f"{name}.copy")
    size = source.stat().st_size
    cli = [sys.executable, "cli.py"]
    figures = {
        "cp": best(["cp", str(source), str(copy)], repeat),
        "cli --help": best([*cli, "--help"], repeat),
        "ms2neutral": best([*cli, "ms2neutral", str(source), "-o", str(neutral), "--force"], repeat),
        "neutral2ms": best([*cli, "neutral2ms", str(neutral), "-o", str(back), "--force"], repeat),
    }
    identical = filecmp.cmp(back, source, shallow=False)
    for path in (copy, back):
        path.unlink()
    return {"input": name, "description": spec["description"], "bytes": size, "tensors": spec["tensors"],
            "largest_tensor": spec["largest"], "round_trip_identical": identical,
            "neutral_bytes": neutral.stat().st_size, "figures": figures}


def table(results: list[dict]) -> str:
    mb = 1 << 20
    lines = ["| input | tensors | size | command | wall | time / cp | peak RSS | RSS / input | peak anonymous |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = r["figures"]
        floor_time = f["cp"]["seconds"]
        for command in ("cp", "cli --help", "ms2neutral", "neutral2ms"):
            m = f[command]
            lines.append(f"| {r['input']} | {r['tensors']} | {r['bytes'] / mb:.1f} MiB | {command} | "
                         f"{m['seconds']:.3f} s | {m['seconds'] / floor_time:.1f}x | {m['peak_rss'] / mb:.0f} MiB | "
                         f"{m['peak_rss'] / r['bytes']:.2f} | {m['peak_anon'] / mb:.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", default=",".join(DEFAULT_INPUTS), help="comma-separated names from bench_inputs.INPUTS (MindONE SGM .ckpt ones)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "lorabridge-bench",
                        help="where inputs are generated (and kept for the next run)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per command; the best time is reported")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    results = [measure(name, args.dir, args.repeat) for name in args.inputs.split(",")]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"ms2neutral / neutral2ms on {machine}, {time.strftime('%Y-%m-%d')}, best of {args.repeat}\n")
    print(table(results))
    for r in results:
        print(f"\n{r['input']}: {r['description']}; largest tensor {r['largest_tensor'] / (1 << 20):.1f} MiB; "
              f"neutral file {r['neutral_bytes'] / (1 << 20):.1f} MiB; round trip byte-identical: {r['round_trip_identical']}")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ms_bench.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
