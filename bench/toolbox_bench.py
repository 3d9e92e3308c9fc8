"""Toolbox timing at full SDXL size: ``lorabridge resize`` of a rank-128 SDXL LoRA to rank 32, and an exact
``merge`` of two of them, with wall time and peak RSS, against a baseline measured in the same run: numpy's
dense SVD of the largest module's delta W (1280 x 10240, what a resize that forms delta W pays per module).

    python bench/toolbox_bench.py [--workdir /tmp/lorabridge-toolbox-bench]   # writes bench/RESULTS-toolbox.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_inputs import INPUTS, build_model  # noqa: E402
from measure import Launcher  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
INPUT = "rank128-attn-ff-proj-te"
BASELINE = """
import numpy as np
rng = np.random.default_rng(0)
b = (rng.standard_normal((10240, 128)) * 0.01).astype(np.float32)
a = (rng.standard_normal((128, 1280)) * 0.01).astype(np.float32)
np.linalg.svd((b @ a).astype(np.float64), full_matrices=False)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorabridge-toolbox-bench"))
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS-toolbox.md")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    launcher = Launcher()  # first, while this process is small
    from lorabridge.formats.neutral import write_neutral

    inputs = []
    for seed in (0, 1):
        path = work / f"{INPUT}-{seed}.safetensors"
        if not path.exists():
            write_neutral(build_model(INPUTS[INPUT], seed=seed), path)
        inputs.append(path)
    python = sys.executable
    cli = [python, "-m", "lorabridge"]
    runs = {}
    with launcher:
        runs["baseline: numpy dense SVD of one 10240x1280 delta W (float64)"] = (launcher.measure([python, "-c", BASELINE], env=ENV), None)
        for name, argv in {
            "resize --rank 32 (whole LoRA)": [*cli, "resize", inputs[0], "--rank", "32", "--json", "--force", "-o", work / "r32.safetensors"],
            "merge, exact (two LoRAs)": [*cli, "merge", *inputs, "--weights", "0.7,0.5", "--json", "--force", "-o", work / "merged.safetensors"],
        }.items():
            log = work / (name.split()[0].strip(",") + ".json")
            run = launcher.measure([str(a) for a in argv], env=ENV, log=log)
            if run.returncode:
                raise SystemExit(f"{name} failed: {run.stderr}")
            runs[name] = (run, json.loads(log.read_text()))
    base = runs["baseline: numpy dense SVD of one 10240x1280 delta W (float64)"][0].wall_s
    size = inputs[0].stat().st_size
    report = json.loads((work / "resize.json").read_text())
    lines = ["# Toolbox benchmark (`python bench/toolbox_bench.py`)", "",
             f"Input: `{INPUT}` ({INPUTS[INPUT].description}), {report['modules_total']} modules, "
             f"{size / 2**20:.0f} MiB as a neutral file; CPU only, {os.cpu_count()} cores on this machine.", "",
             "| run | wall s | vs baseline | peak RSS MiB | peak anon MiB | overall rel. error |", "|---|---|---|---|---|---|"]
    for name, (run, data) in runs.items():
        error = f"{data['overall_relative_error']:.3e}" if data else "-"
        lines.append(f"| {name} | {run.wall_s:.2f} | {run.wall_s / base:.2f}x | {run.peak_rss_bytes / 2**20:.0f} | "
                     f"{run.peak_anon_bytes / 2**20:.0f} | {error} |")
    lines += ["", f"resize: total rank {report['rank_before']} -> {report['rank_after']}, max module error "
              f"{report['max_relative_error']:.3e} (random factors: the dropped 96 of 128 singular values are most of the energy).",
              f"Outputs: resized {(work / 'r32.safetensors').stat().st_size / 2**20:.0f} MiB, "
              f"merged {(work / 'merged.safetensors').stat().st_size / 2**20:.0f} MiB (ranks add up: 256).",
              "The whole-LoRA resize computes every module's SVD from its factors (thin QR of B and A^T) and its error from "
              "Gram matrices; it never forms a delta W."]
    args.results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
