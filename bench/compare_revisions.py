"""Before/after: the same conversions run by two revisions of lorabridge, interleaved, on the same inputs.

A refactor must not slow conversions down. This script checks out ``--base`` (default ``HEAD~1``)
into a temporary git worktree and runs each command with the base's ``cli.py`` and with this
checkout's, alternating which goes first, after ``sync``, on an input in the page cache. It reports
medians of wall time and of CPU time (user + system of the child) and the ratios this / base: the
baseline is the other revision run in the same script on the same machine, never a stored number.

Usage::

    .venv/bin/python bench/compare_revisions.py --base f71ebf3              # writes bench/RESULTS-revisions.md
    .venv/bin/python bench/compare_revisions.py --base f71ebf3 --repeat 3 --input rank4-attn
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_inputs import INPUTS, generate

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS-revisions.md"
COMMANDS = {  # name -> arguments; IN/OUT are filled in per run
    "ms2neutral": ["ms2neutral", "IN.ckpt", "-o", "OUT.safetensors"],
    "neutral2pt": ["neutral2pt", "IN.safetensors", "-o", "OUT.safetensors"],
    "neutral2ms": ["neutral2ms", "IN.safetensors", "-o", "OUT.ckpt"],
    "convert --to kohya": ["convert", "IN.safetensors", "--to", "kohya", "-o", "OUT.safetensors"],
}


def run_once(repo: Path, args: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one ``cli.py`` command of ``repo``, after ``sync``."""
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    subprocess.run(["sync"], check=True)
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run([sys.executable, str(repo / "cli.py"), *args, "--force"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def compare(base: Path, work: Path, stem: str, repeat: int) -> list[str]:
    """Markdown rows: per command, medians of both revisions and the ratios."""
    rows = []
    for name, template in COMMANDS.items():
        times: dict[str, list[tuple[float, float]]] = {"base": [], "this": []}
        for i in range(repeat):
            for side in (("base", "this") if i % 2 == 0 else ("this", "base")):
                args = [a.replace("IN", str(work / stem)).replace("OUT", str(work / f"out-{side}")) for a in template]
                times[side].append(run_once(base if side == "base" else REPO, args))
        (wb, cb), (wt, ct) = ((statistics.median(t[0] for t in times[s]), statistics.median(t[1] for t in times[s]))
                              for s in ("base", "this"))
        rows.append(f"| {name} | {wb:.3f} | {wt:.3f} | {wt / wb:.2f} | {cb:.3f} | {ct:.3f} | {ct / cb:.2f} |")
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD~1", help="the revision to compare with [HEAD~1]")
    parser.add_argument("--input", choices=[n for n, s in INPUTS.items() if s.writer == "mindone-sgm"],  # COMMANDS' ckpt
                        default="rank128-attn-ff-proj-te")
    parser.add_argument("--repeat", type=int, default=6, help="runs per revision and command [6]")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lorabridge-bench")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = generate(INPUTS[args.input], args.work)
    stem = ckpt.with_suffix("")
    subprocess.run([sys.executable, str(REPO / "cli.py"), "ms2neutral", str(ckpt), "-o", f"{stem}.safetensors", "--force"],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    revision = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.base], check=True,
                              capture_output=True, text=True).stdout.strip()
    this = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), revision], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            header = [f"# Before/after: {revision} (base) and {this} (this checkout)", "",
                      f"Written by `bench/compare_revisions.py --base {args.base} --input {args.input} --repeat {args.repeat}`: "
                      "each command run by both revisions' `cli.py`, alternating which goes first, after `sync`; medians; "
                      "CPU = user + system time of the command's process.", "",
                      "| command | base wall s | this wall s | this/base wall | base CPU s | this CPU s | this/base CPU |",
                      "|---|---|---|---|---|---|---|"]
            print("\n".join(header), flush=True)
            rows = compare(base, args.work, stem.name, args.repeat)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
    RESULTS.write_text("\n".join(header + rows) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
