"""Initial latent noise as plain numpy: drawn from the seed, loaded from and saved to ``.npy``.

The seed's consistency check edited diffusers' source to dump the starting noise and fed
the file to MindONE. Here the noise is made outside either framework (numpy, from
``--seed``), so one seed gives the same start on both backends, and ``--save-latents`` /
``--init-latents`` carry it between runs and machines explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import LoraBridgeError
from ..io.atomic import atomic_write

LATENT_DTYPES = ("float32", "float16")


def draw_latents(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 noise of ``shape``; image ``i`` of a batch is drawn from ``seed + i``.

    Example:
        >>> draw_latents(0, (2, 4, 8, 8))[1].std() > 0.5
        True
    """
    return np.stack([np.random.default_rng(seed + i).standard_normal(shape[1:], dtype=np.float32)
                     for i in range(shape[0])])


def pack_latents(latents: np.ndarray, patch: int) -> np.ndarray:
    """(N, C, H, W) noise as the (N, H/p * W/p, C * p * p) tokens of p x p patches a Flux.1 transformer reads
    (diffusers' and mindone's ``FluxPipeline._pack_latents``); ``patch`` 1 returns the array as it is.

    Both backends get this one array, so they start from the same noise whatever their own packing code.

    Example:
        >>> pack_latents(np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4), 2)[0, 1]
        array([2., 3., 6., 7.], dtype=float32)
    """
    if patch == 1:
        return latents
    n, c, h, w = latents.shape
    patches = latents.reshape(n, c, h // patch, patch, w // patch, patch).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(patches.reshape(n, (h // patch) * (w // patch), c * patch * patch))


def load_latents(path: str | os.PathLike, shape: tuple[int, ...]) -> np.ndarray:
    """Read a ``.npy`` latent array (never pickles) and check it has ``shape`` and a float dtype."""
    path = Path(path)
    if not path.is_file():
        raise LoraBridgeError("no such file (--init-latents)", path)
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise LoraBridgeError(f"not a .npy array ({exc})", path) from None
    if array.dtype.name not in LATENT_DTYPES:
        raise LoraBridgeError(f"init latents are {array.dtype.name}, expected one of {', '.join(LATENT_DTYPES)}", path)
    if tuple(array.shape) != tuple(shape):
        raise LoraBridgeError(f"init latents have shape {list(array.shape)}, expected {list(shape)} "
                              "(num images, latent channels, height/8, width/8)", path)
    if not np.isfinite(array).all():
        raise LoraBridgeError("init latents contain NaN or infinity", path)
    return array.astype(np.float32)


def save_latents(path: str | os.PathLike, latents: np.ndarray) -> Path:
    """Write ``latents`` as ``.npy``, atomically."""
    with atomic_write(path) as handle:
        np.save(handle, latents, allow_pickle=False)
    return Path(path)
