"""What a LoRA costs at inference: load time and time per denoising step, base vs LoRA unfused vs fused.

    python bench/infer_bench.py                          # tiny SDXL on CPU, torch and mindspore backends
    python bench/infer_bench.py --model sdxl --device cuda --dtype fp16 --backends torch --size 1024

Everything goes through lorabridge's own adapters (``load_pipeline`` + ``apply_lora``, i.e. what
``infer`` does, checks included), one fresh process per backend. Numbers: load times best of
``--repeats`` runs, per-step times the median over every step but the first of a run, best of the
runs (variants interleaved, so background load hits all alike); they are reported
as ratios to the base model measured in the same run, and written to bench/RESULTS-infer.md.
``--model sdxl`` builds SDXL-base at real size with random weights (``make-base --arch sdxl``: no download,
fp16 on disk).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("base", "lora unfused", "lora fused")


def _sync(backend: str) -> None:
    """Wait for queued device work, so a timestamp means the step is done."""
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    else:
        import mindspore as ms

        ms.runtime.synchronize()


def run_worker(args: argparse.Namespace) -> dict:
    """Measure one backend in this process: base, LoRA unfused, LoRA fused; print and return the medians."""
    from lorabridge.adapters.base_model import describe_base
    from lorabridge.adapters.infer import load_backend
    from lorabridge.adapters.latents import draw_latents
    from lorabridge.adapters.options import InferOptions
    from lorabridge.adapters.pipeline import apply_lora, sample, set_scheduler
    from lorabridge.formats.neutral import read_neutral

    backend = load_backend(args.worker)
    base = describe_base(args.base)
    lora = read_neutral(args.lora)
    device = backend.resolve_device(args.device)
    dtype = backend.resolve_dtype(args.dtype, device)
    size = args.size or base.native_size
    latents = draw_latents(0, base.latent_shape(1, size, size))
    options = InferOptions(args.worker, base.path, "a photo of a cat", steps=args.steps)
    samples: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    # Variants are interleaved, so a burst of load from other processes hits all of them alike.
    for variant in ("base", *[v for _ in range(args.repeats) for v in VARIANTS]):
        started = time.perf_counter()
        pipe, fw = backend.load_pipeline(base, dtype, device)
        _sync(args.worker)
        loaded = time.perf_counter()
        if variant.startswith("lora"):
            apply_lora(pipe, fw, lora, Path(args.lora), 1.0, variant == "lora fused", log=lambda line: None)
            _sync(args.worker)
        lora_loaded = time.perf_counter()
        set_scheduler(pipe, fw, "euler")
        stamps: list[float] = []

        def stamp(pipe, step, timestep, kwargs):
            _sync(args.worker)
            stamps.append(time.perf_counter())  # noqa: B023 (called by sample() in this iteration)
            return kwargs

        sample(pipe, fw, options, latents, (size, size), on_step=stamp)
        samples[variant].append({"pipeline_load_s": loaded - started, "lora_load_s": lora_loaded - loaded,
                                 "step_s": statistics.median(b - a for a, b in zip(stamps, stamps[1:]))})
        del pipe
    samples["base"].pop(0)  # the first run warms caches up
    # Best of the repeats: on a shared machine, noise only ever adds time.
    results = {variant: {key: min(run[key] for run in runs) for key in runs[0]} for variant, runs in samples.items()}
    return {"backend": args.worker, "device": device, "dtype": dtype, "size": size, "results": results}


def versions(backend: str) -> str:
    from importlib.metadata import version

    packages = ("torch", "diffusers", "peft") if backend == "torch" else ("mindspore", "mindone")
    return ", ".join(f"{p} {version(p)}" for p in packages)


def render(report: dict, argv: list[str]) -> str:
    """bench/RESULTS-infer.md: how it was run, then one table per backend with ratios to the base."""
    lines = [
        "# Inference benchmark: what a LoRA costs (lorabridge `infer` adapters)",
        "",
        "Real-size SDXL on CPU, both backends side by side (time per step, VAE decode, peak memory, before and after): "
        "bench/RESULTS-infer-realsize.md (`make realsize`); on CUDA: bench/RESULTS-infer-cuda.md.",
        "",
        f"Command: `python bench/infer_bench.py {' '.join(argv)}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{platform.python_implementation()} {platform.python_version()}; load average {report['load']} (start, end: "
        "other processes share the CPU, so single runs are noisy)  ",
        f"Model: {report['model']} SDXL ({report['lora']['modules']} LoRA modules: {report['lora']['per_component']}, "
        f"rank {report['lora']['rank']}), {report['steps']} euler steps, guidance 5 (two UNet passes per step), "
        f"best of {report['repeats']} interleaved runs (per step: median over a run's steps after the first), "
        f"{report['threads'] or 'default'} CPU thread(s) per worker.",
        "",
        "Load = build the pipeline from disk; LoRA = `load_lora_weights` with lorabridge's module and scale checks "
        "(+ `fuse_lora` and dropping the idle LoRA layers when fused). Ratios are to the base model in the same run.",
        "",
    ]
    for run in report["runs"]:
        base = run["results"]["base"]
        lines += [f"## {run['backend']} on {run['device']} ({run['dtype']}, {run['size']}x{run['size']}; {run['versions']})", "",
                  "| variant | pipeline load s | LoRA load s | load ratio | per step ms | step ratio |",
                  "|---|---:|---:|---:|---:|---:|"]
        for variant, r in run["results"].items():
            load_ratio = (r["pipeline_load_s"] + r["lora_load_s"]) / base["pipeline_load_s"]
            lines.append(f"| {variant} | {r['pipeline_load_s']:.2f} | {r['lora_load_s']:.2f} | {load_ratio:.2f} | "
                         f"{1000 * r['step_s']:.1f} | {r['step_s'] / base['step_s']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "sdxl"), default="tiny")
    parser.add_argument("--backends", nargs="+", default=["torch", "mindspore"], choices=("torch", "mindspore"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=None, help="image side [default: the model's native size]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per worker (0: the frameworks' default). One thread keeps CPU timings stable "
                             "on a shared machine, where competing processes stall multi-threaded kernels.")
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS-infer.md"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--lora", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    from lorabridge.architectures.real_base import build_base
    from lorabridge.architectures.sdxl import SDXL
    from lorabridge.architectures.sdxl.tiny import build_tiny, make_tiny_lora
    from lorabridge.formats.neutral import write_neutral

    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(SDXL, Path(tmp) / "sdxl", log=print) if args.model == "sdxl" else build_tiny(Path(tmp) / "sdxl")
        lora = make_tiny_lora(base)
        write_neutral(lora, Path(tmp) / "lora.safetensors")
        summary = lora.summary()
        load_start = os.getloadavg()[0]
        report = {"model": args.model, "steps": args.steps, "repeats": args.repeats, "threads": args.threads, "runs": [],
                  "lora": {"modules": summary["modules"], "per_component": summary["per_component"],
                           "rank": ", ".join(summary["ranks"])}}
        for backend in args.backends:
            worker = [sys.executable, __file__, "--worker", backend, "--base", str(base), "--lora", str(Path(tmp) / "lora.safetensors"),
                      "--steps", str(args.steps), "--repeats", str(args.repeats), "--dtype", args.dtype]
            worker += ["--device", args.device] if args.device else []
            worker += ["--size", str(args.size)] if args.size else []
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "GLOG_v": "3", "PYTHONPATH": str(ROOT)}
            if args.threads:
                env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
            proc = subprocess.run(worker, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{backend} worker failed:\n{proc.stderr[-3000:]}")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["versions"] = versions(backend)
            report["runs"].append(run)
            print(f"{backend}: " + json.dumps(run["results"]), flush=True)
    report["load"] = f"{load_start:.1f}, {os.getloadavg()[0]:.1f}"
    text = render(report, sys.argv[1:])
    Path(args.out).write_text(text + "\n", "utf-8")
    print(text)


if __name__ == "__main__":
    main()
