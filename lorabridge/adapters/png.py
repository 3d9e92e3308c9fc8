"""PNG images with their generation parameters in text chunks, and reading them back.

An image that says which prompt, seed, step count, LoRA file (by sha256) and backend
made it can be reproduced and compared later without a side file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import LoraBridgeError


def write_png(path: str | os.PathLike | BinaryIO, pixels: np.ndarray, text: dict[str, str]) -> None:
    """Write an (H, W, 3) uint8 array as a PNG with ``text`` as tEXt/iTXt chunks.

    Example:
        >>> write_png("out.png", np.zeros((8, 8, 3), np.uint8), {"prompt": "a cat"})   # doctest: +SKIP
    """
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, str(value))
    Image.fromarray(np.asarray(pixels, np.uint8), "RGB").save(path, format="PNG", pnginfo=info)


def read_png(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, str]]:
    """An image file as an (H, W, 3) uint8 RGB array plus its text chunks (empty for non-PNG files)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise LoraBridgeError("no such image file", path)
    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
            return np.asarray(image.convert("RGB")), text
    except (UnidentifiedImageError, OSError) as exc:
        raise LoraBridgeError(f"not a readable image ({exc})", path) from None
