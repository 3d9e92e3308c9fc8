"""MindSpore CPU convolution at SDXL's real shapes: MindSpore's Conv2D vs a matmul convolution vs torch.

Issue 16 item 2 reported MindSpore's CPU Conv2D (what the off-Ascend op adapter,
``lorabridge/adapters/ms_cpu_ops.py``, routes ``mint`` conv to) at about 1.4 GFLOP/s and a
convolution written as matmuls 20-35x faster. This measures the three side by side in one
process, interleaved (on a shared machine noise only adds time, so the best of ``--repeats``
counts), on the UNet's and the VAE decoder's shapes, and checks each result against torch.

    python bench/ms_conv_bench.py                 # UNet at 1024px (and 256px) latents, VAE decoder up to 512px
    python bench/ms_conv_bench.py --vae-size 1024 --repeats 2

The contender, :func:`matmul_conv2d`, is im2col + one matmul per band of output rows: a band
holds at most ``--band-mib`` MiB of im2col columns, so its extra memory stays bounded at any
image size (a whole-image im2col of VAE 512ch 3x3 at 1024x1024 would be 18 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

# (what, batch, in channels, out channels, side, kernel, stride, padding)
UNET_1024 = [
    ("UNet 320ch 3x3 @128 (1024px)", 2, 320, 320, 128, 3, 1, 1),
    ("UNet 640ch 3x3 @64", 2, 640, 640, 64, 3, 1, 1),
    ("UNet 1280ch 3x3 @32", 2, 1280, 1280, 32, 3, 1, 1),
    ("UNet 320->640 1x1 shortcut @64", 2, 320, 640, 64, 1, 1, 0),
    ("UNet 320ch 3x3 stride 2 @128", 2, 320, 320, 128, 3, 2, 1),
    ("UNet conv_in 4->320 @128", 2, 4, 320, 128, 3, 1, 1),
    ("UNet 320ch 3x3 @32 (256px)", 2, 320, 320, 32, 3, 1, 1),
]


def vae_shapes(size: int) -> list[tuple]:
    """The VAE decoder's convolutions for a ``size`` px image (SDXL and Flux.1: 512, 512, 256, 128 channels)."""
    return [
        (f"VAE 512ch 3x3 @{size // 8}", 1, 512, 512, size // 8, 3, 1, 1),
        (f"VAE 512ch 3x3 @{size // 4}", 1, 512, 512, size // 4, 3, 1, 1),
        (f"VAE 256ch 3x3 @{size // 2}", 1, 256, 256, size // 2, 3, 1, 1),
        (f"VAE 512->256 1x1 shortcut @{size // 2}", 1, 512, 256, size // 2, 1, 1, 0),
        (f"VAE 128ch 3x3 @{size}", 1, 128, 128, size, 3, 1, 1),
        (f"VAE conv_out 128->3 @{size}", 1, 128, 3, size, 3, 1, 1),
    ]


def matmul_conv2d(x, weight, bias, stride: int, padding: int, band_bytes: int):
    """Convolution (dilation 1, groups 1) as im2col + matmul per band of output rows, in MindSpore ops.

    Peak extra memory per band: the im2col columns (at most ``band_bytes``) and the band's
    padded input rows and output; the result is the concatenation of the bands.
    """
    from mindspore import ops

    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    x = ops.pad(x, (padding,) * 4) if padding else x
    out_h, out_w = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    flat_weight = weight.reshape(o, c * kh * kw)
    rows = max(1, min(out_h, band_bytes // (n * c * kh * kw * out_w * x.itemsize)))
    bands = []
    for top in range(0, out_h, rows):
        count = min(rows, out_h - top)
        slab = x[:, :, top * stride:(top + count - 1) * stride + kh]
        if kh == kw == 1 and stride == 1:
            columns = slab.reshape(n, c, count * out_w)
        else:
            taps = [slab[:, :, i:i + (count - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]
                    for i in range(kh) for j in range(kw)]
            columns = ops.stack(taps, 2).reshape(n, c * kh * kw, count * out_w)
        bands.append(ops.matmul(flat_weight, columns).reshape(n, o, count, out_w))
    out = bands[0] if len(bands) == 1 else ops.cat(bands, 2)
    return out + bias.reshape(1, o, 1, 1) if bias is not None else out


def measure(shape: tuple, repeats: int, band_bytes: int) -> dict:
    """Best-of-``repeats`` seconds of the three convolutions (interleaved) and their max |diff| to torch."""
    import mindspore as ms
    import numpy as np
    import torch
    import torch.nn.functional as F
    from mindspore import ops

    what, n, c, o, side, k, stride, padding = shape
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((n, c, side, side), dtype=np.float32)
    w_np = (rng.standard_normal((o, c, k, k), dtype=np.float32) / np.sqrt(c * k * k)).astype(np.float32)
    b_np = rng.standard_normal(o, dtype=np.float32)
    x, w, b = ms.Tensor(x_np), ms.Tensor(w_np), ms.Tensor(b_np)
    xt, wt, bt = torch.from_numpy(x_np), torch.from_numpy(w_np), torch.from_numpy(b_np)
    contenders = {
        "mindspore Conv2D": lambda: ops.conv2d(x, w, b, stride, "pad", padding).asnumpy(),
        "matmul conv": lambda: matmul_conv2d(x, w, b, stride, padding, band_bytes).asnumpy(),
        "torch": lambda: F.conv2d(xt, wt, bt, stride, padding).numpy(),
    }
    reference = contenders["torch"]()
    seconds = {name: float("inf") for name in contenders}
    diffs = {name: float(np.abs(run() - reference).max()) for name, run in contenders.items()}  # also warms up
    for _ in range(repeats):
        for name, run in contenders.items():
            started = time.perf_counter()
            run()
            seconds[name] = min(seconds[name], time.perf_counter() - started)
    out_side = (side + 2 * padding - k) // stride + 1
    flops = 2 * n * o * c * k * k * out_side * out_side
    return {"what": what, "seconds": seconds, "gflops": {name: flops / s / 1e9 for name, s in seconds.items()},
            "max_abs_diff": diffs, "max_abs_reference": float(np.abs(reference).max())}


def render(rows: list[dict], argv: str, threads: int, load: str) -> str:
    lines = [f"Command: `python bench/ms_conv_bench.py {argv}`  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M')}; {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"{threads} thread(s) for torch, MindSpore's default; load average {load} (start, end)", "",
             "| shape (NCHW in, kernel) | MindSpore Conv2D ms (GFLOP/s) | matmul conv ms (GFLOP/s) | torch ms (GFLOP/s) "
             "| Conv2D / torch | matmul / Conv2D | max abs diff vs torch (Conv2D, matmul) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        s, d = r["seconds"], r["max_abs_diff"]
        cell = {name: f"{1000 * s[name]:.1f} ({r['gflops'][name]:.0f})" for name in s}
        lines.append(f"| {r['what']} | {cell['mindspore Conv2D']} | {cell['matmul conv']} | {cell['torch']} | "
                     f"{s['mindspore Conv2D'] / s['torch']:.2f} | {s['matmul conv'] / s['mindspore Conv2D']:.2f} | "
                     f"{d['mindspore Conv2D']:.1e}, {d['matmul conv']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae-size", type=int, default=512, help="image side for the VAE decoder shapes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--band-mib", type=int, default=64, help="im2col band budget of the matmul convolution")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--only", help="run only the shapes whose name contains this")
    args = parser.parse_args()

    import mindspore as ms
    import torch

    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE, pynative_synchronize=True)  # as lorabridge's MindSpore backend runs
    torch.set_num_threads(args.threads)
    load = f"{os.getloadavg()[0]:.1f}"
    rows = []
    for shape in UNET_1024 + vae_shapes(args.vae_size):
        if args.only and args.only not in shape[0]:
            continue
        rows.append(measure(shape, args.repeats, args.band_mib << 20))
        print(json.dumps(rows[-1]), flush=True)
    print(render(rows, " ".join(sys.argv[1:]), args.threads, f"{load}, {os.getloadavg()[0]:.1f}"))


if __name__ == "__main__":
    main()
