"""``compare``: how far apart two images (or two directories of images) are, in pixels.

The seed's consistency bar is a mean absolute error below 5 on 0..255 between the
MindSpore and PyTorch images of one LoRA; this measures it (plus max error and PSNR)
and draws A | B | heat map of |A - B| so a failure can be seen, not just counted.

Example:
    >>> report = compare_paths("torch.png", "mindspore.png", output="diff.png")   # doctest: +SKIP
    >>> report["pairs"][0]["mae"]   # doctest: +SKIP
    0.0001
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LoraBridgeError
from .io.atomic import atomic_directory, atomic_write, check_output_path, replacing

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_metrics(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Mean and max absolute error on 0..255 and PSNR in dB (None when the images are identical).

    Example:
        >>> image_metrics(np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 3, np.uint8))
        {'mae': 3.0, 'max_error': 3, 'psnr': 38.59}
    """
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    mse = float((diff ** 2).mean())
    return {"mae": round(float(diff.mean()), 6), "max_error": int(diff.max()),
            "psnr": None if mse == 0 else round(10 * math.log10(255.0 ** 2 / mse), 2)}


def heat_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|A - B| (largest over channels) as black -> red -> yellow -> white, scaled to the largest difference."""
    diff = np.abs(a.astype(np.float32) - b.astype(np.float32)).max(axis=2)
    level = diff / max(float(diff.max()), 1.0)
    rgb = np.stack([np.clip(3 * level - k, 0, 1) for k in range(3)], axis=2)
    return (rgb * 255).round().astype(np.uint8)


def side_by_side(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A | B | heat map, separated by 4-pixel white gaps."""
    gap = np.full((a.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([a, gap, b, gap, heat_map(a, b)], axis=1)


def _load(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    from .adapters.png import read_png

    return read_png(path)


def _pairs(a: Path, b: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(A, B) image pairs: the two files, or same-named images of two directories; plus unpaired names."""
    for path in (a, b):
        if not path.exists():
            raise LoraBridgeError("no such file or directory", path)
    if a.is_dir() != b.is_dir():
        raise LoraBridgeError(f"compare two files or two directories, not a {'directory' if a.is_dir() else 'file'} "
                              f"and a {'directory' if b.is_dir() else 'file'}", b)
    if not a.is_dir():
        return [(a, b)], []
    names = [{p.name for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES} for d in (a, b)]
    common = sorted(names[0] & names[1])
    if not common:
        raise LoraBridgeError(f"no image file names in common with {a}", b)
    return [(a / n, b / n) for n in common], sorted(names[0] ^ names[1])


def _write_png(path: Path, pixels: np.ndarray, text: dict[str, str]) -> None:
    from .adapters.png import write_png

    buffer = io.BytesIO()
    write_png(buffer, pixels, text)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())


def compare_paths(a: str | os.PathLike, b: str | os.PathLike, output: str | os.PathLike | None = None,
                  max_mae: float = 5.0, force: bool = False) -> dict[str, Any]:
    """Compare two images or two directories; ``passed`` is False if any pair's MAE exceeds ``max_mae``
    or a directory holds an image the other lacks. ``output`` gets the side-by-side image(s)."""
    a, b = Path(a), Path(b)
    pairs, unpaired = _pairs(a, b)
    out = None if output is None else check_output_path(output, force, inputs=(a, b), directory=a.is_dir())
    results, images = [], {}
    for pa, pb in pairs:
        (ia, _), (ib, _) = _load(pa), _load(pb)
        if ia.shape != ib.shape:
            raise LoraBridgeError(f"sizes differ: {ia.shape[1]}x{ia.shape[0]} in {pa}, {ib.shape[1]}x{ib.shape[0]}", pb)
        metrics = image_metrics(ia, ib)
        results.append({"a": str(pa), "b": str(pb), **metrics, "passed": metrics["mae"] <= max_mae})
        images[pa.with_suffix(".png").name] = (side_by_side(ia, ib), {"a": str(pa), "b": str(pb), **{k: str(v) for k, v in metrics.items()}})
    if out is not None:
        _write_outputs(out, images, a.is_dir(), force)
        for row in results:
            row["diff"] = str(out / Path(row["a"]).with_suffix(".png").name if a.is_dir() else out)
    return {"pairs": results, "unpaired": unpaired, "max_mae": max_mae,
            "passed": all(r["passed"] for r in results) and not unpaired}


def _write_outputs(out: Path, images: dict[str, tuple[np.ndarray, dict]], directory: bool, force: bool) -> None:
    if not directory:
        (pixels, text), = images.values()
        with replacing(force):
            _write_png(out, pixels, text)
        return
    if out.exists() and not out.is_dir():
        raise LoraBridgeError("output exists and is not a directory", out)
    with atomic_directory(out, force) as tmp:
        for name, (pixels, text) in images.items():
            _write_png(tmp / name, pixels, text)


def render_comparison(report: dict[str, Any]) -> str:
    """One line per pair, then the verdict against ``max_mae``."""
    lines = []
    for row in report["pairs"]:
        psnr = "inf" if row["psnr"] is None else f"{row['psnr']:.2f}"
        line = f"{row['a']} vs {row['b']}: MAE {row['mae']:.4f}  max {row['max_error']}  PSNR {psnr} dB"
        lines.append(line + (f"  -> {row['diff']}" if "diff" in row else "") + ("" if row["passed"] else "  FAIL"))
    lines += [f"unpaired: {name}" for name in report["unpaired"]]
    worst = max(r["mae"] for r in report["pairs"])
    lines.append(f"{'PASS' if report['passed'] else 'FAIL'}: worst MAE {worst:.4f} (max allowed {report['max_mae']:g})")
    return "\n".join(lines)
