"""Peak memory of ``fuse`` and ``extract`` on SDXL-base shapes: the streaming bound, measured.

Writes a random single-file SGM checkpoint holding SDXL-base's UNet layers at their real shapes (by default
the 1280-wide ``down_blocks.2``: 20 transformer blocks, whose ``ff.net.0.proj`` (10240 x 1280) is SDXL's
largest linear layer), tensor by tensor, and a rank-8 LoRA on every Linear of it; then runs
``lorabridge fuse`` and ``lorabridge extract`` as child processes and reports their peak RSS against the
bound: two largest layers + 200 MB.

    python bench/toolbox_streaming.py /tmp/bench-toolbox [--prefix down_blocks.2.] [--dtype F16]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lorabridge.architectures.sdxl import SDXL, diffusers_to_sgm
from lorabridge.formats.neutral import write_neutral
from lorabridge.io.safetensors_file import write_safetensors
from lorabridge.model import LoraModel, LoraModule
from lorabridge.tensor import DTYPES, Tensor


class RandomTensors(dict):
    """Header from shapes alone; each tensor's random values made when the writer reaches it (one at a time)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: str, seed: int):
        super().__init__(shapes)
        self.dtype, self.seed = dtype, seed

    def items(self):
        return ((k, _Header(self.dtype, s)) for k, s in super().items())

    def values(self):
        rng = np.random.default_rng(self.seed)
        for shape in super().values():
            yield Tensor.from_numpy((rng.standard_normal(shape, np.float32) * 0.02), self.dtype)


class _Header:
    def __init__(self, dtype: str, shape: tuple[int, ...]):
        self.dtype, self.shape = dtype, shape
        self.nbytes = int(np.prod(shape)) * DTYPES[dtype][0]


def child_peak(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of ``python -m lorabridge ARGS`` run as a child."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lorabridge", *args], check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("ru_maxrss of children did not grow: run each measurement in a fresh process")
    return time.perf_counter() - started, peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--prefix", default="down_blocks.2.")
    parser.add_argument("--dtype", default="F16")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--measure", choices=["fuse", "extract"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    modules = {p: s for p, s in SDXL.modules("unet").items() if p.startswith(args.prefix) and len(s) >= 2}
    shapes = {f"model.diffusion_model.{diffusers_to_sgm(p)}.weight": s for p, s in modules.items()}
    base, lora, fused, extracted = (work / "base.safetensors", work / "lora.safetensors", work / "fused.safetensors",
                                    work / "extracted.safetensors")
    if args.measure is None:
        write_safetensors(base, RandomTensors(shapes, args.dtype, 0))
        rng = np.random.default_rng(1)
        model = LoraModel()
        for path, shape in modules.items():
            if SDXL.is_lora_target("unet", path) and len(shape) == 2:
                a = rng.standard_normal((args.rank, shape[1]), np.float32) * 0.02
                b = rng.standard_normal((shape[0], args.rank), np.float32) * 0.02
                model.add(LoraModule(f"unet.{path}", "lora", {"lora_A.weight": Tensor.from_numpy(a),
                                                              "lora_B.weight": Tensor.from_numpy(b)}, alpha=args.rank))
        write_neutral(model, lora)
        for what in ("fuse", "extract"):  # each in a fresh parent, so RUSAGE_CHILDREN is that command's alone
            subprocess.run([sys.executable, __file__, str(work), "--prefix", args.prefix, "--dtype", args.dtype,
                            "--rank", str(args.rank), "--measure", what], check=True)
        return
    itemsize = DTYPES[args.dtype][0]
    largest = sorted((int(np.prod(s)) * itemsize for s in shapes.values()), reverse=True)[:2]
    total = sum(int(np.prod(s)) * itemsize for s in shapes.values())
    if args.measure == "fuse":
        seconds, peak = child_peak(["fuse", str(lora), "--base", str(base), "-o", str(fused), "--force"])
    else:
        seconds, peak = child_peak(["extract", "--base", str(base), "--tuned", str(fused), "--rank", str(args.rank),
                                    "-o", str(extracted), "--force"])
    bound = sum(largest) / 2**20 + 200
    print(f"| {args.measure} | {len(shapes)} tensors, {total / 2**20:.0f} MB {args.dtype} | largest two "
          f"{largest[0] / 2**20:.1f} + {largest[1] / 2**20:.1f} MB | {seconds:.1f} s | {peak:.0f} MB | {bound:.0f} MB | "
          f"{'yes' if peak <= bound else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
